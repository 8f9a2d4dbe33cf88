-- Option checking for policy-facing constructors. A mistake is raised at the
-- policy's own line, naming the block and the field:
--
--   policy.lua:12: accept.smtp: field 'max_recipients': expected a positive integer, got "lots"
--
--   local opts = config.check("accept.smtp", user_opts, SCHEMA)
--   config.raise(msg)   -- any other mistake, at the policy's line
--
-- A schema maps field names to { type, default = ..., check = fn(v) -> ok, why }.
-- Types: string, boolean, function, table, number, posint, nonneg (integer >= 0),
-- duration (seconds, or "300ms", "30s", "5m", "2h", "3d"), size (octets, or
-- "512k", "50M", "1G"), list (a string or a list of strings), enum (with
-- values = { ... }). Unknown fields are errors: a typo must not pass silently.
local type, tostring, pairs, ipairs, format, tonumber = type, tostring, pairs, ipairs, string.format, tonumber

local net = require "moonpost.runtime.net"

local _M = { _VERSION = "0.1" }

-- Moonpost's own Lua files: in a checkout <root>/runtime/ and <root>/modules/,
-- installed <tree>/moonpost/. A mistake is reported at the first frame
-- outside them, which is the policy (or the spec) that made the call.
local own_prefixes
do
  local src = debug.getinfo(1, "S").source
  local file = src:sub(1, 1) == "@" and src:sub(2) or src
  local dir = file:match("^(.*)/runtime/config%.lua$")
  if dir and dir:match("/moonpost$") then
    own_prefixes = { dir .. "/" }
  elseif dir then
    own_prefixes = { dir .. "/runtime/", dir .. "/modules/" }
  else
    own_prefixes = {}
  end
end

