-- IP addresses and CIDR networks, for relay rules.
--
--   local net = require "moonpost.runtime.net"
--   net.ip(s)           -> 4- or 16-octet string | nil       ("192.0.2.1", "2001:db8::1")
--   net.cidr(s)         -> network | nil, why                ("10.0.0.0/8", "::1/128", "192.0.2.7")
--   net.list(list)      -> matcher | nil, why                (a list of CIDR strings)
--   matcher:match(ip)   -> true | false                      (ip as a string, as luv gives it)
--
-- An IPv4-mapped IPv6 address (::ffff:192.0.2.1) matches IPv4 networks.
-- Addresses are compared as octet strings: no floating point, no bit
-- operations on more than 8 bits at a time.
local byte, char, sub, rep = string.byte, string.char, string.sub, string.rep
local tonumber, ipairs, type, format = tonumber, ipairs, type, string.format

local _M = { _VERSION = "0.1" }

local function ipv4(s)
  local a, b, c, d = s:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if not a then return nil end
  local o = { tonumber(a), tonumber(b), tonumber(c), tonumber(d) }
  for i = 1, 4 do
    if o[i] > 255 or #select(i, a, b, c, d) > 3 then return nil end
  end
  return char(o[1], o[2], o[3], o[4])
end

local function ipv6(s)
  if s:find("[^%x:%.]") then return nil end
  -- a trailing dotted quad (::ffff:1.2.3.4) is two groups
  local head, quad = s:match("^(.*:)(%d+%.%d+%.%d+%.%d+)$")
  local tail4 = ""
  if head then
    tail4 = ipv4(quad)
    if not tail4 then return nil end
    s = head .. "0:0"
  end
  local left, right = s, nil
  local dc = s:find("::", 1, true)
  if dc then
    if s:find("::", dc + 1, true) then return nil end
    left, right = sub(s, 1, dc - 1), sub(s, dc + 2)
  end
  local function groups(part)
    local out = {}
    if part == "" then return out end
    for g in (part .. ":"):gmatch("([^:]*):") do
      if g == "" or #g > 4 then return nil end
      out[#out + 1] = tonumber(g, 16)
    end
    return out
  end
  local l, r = groups(left), groups(right or "")
  if not l or not r then return nil end
  local n = #l + #r
  if (dc and n > 7) or (not dc and n ~= 8) then return nil end
  local all = {}
  for _, g in ipairs(l) do all[#all + 1] = g end
  for _ = 1, 8 - n do all[#all + 1] = 0 end
  for _, g in ipairs(r) do all[#all + 1] = g end
  local out = {}
  for i = 1, 8 do out[i] = char(math.floor(all[i] / 256), all[i] % 256) end
  local bytes = table.concat(out)
  if head then bytes = sub(bytes, 1, 12) .. tail4 end
  return bytes
end

-- ip(s) -> 4 octets (IPv4) or 16 (IPv6), or nil
function _M.ip(s)
  if type(s) ~= "string" then return nil end
  s = s:gsub("%%.*$", "") -- a zone index (fe80::1%eth0) does not matter here
  if s:find(":", 1, true) then return ipv6(s) end
  return ipv4(s)
end

local MAPPED = rep("\0", 10) .. "\255\255"

-- cidr(s) -> { bytes, bits } | nil, why
function _M.cidr(s)
  if type(s) ~= "string" then return nil, "expected a string like \"10.0.0.0/8\" or \"::1/128\"" end
  local addr, bits = s:match("^([^/]+)/(%d+)$")
  if not addr then addr = s end
  local b = _M.ip(addr)
  if not b then return nil, format("not an IP address or network: %q", s) end
  local max = #b * 8
  bits = bits and tonumber(bits) or max
  if bits > max then return nil, format("prefix length over %d in %q", max, s) end
  -- the host part must be zero: "10.1.2.3/8" is most likely a mistake
  if addr ~= s and _M.mask(b, bits) ~= b then
    return nil, format("%q has bits set after the prefix (did you mean %s/%d?)", s,
      _M.tostring(_M.mask(b, bits)), bits)
  end
  return { bytes = b, bits = bits, text = s }
end

-- mask(bytes, bits) -> bytes with everything after the prefix zeroed
function _M.mask(b, bits)
  local out = {}
  for i = 1, #b do
    local o = byte(b, i)
    local lo = (i - 1) * 8
    if bits >= lo + 8 then
      out[i] = char(o)
    elseif bits <= lo then
      out[i] = "\0"
    else
      local drop = 2 ^ (8 - (bits - lo))
      out[i] = char(o - o % drop)
    end
  end
  return table.concat(out)
end

function _M.tostring(b)
  if #b == 4 then return format("%d.%d.%d.%d", byte(b, 1, 4)) end
  local g = {}
  for i = 1, 16, 2 do g[#g + 1] = format("%x", byte(b, i) * 256 + byte(b, i + 1)) end
  return table.concat(g, ":")
end

local function contains(net, b)
  if #b ~= #net.bytes then return false end
  return _M.mask(b, net.bits) == net.bytes
end

local Matcher = {}
local matcher_mt = { __index = Matcher }

-- list(list) -> matcher | nil, why (why names the item)
function _M.list(list)
  local nets = {}
  for i, s in ipairs(list) do
    local n, why = _M.cidr(s)
    if not n then return nil, format("item %d: %s", i, why) end
    nets[#nets + 1] = n
  end
  return setmetatable({ nets = nets, cache = {} }, matcher_mt)
end

-- match(ip) -> boolean; ip as a string. Results are cached per address.
function Matcher:match(ip)
  local c = self.cache[ip]
  if c ~= nil then return c end
  local b = _M.ip(ip)
  local found = false
  if b then
    local b4 = #b == 16 and sub(b, 1, 12) == MAPPED and sub(b, 13) or nil
    for _, n in ipairs(self.nets) do
      if contains(n, b) or (b4 and contains(n, b4)) then
        found = true
        break
      end
    end
  end
  -- bounded: a busy listener sees many addresses
  if self.ncache == nil then self.ncache = 0 end
  if self.ncache >= 4096 then
    self.cache, self.ncache = {}, 0
  end
  self.cache[ip] = found
  self.ncache = self.ncache + 1
  return found
end

return _M
