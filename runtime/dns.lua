-- Asynchronous DNS for tasks, on c-ares (core/ldns.c) driven by the luv loop.
--
--   local r = dns.new { servers = "127.0.0.1:5353", timeout = 2, tries = 2 }
--   local recs, err = r:query("example.org", "MX")   -- in a task
--   local hosts, err, permanent = r:mx_hosts("example.org", { order = "ipv6" })
--   r:close()
--
-- query() returns the records of that type ({ type, name, ttl, data, pref, ... })
-- or nil and "nxdomain" | "nodata" | "timeout" | "servfail" | "refused" |
-- "error". A name in UTF-8 is looked up by its A-labels (dns.to_ascii).
-- Answers are cached for their TTL (at most max_ttl); "nxdomain" and
-- "nodata" for the SOA's negative TTL (RFC 2308; 60 s when absent).
-- Identical queries in flight are sent once. Without servers, c-ares reads
-- /etc/resolv.conf.
local uv = require "luv"
local core = require "moonpost.core.dns"
local has_8bit = require("moonpost.core.smtp").has_8bit
local sched = require "moonpost.runtime.sched"
local log = require "moonpost.runtime.log"
local net = require "moonpost.runtime.net"

local lower, random, floor, find, match = string.lower, math.random, math.floor, string.find, string.match

local _M = { _VERSION = "0.1" }

-- to_ascii(domain) -> the domain with its labels in ASCII (lower case),
-- "bücher.example" -> "xn--bcher-kva.example" | nil, err when it is not a
-- valid internationalized name. ASCII names come back lower-cased.
function _M.to_ascii(domain)
  if not has_8bit(domain) then return lower(domain) end
  return core.to_ascii(domain)
end

-- is_name(s) -> true when s is a DNS name in ASCII: labels of letters,
-- digits, '-' and '_' (selectors, SRV-style names), 1 to 63 octets each,
-- 253 in all, no final dot. (A name, not a pattern: "*.example" is not.)
function _M.is_name(s)
  if type(s) ~= "string" or #s == 0 or #s > 253 then return false end
  for label in (s .. "."):gmatch("([^.]*)%.") do
    if #label == 0 or #label > 63 or find(label, "[^%w%-_]") then return false end
  end
  return true
end

-- address_to_ascii(address) -> the address with its domain in A-labels
-- (the local part as it is: "bob@bücher.example" ->
-- "bob@xn--bcher-kva.example") | nil when the domain has no ASCII form. An
-- ASCII address comes back as it is.
function _M.address_to_ascii(address)
  if not has_8bit(address) then return address end
  local lp, domain = match(address, "^(.*)@([^@]+)$")
  if not lp then return nil end
  local ad = _M.to_ascii(domain)
  return ad and (lp .. "@" .. ad) or nil
end

local Resolver = {}
local lookup_all -- (below, beside mx_hosts)
local mt = { __index = Resolver }

local TEMPORARY = { timeout = true, servfail = true, refused = true, error = true, cancelled = true }

function _M.new(opts)
  opts = opts or {}
  local ch, err = core.channel({ servers = opts.servers, timeout = floor((opts.timeout or 2) * 1000),
    tries = opts.tries or 2 })
  if not ch then return nil, err end
  return setmetatable({
    ch = ch,
    polls = {},      -- fd -> { handle, events }
    inflight = {},   -- key -> { tasks = { task, token, ... } }
    byid = {},       -- query id -> key
    cache = {},      -- key -> { expires, records | nil, status }
    ncache = 0,
    max_cache = opts.max_cache or 100000,
    max_ttl = opts.max_ttl or 86400,
    neg_ttl = opts.neg_ttl or 60,
    stats = opts.stats or { queries = 0, hits = 0, misses = 0, sent = 0 },
    wait_limit = (opts.timeout or 2) * (opts.tries or 2) * 4 + 5,
  }, mt)
end