local function is_own(source)
  if source:sub(1, 1) ~= "@" then return false end
  local file = source:sub(2)
  for _, p in ipairs(own_prefixes) do
    if file:sub(1, #p) == p then return true end
  end
  return false
end

-- where() -> "file:line: " of the first caller outside Moonpost, or "".
function _M.where()
  for level = 3, 60 do
    local info = debug.getinfo(level, "Sl")
    if not info then break end
    if info.what ~= "C" and info.currentline and info.currentline > 0 and not is_own(info.source) then
      return info.short_src .. ":" .. info.currentline .. ": "
    end
  end
  return ""
end

-- raise(msg): error at the policy's line, with no traceback position added.
function _M.raise(msg)
  error(_M.where() .. msg, 0)
end

local UNITS_T = { ms = 0.001, s = 1, m = 60, h = 3600, d = 86400, w = 604800 }
local UNITS_S = { [""] = 1, b = 1, k = 1024, kb = 1024, m = 1048576, mb = 1048576,
  g = 1073741824, gb = 1073741824 }

function _M.duration(v)
  if type(v) == "number" then return v >= 0 and v or nil end
  if type(v) ~= "string" then return nil end
  local n, u = v:match("^%s*(%d+%.?%d*)%s*(%a*)%s*$")
  n = tonumber(n)
  local mult = UNITS_T[(u or ""):lower()] or (u == "" and 1)
  if not n or not mult then return nil end
  return n * mult
end

-- days_from_civil(y, m, d) -> days from 1970-01-01 to that date of the
-- proleptic Gregorian calendar (H. Hinnant's algorithm): route schedules'
-- dates, HTTP-dates.
function _M.days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- Whole numbers (sizes, counts) are exact up to 2^53; above, a Lua number
-- is not, and the C side refuses such a limit.
local MAX_EXACT = 2 ^ 53
_M.MAX_EXACT = MAX_EXACT

function _M.size(v)
  if type(v) == "number" then
    if v > MAX_EXACT and v % 1 == 0 then return nil, "too large" end
    return (v >= 0 and v % 1 == 0) and v or nil
  end
  if type(v) ~= "string" then return nil end
  local n, u = v:match("^%s*(%d+%.?%d*)%s*(%a*)%s*$")
  n = tonumber(n)
  local mult = UNITS_S[(u or ""):lower()]
  if not n or not mult then return nil end
  n = math.floor(n * mult)
  if n > MAX_EXACT then return nil, "too large" end
  return n
end

local function show(v)
  if type(v) == "string" then return format("%q", v) end
  if type(v) == "table" or type(v) == "function" then return type(v) end
  return tostring(v)
end

local function convert(spec, v)
  local t = spec.type
  if t == "string" then
    if type(v) == "string" then return v end
    return nil, "expected a string"
  elseif t == "boolean" then
    if type(v) == "boolean" then return v end
    return nil, "expected true or false"
  elseif t == "function" then
    if type(v) == "function" then return v end
    return nil, "expected a function"
  elseif t == "table" then
    if type(v) == "table" then return v end
    return nil, "expected a table"
  elseif t == "number" then
    if type(v) == "number" then return v end
    return nil, "expected a number"
  elseif t == "posint" then
    if type(v) == "number" and v >= 1 and v % 1 == 0 then
      if v <= MAX_EXACT then return v end
      return nil, "expected a positive integer of at most 2^53"
    end
    return nil, "expected a positive integer"
  elseif t == "nonneg" then
    if type(v) == "number" and v >= 0 and v % 1 == 0 then
      if v <= MAX_EXACT then return v end
      return nil, "expected an integer >= 0 of at most 2^53"
    end
    return nil, "expected an integer >= 0"
  elseif t == "duration" then
    local d = _M.duration(v)
    if d then return d end
    return nil, "expected a duration (seconds, or like \"30s\", \"5m\", \"2h\")"
  elseif t == "size" then
    local s, big = _M.size(v)
    if s then return s end
    if big then return nil, "expected a size of at most 2^53 octets" end
    return nil, "expected a size (octets, or like \"512k\", \"50M\")"
  elseif t == "list" then
    if type(v) == "string" then return { v } end
    if type(v) == "table" then
      local out = {}
      for i, x in ipairs(v) do
        if type(x) ~= "string" then return nil, format("item %d: expected a string", i) end
        out[i] = x
      end
      if #out == 0 then return nil, "expected a string or a non-empty list of strings" end
      return out
    end
    return nil, "expected a string or a list of strings"
  elseif t == "any" then
    return v
  elseif t == "enum" then
    for _, x in ipairs(spec.values) do
      if v == x then return v end
    end
    local names = {}
    for i, x in ipairs(spec.values) do names[i] = show(x) end
    return nil, "expected one of " .. table.concat(names, ", ")
  end
  error("config: unknown schema type " .. tostring(t))
end

-- check(block, opts, schema) -> checked copy with defaults filled in.
function _M.check(block, opts, schema)
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then
    _M.raise(format("%s: options must be a table, got %s", block, show(opts)))
  end
  for k in pairs(opts) do
    if type(k) ~= "string" or not schema[k] then
      local names = {}
      for name in pairs(schema) do names[#names + 1] = name end
      table.sort(names)
      _M.raise(format("%s: unknown field '%s' (known: %s)", block, tostring(k),
        table.concat(names, ", ")))
    end
  end
  local out = {}
  for name, spec in pairs(schema) do
    local v = opts[name]
    if v == nil then
      v = spec.default
      if type(v) == "function" and spec.type ~= "function" then v = v() end
      if v == nil and spec.required then
        _M.raise(format("%s: field '%s' is required", block, name))
      end
      if v ~= nil then
        -- defaults are written like user values ("5d", "64M"): convert them too
        local c, why = convert(spec, v)
        if c == nil then error(format("%s: bad default for '%s': %s", block, name, why)) end
        v = c
      end
      out[name] = v
    else
      local c, why = convert(spec, v)
      if c == nil then
        _M.raise(format("%s: field '%s': %s, got %s", block, name, why, show(v)))
      end
      if spec.check then
        local ok, why2 = spec.check(c)
        if not ok then
          _M.raise(format("%s: field '%s': %s", block, name, why2 or "invalid value"))
        end
      end
      out[name] = c
    end
  end
  return out
end

local PERIODS = { s = 1, sec = 1, second = 1, m = 60, min = 60, minute = 60, h = 3600, hr = 3600, hour = 3600,
  d = 86400, day = 86400 }

-- rate("100/s") -> { count, per (seconds) } | nil. Also "6000/m",
-- "50000/h", "1000000/d", "100/5m", "1.5/s". Used by every block that
-- limits a rate (tenants, moonpost.shape).
function _M.rate(v)
  if type(v) ~= "string" then return nil end
  local n, mult, unit = v:match("^%s*(%d+%.?%d*)%s*/%s*(%d*%.?%d*)%s*(%a+)%s*$")
  n = tonumber(n)
  local per = PERIODS[(unit or ""):lower()]
  if not n or not per or n <= 0 then return nil end
  if mult ~= "" then
    mult = tonumber(mult)
    if not mult or mult <= 0 then return nil end
    per = per * mult
  end
  return { count = n, per = per }
end

-- Parse "host:port", "[v6]:port", ":port" or "port" -> host, port | nil, why.
function _M.parse_address(s, default_host)
  if type(s) ~= "string" then return nil, "expected host:port" end
  local host, port = s:match("^%[([%x:%.]+)%]:(%d+)$")
  if not host then host, port = s:match("^([^:%[%]]*):(%d+)$") end
  if not host and s:match("^%d+$") then host, port = "", s end
  if not host then return nil, "expected host:port or [ipv6]:port, got " .. show(s) end
  port = tonumber(port)
  if port > 65535 then return nil, "port out of range in " .. show(s) end
  if host == "" then host = default_host or "0.0.0.0" end
  -- Listeners bind addresses, not names (no DNS at start-up).
  local v4 = { host:match("^(%d+)%.(%d+)%.(%d+)%.(%d+)$") }
  if #v4 == 4 then
    for _, o in ipairs(v4) do
      -- no leading zero: the system's parser (inet_pton) refuses "01"
      if tonumber(o) > 255 or (#o > 1 and o:sub(1, 1) == "0") then
        return nil, "bad IPv4 address in " .. show(s)
      end
    end
  elseif not host:find(":", 1, true) then
    return nil, "expected an IP address, not a host name, in " .. show(s)
  elseif not net.ip(host) then
    return nil, "bad IPv6 address in " .. show(s)
  end
  return host, port
end

return _M