-- The smallest TTL of the records and of the aliases (CNAME) the answer
-- went through: when an alias expires it may point elsewhere (a negative
-- answer at the end of an alias lasts no longer than the alias either).
local function min_ttl(records, aliases, cap)
  local ttl = cap
  for _, r in ipairs(records) do
    if r.ttl < ttl then ttl = r.ttl end
  end
  for _, r in ipairs(aliases) do
    if r.ttl < ttl then ttl = r.ttl end
  end
  return ttl
end

-- The records of an answer that belong to the name asked for: those of
-- rtype owned by the name or by an alias it leads to (CNAME, followed from
-- the name), and those aliases. Records of other names (which c-ares does
-- not check) are left out: they say nothing about the name.
-- (names compared as DNS compares them: without regard to case, nor to a final dot)
local function norm(n)
  n = lower(n or "")
  return (n:gsub("%.$", ""))
end

local function relevant(all, qname, rtype)
  local records, aliases, on_chain = {}, {}, { [norm(qname)] = true }
  if rtype ~= "CNAME" then
    local owner = norm(qname)
    for _ = 1, #all do
      local next_alias
      for _, r in ipairs(all) do
        if r.type == "CNAME" and norm(r.name) == owner then
          next_alias = r
          break
        end
      end
      if not next_alias or on_chain[norm(next_alias.data)] then break end
      aliases[#aliases + 1] = next_alias
      owner = norm(next_alias.data)
      on_chain[owner] = true
    end
  end
  for _, r in ipairs(all) do
    if r.type == rtype and on_chain[norm(r.name)] then records[#records + 1] = r end
  end
  return records, aliases
end

-- Collect what c-ares finished: cache it and wake the tasks waiting.
local function harvest(self)
  for _, res in ipairs(self.ch:results()) do
    local key = self.byid[res.id]
    self.byid[res.id] = nil
    local entry = key and self.inflight[key]
    if entry then
      self.inflight[key] = nil
      local rtype = entry.rtype
      local status = res.status
      local records, aliases = relevant(res.records or {}, entry.name, rtype)
      if status == "ok" and #records == 0 then status = "nodata" end
      local now = uv.now() / 1000
      if status == "ok" then
        self:store(key, { expires = now + min_ttl(records, aliases, self.max_ttl), records = records })
      elseif status == "nxdomain" or status == "nodata" then
        local ttl = (res.neg_ttl and res.neg_ttl > 0) and res.neg_ttl or self.neg_ttl
        self:store(key, { expires = now + min_ttl(aliases, {}, math.min(ttl, self.max_ttl)), status = status })
      end
      local tasks = entry.tasks
      for i = 1, #tasks, 2 do
        sched.wake_token(tasks[i], tasks[i + 1], status == "ok" and records or nil, status ~= "ok" and status or nil)
      end
    end
  end
end

function Resolver:store(key, entry)
  if not self.cache[key] then
    self.ncache = self.ncache + 1
    if self.ncache > self.max_cache then
      -- simple and bounded: start over
      self.cache, self.ncache = {}, 1
    end
  end
  self.cache[key] = entry
end

-- Watch the sockets c-ares wants, and its timeout.
local function pump(self)
  -- sockets c-ares closed: stop watching, then let them really close
  for _, fd in ipairs(self.ch:graveyard()) do
    local p = self.polls[fd]
    if p then
      p.handle:stop()
      if not p.handle:is_closing() then p.handle:close() end
      self.polls[fd] = nil
    end
  end
  self.ch:bury()
  local want = {}
  for _, s in ipairs(self.ch:getsock()) do
    local fd, r, w = s[1], s[2], s[3]
    local events = (r and "r" or "") .. (w and "w" or "")
    want[fd] = true
    local p = self.polls[fd]
    if not p then
      local h = uv.new_socket_poll(fd)
      p = { handle = h }
      self.polls[fd] = p
    end
    if p.events ~= events then
      p.events = events
      p.handle:start(events, function(err, ev)
        local ok, e = pcall(function()
          if err then
            -- libuv reports POLLERR (a UDP socket's pending ICMP error) as
            -- EBADF and stops the handle: let c-ares read the error, and
            -- start watching again if it keeps the socket. (luv's poll
            -- callback itself prints "EBADF: bad file descriptor" to stderr
            -- before calling this, src/poll.c; nothing here can stop it.)
            p.events = ""
            self.ch:process(fd, true, true)
          else
            self.ch:process(fd, ev and ev:find("r", 1, true) ~= nil, ev and ev:find("w", 1, true) ~= nil)
          end
          harvest(self)
          -- (a task that harvest woke may have closed the resolver)
          if not self.closed then pump(self) end
        end)
        if not ok then log.error("dns: %s", tostring(e)) end
      end)
    end
  end
  -- Stopped, not closed: libuv allows one poll handle per fd, and c-ares
  -- reuses its sockets (a closing handle would block a new one on the fd).
  for fd, p in pairs(self.polls) do
    if not want[fd] and p.events ~= "" then
      p.handle:stop()
      p.events = ""
    end
  end
  local t = self.ch:timeout()
  if t then
    if not self.timer then
      self.timer = uv.new_timer()
    end
    self.timer:start(math.max(1, floor(t * 1000)), 0, function()
      local ok, e = pcall(function()
        self.ch:process(-1)
        harvest(self)
        if not self.closed then pump(self) end
      end)
      if not ok then log.error("dns: %s", tostring(e)) end
    end)
  elseif self.timer then
    self.timer:stop()
  end
end

-- query(name, type) -> records | nil, status. In a task.
local TYPES = { A = true, AAAA = true, MX = true, TXT = true, PTR = true, CNAME = true, NS = true, TLSA = true }

function Resolver:query(name, rtype)
  name = lower(name):gsub("%.$", "")
  -- an internationalized name is looked up by its A-labels (RFC 5890); one
  -- that has none (not valid IDNA2008) cannot exist
  if find(name, "[\128-\255]") then
    local a = core.to_ascii(name)
    if not a then return nil, "nxdomain" end
    name = a
  end
  rtype = rtype:upper()
  if not TYPES[rtype] then error("dns: cannot query records of type " .. tostring(rtype), 2) end
  local key = rtype .. " " .. name
  self.stats.queries = self.stats.queries + 1
  local c = self.cache[key]
  if c then
    if c.expires > uv.now() / 1000 then
      self.stats.hits = self.stats.hits + 1
      if c.records then return c.records end
      return nil, c.status
    end
    self.cache[key] = nil
    self.ncache = self.ncache - 1
  end
  self.stats.misses = self.stats.misses + 1
  if self.closed then return nil, "cancelled" end
  local task, token = sched.reserve()
  local entry = self.inflight[key]
  if entry then
    entry.tasks[#entry.tasks + 1] = task
    entry.tasks[#entry.tasks + 1] = token
  else
    entry = { rtype = rtype, name = name, tasks = { task, token } }
    self.inflight[key] = entry
    local id = self.ch:query(name, rtype)
    self.stats.sent = self.stats.sent + 1
    self.byid[id] = key
    harvest(self) -- c-ares may have answered at once (e.g. a bad name)
    pump(self)
  end
  local records, status = sched.wait(self.wait_limit)
  if status == "timeout" and records == nil then return nil, "timeout" end
  return records, status
end

local function harvest_closed(self)
  for key, entry in pairs(self.inflight) do
    local tasks = entry.tasks
    for i = 1, #tasks, 2 do sched.wake_token(tasks[i], tasks[i + 1], nil, "cancelled") end
    self.inflight[key] = nil
  end
end

function Resolver:close()
  self.closed = true
  for _, p in pairs(self.polls) do
    p.handle:stop()
    if not p.handle:is_closing() then p.handle:close() end
  end
  self.polls = {}
  if self.timer then
    if not self.timer:is_closing() then self.timer:close() end
    self.timer = nil
  end
  self.ch:close() -- pending queries complete as "cancelled"; sockets close after the polls
  harvest_closed(self)
end

-- ---- MX (RFC 5321 5.1) --------------------------------------------------------------------

local function shuffle(list)
  for i = #list, 2, -1 do
    local j = random(i)
    list[i], list[j] = list[j], list[i]
  end
end

-- addresses(name, order) -> list of IP strings | nil, status.
-- order: "ipv6" (AAAA first), "ipv4" (A first), "ipv4-only", "ipv6-only".
local KINDS = { ipv4 = { "A", "AAAA" }, ["ipv4-only"] = { "A" }, ["ipv6-only"] = { "AAAA" } }
local KINDS_DEFAULT = { "AAAA", "A" }

function Resolver:addresses(name, order)
  local kinds = KINDS[order] or KINDS_DEFAULT
  local out, temp, nx = {}, nil, 0
  for _, k in ipairs(kinds) do
    local recs, err = self:query(name, k)
    if recs then
      for _, r in ipairs(recs) do out[#out + 1] = r.data end
    elseif err == "nxdomain" then
      nx = nx + 1
    elseif TEMPORARY[err] then
      temp = err
    end
  end
  if #out > 0 then return out end
  if temp then return nil, temp end
  return nil, nx > 0 and "nxdomain" or "nodata"
end

-- literal(domain) -> address, "ipv4" | "ipv6" for an address literal
-- (RFC 5321 4.1.3: "[192.0.2.1]", "[IPv6:2001:db8::1]"); false, reason
-- for one that names no address we can reach (a general address literal,
-- "[tag:...]"); nil when the domain is not an address literal.
function _M.literal(domain)
  local inner = domain:match("^%[(.*)%]$")
  if not inner then return nil end
  local v6 = inner:match("^[Ii][Pp][Vv]6:(.*)$")
  if v6 then
    if find(v6, ":", 1, true) and not find(v6, "%", 1, true) and net.ip(v6) then return v6, "ipv6" end
  elseif inner:match("^%d+%.%d+%.%d+%.%d+$") and net.ip(inner) then
    return inner, "ipv4"
  end
  return false, "5.1.2 " .. domain .. " is not an IPv4 or IPv6 address literal (RFC 5321 4.1.3)"
end

local ONLY = { ["ipv4-only"] = "ipv4", ["ipv6-only"] = "ipv6" }

-- mx_hosts(domain, opts) -> { { name, pref, addrs } ... } | nil, reason, permanent.
-- Preference order, random within a preference; no MX: the domain itself
-- (implicit MX); a null MX (RFC 7505) or a domain that does not exist is
-- permanent; anything else that fails is temporary. An address literal is
-- its own host, without DNS (RFC 5321 5.1): { name = domain, pref = 0,
-- addrs = { address }, literal = true }.
-- lookup_all(resolver, mxs, order) -> { [i] = { addrs, err } } for the MX
-- hosts that name a host (an address is not looked up): one task per host,
-- all at once, the caller waiting for the last.
-- (every record addresses() would ask for is in the cache: it answers at once)
local function cached(self, name, order)
  local now = uv.now() / 1000
  for _, k in ipairs(KINDS[order] or KINDS_DEFAULT) do
    local c = self.cache[k .. " " .. name]
    if not c or c.expires <= now then return false end
  end
  return true
end

function lookup_all(self, mxs, order)
  local found, names = {}, {}
  for i, mx in ipairs(mxs) do
    found[i] = {}
    if mx.implicit or not net.ip(mx.name) then
      -- MX host names are lower case, without the final dot: the cache's keys.
      -- Those in the cache need no task of their own.
      if cached(self, mx.name, order) then
        found[i][1], found[i][2] = self:addresses(mx.name, order)
      else
        names[#names + 1] = i
      end
    end
  end
  if #names == 1 then
    local i = names[1]
    found[i][1], found[i][2] = self:addresses(mxs[i].name, order)
    return found
  end
  if #names == 0 then return found end
  local task, token = sched.reserve()
  local pending = #names
  for _, i in ipairs(names) do
    sched.spawn(function()
      local ok, a, e = pcall(self.addresses, self, mxs[i].name, order)
      if ok then found[i][1], found[i][2] = a, e else found[i][2] = "error" end
      pending = pending - 1
      if pending == 0 then sched.wake_token(task, token, true) end
    end)
  end
  sched.wait()
  return found
end

function Resolver:mx_hosts(domain, opts)
  opts = opts or {}
  local addr, family = _M.literal(domain)
  if addr then
    local only = ONLY[opts.order]
    if only and only ~= family then
      return nil, "5.4.4 " .. domain .. " is an " .. (family == "ipv6" and "IPv6" or "IPv4")
        .. " address, and the order is " .. opts.order, true
    end
    return { { name = domain, pref = 0, addrs = { addr }, literal = true } }
  elseif addr == false then
    return nil, family, true
  end
  local recs, err = self:query(domain, "MX")
  local mxs
  if recs then
    if #recs == 1 and recs[1].data == "" then
      return nil, "5.1.10 " .. domain .. " has a null MX: it accepts no mail (RFC 7505)", true
    end
    local bypref, prefs = {}, {}
    for _, r in ipairs(recs) do
      if r.data ~= "" then
        local l = bypref[r.pref]
        if not l then
          l = {}
          bypref[r.pref] = l
          prefs[#prefs + 1] = r.pref
        end
        l[#l + 1] = r.data
      end
    end
    table.sort(prefs)
    mxs = {}
    for _, p in ipairs(prefs) do
      shuffle(bypref[p])
      for _, name in ipairs(bypref[p]) do mxs[#mxs + 1] = { name = name, pref = p } end
    end
  elseif err == "nodata" then
    -- named as the DNS names it (A-labels, lower case), as MX hosts are: the
    -- site, and the name for TLS, whatever the form the recipient wrote
    mxs = { { name = _M.to_ascii(domain) or lower(domain), pref = 0, implicit = true } }
  elseif err == "nxdomain" then
    return nil, "5.1.2 " .. domain .. " does not exist", true
  else
    return nil, "4.4.3 MX lookup for " .. domain .. " failed: " .. tostring(err), false
  end
  local out, temp, numeric = {}, nil, 0
  -- the hosts' addresses, looked up all at once: one after another, a
  -- domain with many MX hosts whose servers time out kept a delivery for
  -- minutes (each lookup waits up to its timeout and tries)
  local found = lookup_all(self, mxs, opts.order)
  for i, mx in ipairs(mxs) do
    local addrs, aerr
    if not mx.implicit and net.ip(mx.name) then
      -- "MX 10 192.0.2.1.": an MX names a host, never an address (RFC
      -- 5321 5.1); no lookup, which would only fail, again at every retry
      numeric = numeric + 1
      log.info("dns: %s: MX %s is an IP address, not a host name", domain, mx.name)
    else
      addrs, aerr = found[i][1], found[i][2]
      if addrs then
        mx.addrs = addrs
        out[#out + 1] = mx
      elseif TEMPORARY[aerr] then
        temp = aerr
      else
        log.info("dns: %s: MX %s has no address (%s)", domain, mx.name, tostring(aerr))
      end
    end
  end
  if #out > 0 then return out end
  if temp then return nil, "4.4.3 address lookup for the MX of " .. domain .. " failed: " .. temp, false end
  if mxs[1] and mxs[1].implicit then
    return nil, "5.1.2 " .. domain .. " has no MX and no address", true
  end
  if numeric == #mxs then
    return nil, "5.4.4 the MX of " .. domain .. " is an IP address, not a host name (RFC 5321 5.1)", true
  end
  return nil, "5.4.4 no MX host of " .. domain .. " has an address", true
end

-- ---- the process-wide resolver ------------------------------------------------------------

local default, default_opts

-- The counters of the process's resolver, kept across its re-creation (each
-- start of an MTA configures a new one); the metrics read them.
local totals = { queries = 0, hits = 0, misses = 0, sent = 0 }
_M.totals = totals

function _M.configure(opts)
  default_opts = opts
  if default then
    default:close()
    default = nil
  end
end

function _M.default()
  if not default or default.closed then
    local o = { stats = totals }
    for k, v in pairs(default_opts or {}) do o[k] = v end
    local r, err = _M.new(o)
    if not r then error(err, 2) end
    default = r
  end
  return default
end

function _M.shutdown()
  if default then
    default:close()
    default = nil
  end
end

return _M
