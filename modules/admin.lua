-- moonpost.admin: the operator's JSON API under /api/v1 on the HTTP
-- listener (docs/http-api.md). moonpost.new installs it as a block named
-- "admin" whenever `http` is set, so a policy does nothing to get it; a
-- policy reload hands its state (suspensions, purges in progress) to the
-- new MTA's.
--
--   POST   /api/v1/messages             inject (raw content or structured parts) -> ids
--   GET    /api/v1/messages/:id         one queued message: envelope, recipients, headers
--   GET    /api/v1/queues               per tenant@domain and per site: depth, oldest, last error
--   POST   /api/v1/suspend, /resume     hold mail by tenant, domain and/or site; let it go
--   GET    /api/v1/suspensions
--   POST   /api/v1/bounce               purge queued recipients by filter, with or without DSNs
--   GET/POST/DELETE /api/v1/suppressions, GET /api/v1/suppressions/export (moonpost.suppress)
--   POST   /api/v1/reload
--
-- Suspensions and purges act in the queue through a delivery filter that
-- runs before every attempt: a suspended recipient gets a "held" result
-- (no attempt counted; the message waits parked until resume), a purged
-- one a "bounced" result (with or without a DSN). Site suspensions are
-- checked by route.smtp once it knows the site (mta.site_hold).
local uv = require "luv"
local cjson = require "cjson.safe"
local config = require "moonpost.runtime.config"
local log = require "moonpost.runtime.log"
local fs = require "moonpost.runtime.fs"
local sched = require "moonpost.runtime.sched"
local ids = require "moonpost.runtime.ids"
local fifo = require "moonpost.runtime.fifo"
local tnew = require "table.new"
local spool_mod = require "moonpost.runtime.spool"

-- a message's entry: array slots (moonpost.runtime.spool)
local ID, ATTEMPTS, NEXT, LEN = spool_mod.ID, spool_mod.ATTEMPTS, spool_mod.NEXT, spool_mod.LEN
local mime = require "moonpost.runtime.mime"
local headers = require "moonpost.runtime.headers"
local smtp = require "moonpost.core.smtp"
local server = require "moonpost.runtime.server"

local type, tostring, tonumber, pairs, ipairs, next = type, tostring, tonumber, pairs, ipairs, next
local format, concat, lower, find, sub, gsub = string.format, table.concat, string.lower, string.find,
  string.sub, string.gsub
local null = cjson.null

local _M = { _VERSION = "0.1" }

local Admin = {}
local mt = { __index = Admin }

local MAX_RECIPIENTS = 1000   -- per injected message
local MAX_BATCH = 1000        -- messages per injection request
local LAST_RESULTS = 10000    -- messages whose recipients' last results are kept for inspection
local PURGE_WAIT = 10         -- seconds a purge waits for its bounces before it answers
local BODY_MAX = 1048576      -- octets of body an inspection returns by default (?body_max=)
local BODY_MAX_LIMIT = 16777216 -- the most it returns

-- ---- JSON answers --------------------------------------------------------------------------

-- cjson 2.1.0 writes an empty table as {}: lists go through list(), which
-- marks an empty one so that it comes out as [].
local EMPTY_KEY = "\1[]"
local EMPTY_JSON = cjson.encode({ [EMPTY_KEY] = true })
local EMPTY_PATTERN = gsub(EMPTY_JSON, "[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0")
local JSON_HEADERS = { ["content-type"] = "application/json" }

local function list(t)
  if next(t) == nil then return { [EMPTY_KEY] = true } end
  return t
end

-- Every string as well-formed UTF-8 (JSON must be): a remote server's
-- reply or a message's header field may hold any octets.
local function clean(v, seen)
  if type(v) == "string" then return log.utf8_clean(v) end
  if type(v) ~= "table" or seen[v] then return v end
  seen[v] = true
  local out = setmetatable({}, getmetatable(v))
  for k, x in pairs(v) do out[clean(k, seen)] = clean(x, seen) end
  return out
end

-- encode(body [, valid]): with valid, the caller has made every string in
-- body well-formed UTF-8 already, and the encoded text is not checked again
-- (a pure-Lua pass over it: seconds for a large 8-bit message body).
local function encode(body, valid)
  local s = cjson.encode(body)
  if s and not valid and not mime.utf8_valid(s) then s = cjson.encode(clean(body, {})) end
  return (gsub(s, EMPTY_PATTERN, "[]"))
end
_M.encode = encode

local function answer(status, body, valid)
  return status, encode(body, valid), JSON_HEADERS
end

local function fail(status, why)
  return answer(status, { error = why })
end

-- The request body as an object: value | nil, why
local function body_object(req)
  local v, err = req.json()
  if v == nil then return nil, err end
  if type(v) ~= "table" or v[1] ~= nil then return nil, "expected a JSON object" end
  return v
end

local function opt(v)
  if v == null then return nil end
  return v
end

local function get_string(o, k, allow_empty)
  local v = opt(o[k])
  if v == nil then return nil end
  if type(v) ~= "string" then return nil, format("%s: expected a string, got %s", k, type(v)) end
  if v == "" and not allow_empty then return nil, k .. ": must not be empty" end
  return v
end

local function check_fields(o, known, where)
  for k in pairs(o) do
    if not known[k] then
      local names = {}
      for n in pairs(known) do names[#names + 1] = n end
      table.sort(names)
      return nil, format("%sunknown field '%s' (known: %s)", where or "", tostring(k), concat(names, ", "))
    end
  end
  return true
end

local function iso(t)
  return os.date("!%Y-%m-%dT%H:%M:%SZ", t)
end

-- ---- the block -------------------------------------------------------------------------------

-- install(mta) -> the block (also mta.admin): the routes, the delivery
-- filter and the handlers of the delivery events; once per MTA.
function _M.install(mta)
  if mta.admin then return mta.admin end
  local self = setmetatable({
    name = "admin",
    susp = {},        -- suspensions: { key, tenant, domain, site, since, reason, waiting = { {id, resume} } }
    marks = {},       -- message id (hex) -> { [rcpt index] = { res = result, op = purge } }
    last = {},        -- message id (hex) -> { [rcpt index] = last result }
    last_order = fifo.new(),
    sites = {},       -- site -> { delivered, deferred, bounced, last_error, last_error_at }
    on = {},
  }, mt)
  for _, status in ipairs({ "delivered", "deferred", "bounced", "suppressed" }) do
    self.on["delivery_" .. status] = function(env, r, res) self:record(status, env, r, res) end
  end
  mta:use(self)
  return self
end

-- The block's side (mta:use, start_blocks, a reload's handover).
function Admin:attach(mta)
  self.mta = mta
  mta.admin = self
  mta:add_delivery_filter(function(env, rcpt) return self:filter(env, rcpt) end)
  mta.site_hold = function(site, env, domain) return self:site_hold(site, env, domain) end
  self:routes()
end

function Admin:start()
  if not self.loaded then
    self.loaded = true
    self:load_suspensions()
  end
  return true
end

-- A reload: the new MTA's admin carries on with the running one's state
-- (the queue, and the messages the suspensions hold, carry on too).
function Admin:handover(old)
  self.susp, self.marks, self.sites = old.susp, old.marks, old.sites
  self.last, self.last_order = old.last, old.last_order
  self.loaded = true
  return true
end

-- An admin action for the logs and, when the policy keeps one, the event log.
function Admin:action(req, what, fields)
  local parts = {}
  for k, v in pairs(fields) do
    if type(v) ~= "table" then parts[#parts + 1] = k .. "=" .. tostring(v) end
  end
  table.sort(parts)
  log.info("admin: %s %s (client %s)", what, concat(parts, " "), tostring(req and req.remote))
  local mta = self.mta
  if mta.event_log then
    local ev = { type = "AdminAction", action = what, by = "http", client = req and req.remote }
    for k, v in pairs(fields) do ev[k] = v end
    local ok, err = pcall(mta.event_log, mta, ev)
    if not ok then log.error("admin: event log: %s", tostring(err)) end
  end
end

-- ---- delivery results, kept for inspection and the per-site summary ---------------------------

function Admin:record(status, env, r, res)
  local id = env.id
  if id then
    local per = self.last[id]
    if not per then
      per = tnew(r.index, 0) -- (by recipient index: sized, or its first is a rehash)
      self.last[id] = per
      local order = self.last_order
      fifo.push(order, id)
      if fifo.len(order) > LAST_RESULTS then self.last[fifo.pop(order)] = nil end
    end
    per[r.index] = { status = status, code = res.code, enhanced = res.enhanced, text = res.text and tostring(res.text),
      host = res.host, class = res.class, time = os.time() }
  end
  local site = res.site
  if site then
    local s = self.sites[site]
    if not s then
      s = { delivered = 0, deferred = 0, bounced = 0, suppressed = 0 }
      self.sites[site] = s
    end
    s[status] = (s[status] or 0) + 1
    if status ~= "delivered" then
      s.last_error = (res.code and (res.code .. " ") or "") .. (res.enhanced and (res.enhanced .. " ") or "")
        .. tostring(res.text)
      s.last_error_at = os.time()
    end
  end
end

-- ---- the delivery filter: purges, then suspensions ------------------------------------------

-- The queue parks the message at the end of its attempt, which may wait
-- (other recipients go to a transport): a suspension that ended meanwhile
-- lets it go at once.
local function hold(s, env)
  return { status = "held", text = "suspended by the administrator (" .. s.key .. ")",
    park = function(resume)
      if s.ended then return resume() end
      s.waiting[#s.waiting + 1] = { id = env.id, resume = resume }
    end }
end

function Admin:filter(env, rcpt)
  local marks = self.marks[env.id]
  if marks then
    local mk = marks[rcpt.index]
    if mk then
      marks[rcpt.index] = nil
      if next(marks) == nil then self.marks[env.id] = nil end
      mk.op.done = mk.op.done + 1
      return mk.res
    end
  end
  local susp = self.susp
  if #susp == 0 then return nil end
  local tenant, domain = env.tenant or "", lower(rcpt.domain)
  for _, s in ipairs(susp) do
    if not s.site and (not s.tenant or s.tenant == tenant) and (not s.domain or s.domain == domain) then
      return hold(s, env)
    end
  end
  return nil
end

-- route.smtp asks once it knows the site of a delivery
function Admin:site_hold(site, env, domain)
  local susp = self.susp
  if #susp == 0 then return nil end
  local tenant = env.tenant or ""
  domain = lower(domain or "")
  for _, s in ipairs(susp) do
    if s.site == site and (not s.tenant or s.tenant == tenant) and (not s.domain or s.domain == domain) then
      return hold(s, env)
    end
  end
  return nil
end

-- ---- suspensions ---------------------------------------------------------------------------------

-- A value with a space, a quote or an equals sign is quoted, so that the key
-- names one suspension: tenant "a site=b" is not tenant "a" on site "b".
local function key_value(v)
  if v == "" or v:find('[%s"=\\]') then return '"' .. v:gsub('[\\"]', "\\%0") .. '"' end
  return v
end

local function susp_key(tenant, domain, site)
  local parts = {}
  if tenant then parts[#parts + 1] = "tenant=" .. key_value(tenant) end
  if domain then parts[#parts + 1] = "domain=" .. key_value(domain) end
  if site then parts[#parts + 1] = "site=" .. key_value(site) end
  return concat(parts, " ")
end

-- The messages still parked by a suspension (entries whose resume is the
-- queue's current one for that message); drops the others.
function Admin:held_by(s)
  local q, sp = self.mta.queue, self.mta.spool
  local live = {}
  for _, w in ipairs(s.waiting) do
    local m = q and sp and sp:get(ids.number(w.id))
    if m and q.parked[m] == w.resume then live[#live + 1] = w end
  end
  s.waiting = live
  return live
end

function Admin:state_path()
  local so = self.mta.opts.spool
  return so and (so.dir .. "/admin-suspensions.json") or nil
end

-- Suspensions outlive a restart: they are kept beside the spool.
function Admin:save_suspensions()
  local path = self:state_path()
  if not path then return true end
  local out = {}
  for i, s in ipairs(self.susp) do
    out[i] = { tenant = s.tenant, domain = s.domain, site = s.site, since = s.since, reason = s.reason }
  end
  -- durable before the API says so (the handler runs in a task)
  return fs.replace(path, _M.encode({ suspensions = list(out) }) .. "\n")
end

function Admin:load_suspensions()
  local path = self:state_path()
  if not path then return end
  local f = io.open(path, "rb")
  if not f then return end
  local data = f:read("*a")
  f:close()
  local t = cjson.decode(data)
  if type(t) ~= "table" or type(t.suspensions) ~= "table" then
    log.error("admin: %s: unreadable; no suspensions restored", path)
    return
  end
  for _, s in ipairs(t.suspensions) do
    local tenant, domain, site = opt(s.tenant), opt(s.domain), opt(s.site)
    if tenant or domain or site then
      self.susp[#self.susp + 1] = { key = susp_key(tenant, domain, site), tenant = tenant, domain = domain,
        site = site, since = tonumber(opt(s.since)) or os.time(), reason = opt(s.reason), waiting = {} }
    end
  end
  if #self.susp > 0 then log.warn("admin: %d suspensions restored from %s", #self.susp, path) end
end

-- { tenant, domain, site, reason } of a request body -> that table | nil, err
local function susp_fields(o, allow_all)
  local known = { tenant = true, domain = true, site = true, reason = true }
  if allow_all then known.all = true end
  local ok, err = check_fields(o, known)
  if not ok then return nil, err end
  local out = {}
  for _, k in ipairs({ "tenant", "domain", "site", "reason" }) do
    out[k], err = get_string(o, k, k == "tenant")
    if err then return nil, err end
  end
  if out.domain then out.domain = lower(out.domain) end
  if allow_all and opt(o.all) ~= nil and type(opt(o.all)) ~= "boolean" then
    return nil, "all: expected true or false"
  end
  out.all = opt(o.all) == true
  return out
end

function Admin:suspension_json(s)
  return { key = s.key, tenant = s.tenant, domain = s.domain, site = s.site, since = s.since,
    since_iso = iso(s.since), reason = s.reason, held = #self:held_by(s) }
end

function Admin:api_suspend(req)
  local o, err = body_object(req)
  if not o then return fail(400, err) end
  local sf
  sf, err = susp_fields(o)
  if not sf then return fail(400, err) end
  local tenant, domain, site, reason = sf.tenant, sf.domain, sf.site, sf.reason
  if tenant == nil and domain == nil and site == nil then return fail(400, "give tenant, domain and/or site") end
  local key = susp_key(tenant, domain, site)
  for _, s in ipairs(self.susp) do
    if s.key == key then return answer(200, { suspended = self:suspension_json(s), existing = true }) end
  end
  local s = { key = key, tenant = tenant, domain = domain, site = site, since = os.time(), reason = reason,
    waiting = {} }
  self.susp[#self.susp + 1] = s
  local ok, serr = self:save_suspensions()
  if not ok then log.error("admin: cannot save the suspensions: %s", tostring(serr)) end
  self:action(req, "suspend", { tenant = tenant, domain = domain, site = site, reason = reason })
  return answer(200, { suspended = self:suspension_json(s), existing = false })
end

function Admin:api_resume(req)
  local o, err = body_object(req)
  if not o then return fail(400, err) end
  local sf
  sf, err = susp_fields(o, true)
  if not sf then return fail(400, err) end
  if sf.tenant == nil and sf.domain == nil and sf.site == nil and not sf.all then
    return fail(400, "give tenant, domain and/or site as suspended, or all = true")
  end
  local key = susp_key(sf.tenant, sf.domain, sf.site)
  local keep, gone = {}, {}
  for _, s in ipairs(self.susp) do
    if sf.all or s.key == key then gone[#gone + 1] = s else keep[#keep + 1] = s end
  end
  if #gone == 0 then return fail(404, "no such suspension: " .. key) end
  self.susp = keep
  local ok, serr = self:save_suspensions()
  if not ok then log.error("admin: cannot save the suspensions: %s", tostring(serr)) end
  -- the held messages come back at once (a stale resume does nothing)
  local released, keys = 0, {}
  for _, s in ipairs(gone) do
    s.ended = true
    keys[#keys + 1] = s.key
    for _, w in ipairs(self:held_by(s)) do
      released = released + 1
      w.resume()
    end
    s.waiting = {}
  end
  self:action(req, "resume", { keys = concat(keys, "; "), released = released })
  return answer(200, { resumed = keys, released = released })
end

function Admin:api_suspensions()
  local out = {}
  for i, s in ipairs(self.susp) do out[i] = self:suspension_json(s) end
  return answer(200, { suspensions = list(out) })
end

-- ---- queues ------------------------------------------------------------------------------------

function Admin:api_queues(req)
  local mta = self.mta
  local q = req.query
  local tf = q.tenant
  local df = q.domain and lower(q.domain)
  local sf = q.site
  local queues = {}
  local now = os.time()
  for _, e in ipairs(mta:queues()) do
    local unread = e.key == "?"
    if (not tf or e.tenant == tf) and (not df or e.domain == df) and (not unread or (not tf and not df)) then
      queues[#queues + 1] = { tenant = e.tenant, domain = e.domain, depth = e.depth, oldest = e.oldest,
        last_error = e.last_error, last_error_at = e.last_error_at,
        last_error_age = e.last_error_at and (now - e.last_error_at) or nil,
        active = e.active, set_aside = e.set_aside, unread = unread or nil }
    end
  end
  -- sites: what the shaper knows of its ready queues, and the outcomes seen
  local sites, by_site = {}, {}
  local function site_entry(name)
    local s = by_site[name]
    if not s then
      s = { site = name, sources = {}, inflight = 0, parked = 0 }
      by_site[name] = s
      sites[#sites + 1] = s
    end
    return s
  end
  local shaper = mta.shaper
  local gates = {}
  if shaper then
    local names = {}
    for key in pairs(shaper.gates) do names[#names + 1] = key end
    table.sort(names)
    local state = shaper:state()
    for _, key in ipairs(names) do
      local g = state[key]
      local kind, name = key:match("^(%a+):(.*)$")
      local entry = { key = key, kind = kind, name = name, inflight = g.inflight, parked = g.parked,
        max_connections = g.max_connections ~= math.huge and g.max_connections or nil,
        suspended_for = g.suspended_for > 0 and g.suspended_for or nil,
        slowed_for = g.slowed_for > 0 and g.slowed_for or nil,
        bouncing_for = g.bouncing_for > 0 and g.bouncing_for or nil }
      gates[#gates + 1] = entry
      if kind == "ready" then
        local src, site = name:match("^(.-)>(.*)$")
        if site then
          local s = site_entry(site)
          s.sources[#s.sources + 1] = src
          s.inflight = s.inflight + g.inflight
          s.parked = s.parked + g.parked
          if g.suspended_for > 0 then
            s.shaping_suspended_for = math.max(s.shaping_suspended_for or 0, g.suspended_for)
          end
          if g.slowed_for > 0 then s.slowed_for = math.max(s.slowed_for or 0, g.slowed_for) end
          if g.bouncing_for > 0 then s.bouncing_for = math.max(s.bouncing_for or 0, g.bouncing_for) end
        end
      end
    end
  end
  for name, st in pairs(self.sites) do
    local s = site_entry(name)
    s.delivered, s.deferred, s.bounced = st.delivered, st.deferred, st.bounced
    s.last_error, s.last_error_at = st.last_error, st.last_error_at
  end
  for _, su in ipairs(self.susp) do
    if su.site then
      local s = site_entry(su.site)
      s.suspended = true
      s.held = (s.held or 0) + #self:held_by(su)
    end
  end
  local out_sites = {}
  for _, s in ipairs(sites) do
    if not sf or s.site == sf then
      s.sources = list(s.sources)
      out_sites[#out_sites + 1] = s
    end
  end
  table.sort(out_sites, function(a, b) return a.site < b.site end)
  local susp = {}
  for i, s in ipairs(self.susp) do susp[i] = self:suspension_json(s) end
  local sp = mta.spool
  return answer(200, {
    messages = sp and sp:count() or 0,
    queues = list(queues),
    sites = list(out_sites),
    gates = list(gates),
    suspensions = list(susp),
  })
end

-- ---- inject --------------------------------------------------------------------------------------

local INJECT_FIELDS = { from = true, to = true, tenant = true, pool = true, content = true, subject = true,
  text = true, html = true, headers = true, from_header = true, to_header = true, attachments = true,
  envid = true, ret = true, notify = true }
local STRUCTURED = { "subject", "text", "html", "headers", "from_header", "to_header", "attachments" }

-- RFC 3461 xtext of a plain string
local function xtext(s)
  return (gsub(s, "[^!-*,-<>-~]", function(c) return format("+%02X", c:byte()) end))
end

-- NOTIFY (RFC 3461 4.1): NEVER alone, or one or more of SUCCESS, FAILURE,
-- DELAY, each once; as a string "SUCCESS,FAILURE" or a list of them
local function check_notify(v)
  if v == nil then return nil end
  local expected = "notify: expected \"NEVER\" or one or more of SUCCESS, FAILURE, DELAY"
  if type(v) == "table" then
    if next(v) == nil then return nil, expected .. ", got an empty list" end
    local n = 0
    for _, w in pairs(v) do
      n = n + 1
      if type(w) ~= "string" then return nil, expected .. " (a list of strings)" end
    end
    if n ~= #v then return nil, expected .. " (a list of strings)" end
    v = concat(v, ",")
  end
  if type(v) ~= "string" then return nil, expected end
  local up = v:upper():gsub("%s", "")
  if up == "NEVER" then return up end
  local seen, n = {}, 0
  for w in (up .. ","):gmatch("([^,]*),") do
    if (w ~= "SUCCESS" and w ~= "FAILURE" and w ~= "DELAY") or seen[w] then
      return nil, expected .. ", got " .. format("%q", v)
    end
    seen[w] = true
    n = n + 1
  end
  if n == 0 then return nil, expected .. ", got " .. format("%q", v) end
  return up
end

-- the pool named by an injection, checked against route.smtp's pools
function Admin:check_pool(pool, tenant)
  for _, b in ipairs(self.mta.blocks or {}) do
    if b.name == "route.smtp" and b.egress and next(b.egress) then
      local p = b.egress[pool]
      if p then
        if p.tenants and not (tenant and p.tenants[tenant]) then
          return nil, format("pool: %s is not a pool this tenant may use", pool)
        end
        return true
      end
      for _, any in pairs(b.egress) do
        for _, src in ipairs(any.sources or {}) do
          if src.name == pool and (not any.tenants or (tenant and any.tenants[tenant])) then return true end
        end
      end
      return nil, format("pool: no pool or source named %s for this sender", pool)
    end
  end
  return nil, "pool: the policy has no route.smtp pools"
end

-- prepare(o) -> job | nil, status, why: a checked message, not stored yet
function Admin:prepare(o)
  local mta = self.mta
  if type(o) ~= "table" or o[1] ~= nil then return nil, 400, "expected a message object" end
  local ok, err = check_fields(o, INJECT_FIELDS)
  if not ok then return nil, 400, err end
  local from
  from, err = get_string(o, "from", true)
  if err then return nil, 400, err end
  if from == nil then return nil, 400, "from: required (the envelope sender; \"\" for the null sender)" end
  local sender, code, _, detail = smtp.parse_path("FROM:<" .. from .. ">", "mail")
  if not sender or next(sender.params) then
    return nil, 400, format("from: bad address %q%s", from, sender and "" or (": " .. tostring(detail or code)))
  end
  local to = opt(o.to)
  if type(to) == "string" then to = { to } end
  if type(to) ~= "table" or #to == 0 then return nil, 400, "to: required: an address or a list of them" end
  if #to > MAX_RECIPIENTS then return nil, 400, format("to: more than %d recipients", MAX_RECIPIENTS) end
  local notify
  notify, err = check_notify(opt(o.notify))
  if err then return nil, 400, err end
  local utf8 = sender.utf8 or false
  local rcpts = {}
  for i, a in ipairs(to) do
    if type(a) ~= "string" then return nil, 400, format("to item %d: expected a string", i) end
    local r
    r, code, _, detail = smtp.parse_path("TO:<" .. a .. ">", "rcpt")
    if not r or next(r.params) then
      return nil, 400, format("to item %d: bad address %q%s", i, a, r and "" or (": " .. tostring(detail or code)))
    end
    if r.utf8 then utf8 = true end
    r.notify = notify
    rcpts[i] = r
  end
  local tenant
  tenant, err = get_string(o, "tenant")
  if err then return nil, 400, err end
  if tenant and not mta.tenants:get(tenant) then
    return nil, 400, format("tenant: unknown tenant '%s'", tenant)
  end
  local pool
  pool, err = get_string(o, "pool")
  if err then return nil, 400, err end
  if pool then
    ok, err = self:check_pool(pool, tenant)
    if not ok then return nil, 400, err end
  end
  local envid, ret
  envid, err = get_string(o, "envid")
  if err then return nil, 400, err end
  if envid then
    -- as xtext, through the SMTP server's own check (RFC 3461: printable
    -- US-ASCII, at most 100 octets): a line break in it would break the
    -- DSN field that quotes it
    envid = xtext(envid)
    ok, err = smtp.check_param("ENVID", envid)
    if not ok then return nil, 400, "envid: " .. err end
  end
  ret, err = get_string(o, "ret")
  if err then return nil, 400, err end
  if ret then
    ret = ret:upper()
    if ret ~= "FULL" and ret ~= "HDRS" then return nil, 400, "ret: expected FULL or HDRS" end
  end
  local id = ids.next()
  local content
  content, err = get_string(o, "content")
  if err then return nil, 400, err end
  local text
  if content then
    for _, k in ipairs(STRUCTURED) do
      if opt(o[k]) ~= nil then
        return nil, 400, format("give either content or structured parts (%s), not both", k)
      end
    end
    text = mime.crlf(content)
    if not text:match("^[!-9;-~]+[ \t]*:") then
      return nil, 400, "content: does not start with a header field (an RFC 5322 message is expected)"
    end
    if sub(text, -2) ~= "\r\n" then text = text .. "\r\n" end
    local head = mime.split(text)
    -- what a submission server adds when the client did not (RFC 6409 8)
    local add = {}
    if #headers.find(head, "date") == 0 then add[#add + 1] = "Date: " .. mime.date() .. "\r\n" end
    if #headers.find(head, "message-id") == 0 then
      add[#add + 1] = "Message-ID: " .. mime.message_id(id, mta.hostname) .. "\r\n"
    end
    if not find(text, "\r\n\r\n", 1, true) then text = text .. "\r\n" end
    text = concat(add) .. text
  else
    local from_header = opt(o.from_header)
    if from_header == nil then
      if from == "" then return nil, 400, "from_header: required with the null sender" end
      from_header = from
    end
    local to_header = opt(o.to_header)
    if to_header == nil then to_header = to end
    text, err = mime.render({ hostname = mta.hostname, id = id, from = from_header, to = to_header,
      subject = opt(o.subject), text = opt(o.text), html = opt(o.html), headers = opt(o.headers),
      attachments = opt(o.attachments) })
    if not text then return nil, 400, err end
  end
  return { id = id, sender = sender, recipients = rcpts, tenant = tenant,
    pool = pool, envid = envid, ret = ret, smtputf8 = utf8, text = text }
end

-- The Received field of a message that came over the API.
local function received(txn, remote, hostname)
  local ip = remote or "unknown"
  local lit = find(ip, ":", 1, true) and ("IPv6:" .. ip) or ip
  local rcpt = #txn.recipients == 1 and ("\r\n\tfor <" .. txn.recipients[1].address .. ">") or ""
  return format("Received: from [%s]\r\n\tby %s (Moonpost) with HTTP id %s%s;\r\n\t%s\r\n", lit, hostname, txn.id,
    rcpt, mime.date())
end

local function reply_of(v)
  return format("%d %s%s", v.code, v.enhanced and (v.enhanced .. " ") or "", tostring(v.text))
end

local function verdict_status(v)
  return (v.kind == "tempfail") and 503 or 422, "refused by the policy: " .. reply_of(v)
end

-- store(job, req) -> true, refused | nil, status, why, refused: the
-- envelope through the policy's MAIL and RCPT handlers (moonpost.suppress
-- refuses its listed recipients there), the message through its message
-- handlers and steps (DKIM signs here), then the spool (durable before
-- this returns), as for mail received over SMTP. refused: the recipients
-- the RCPT handlers refused, { address, reply }.
function Admin:store(job, req)
  local mta = self.mta
  local tenant = job.tenant
  if tenant then
    local cfg = mta.tenants:get(tenant)
    if cfg.max_queued and mta:tenant_depth(tenant) >= cfg.max_queued then
      return nil, 429, format("tenant %s: queue quota exceeded, try again later", tenant)
    end
    if cfg.max_messages and not mta.tenants:take(tenant) then
      return nil, 429, format("tenant %s: over its message rate, try again later", tenant)
    end
  end
  local sp = mta.spool
  if sp and not sp:accepting() then return nil, 503, "insufficient system storage" end
  local txn = {
    id = job.id,
    conn = { id = "http", remote_ip = req.remote, protocol = "http", listener = "http", tenant = tenant, relay = true,
      messages = 0 },
    sender = job.sender,
    recipients = {},
    notes = {},
    params = {},
    smtputf8 = job.smtputf8,
    ret = job.ret,
    envid = job.envid,
    tenant = tenant,
    pool = job.pool,
    via = "http",
  }
  local bus = mta.bus
  local ok, v = xpcall(bus.run, debug.traceback, bus, "smtp_server_mail_from", txn, job.sender)
  local refused, temporary = {}, false
  if ok and (not v or v.kind == "accept") then
    for _, r in ipairs(job.recipients) do
      ok, v = xpcall(bus.run, debug.traceback, bus, "smtp_server_rcpt_to", txn, r)
      if not ok then break end
      if v and v.kind ~= "accept" then
        refused[#refused + 1] = { address = r.address, reply = reply_of(v) }
        if v.kind == "tempfail" then temporary = true end
      else
        txn.recipients[#txn.recipients + 1] = r
      end
      v = nil
    end
  end
  if not ok then
    log.error("%s: http injection: %s", job.id, tostring(v))
    return nil, 500, "a policy handler failed (see the log)"
  end
  if v and v.kind ~= "accept" then return nil, verdict_status(v) end
  if #txn.recipients == 0 then
    local said = {}
    for i, r in ipairs(refused) do said[i] = r.address .. ": " .. r.reply end
    return nil, temporary and 503 or 422, "every recipient was refused: " .. concat(said, "; "), refused
  end
  local msg = smtp.message(job.text)
  msg:prepend(received(txn, req.remote, mta.hostname))
  txn.size = msg:size()
  txn.received_at = os.time()
  -- the message handlers and steps (DKIM signs), as for SMTP mail
  ok, v = server.run_received(mta, txn, msg)
  if not ok then
    msg:close()
    log.error("%s: http injection: %s", job.id, tostring(v))
    return nil, 500, "a policy handler failed (see the log)"
  end
  if v and v.kind ~= "accept" then
    msg:close()
    return nil, verdict_status(v)
  end
  if sp then
    local stored, serr = sp:store(txn, msg)
    if not txn.kept then msg:close() end
    if not stored then
      log.error("%s: not queued: %s", job.id, tostring(serr))
      return nil, 503, "not queued: queue file write error"
    end
  else
    msg:close()
  end
  log.info("%s: from=<%s> size=%d nrcpt=%d via http client=[%s]%s", job.id, job.sender.address, txn.size,
    #txn.recipients, tostring(req.remote), tenant and (" tenant=" .. tenant) or "")
  -- counted and logged as received, like SMTP mail (listener "http")
  local mc = mta.counters
  if mc and mc.received then mc.received:inc(tenant, "http") end
  bus:emit("smtp_server_message_queued", txn)
  return true, refused
end

function Admin:api_inject(req)
  local o, err = body_object(req)
  if not o then return fail(400, err) end
  local batch = opt(o.messages)
  if batch ~= nil then
    if next(o, next(o)) ~= nil or type(batch) ~= "table" or batch[1] == nil then
      return fail(400, "messages: expected a non-empty list of message objects, and no other field")
    end
    if #batch > MAX_BATCH then return fail(400, format("messages: more than %d", MAX_BATCH)) end
  else
    batch = { o }
  end
  local jobs = {}
  for i, m in ipairs(batch) do
    local job, status, why = self:prepare(m)
    if not job then
      return fail(status, #batch > 1 and format("messages item %d: %s", i, why) or why)
    end
    jobs[i] = job
  end
  local done, refused = {}, {}
  local function note(job, refusals)
    for _, r in ipairs(refusals or {}) do
      refused[#refused + 1] = { id = job.id, address = r.address, reply = r.reply }
    end
  end
  for i, job in ipairs(jobs) do
    local ok, status, why, refusals = self:store(job, req)
    if not ok then
      note(job, refusals)
      local body = { error = #jobs > 1 and format("messages item %d: %s", i, why) or why }
      if #done > 0 then body.ids = done end
      if #refused > 0 then body.refused = refused end
      return answer(status, body)
    end
    note(job, status)
    done[#done + 1] = job.id
  end
  return answer(202, { ids = done, id = #done == 1 and done[1] or nil, queued = self.mta.spool ~= nil,
    refused = #refused > 0 and refused or nil })
end

-- ---- inspect ------------------------------------------------------------------------------------

function Admin:api_message(req)
  local mta = self.mta
  local hex = req.params.id
  local want_body = req.query.body == "1"
  local body_max = BODY_MAX
  if req.query.body_max ~= nil then
    body_max = tonumber(req.query.body_max)
    if not body_max or body_max % 1 ~= 0 or body_max < 0 or body_max > BODY_MAX_LIMIT then
      return fail(400, format("body_max: expected octets from 0 to %d", BODY_MAX_LIMIT))
    end
  end
  local sp = mta.spool
  if not sp then return fail(404, "no spool: nothing is queued") end
  local num = hex:match("^%x+$") and #hex <= 16 and tonumber(hex, 16)
  local m = num and sp:get(num)
  if not m then return fail(404, "no such message in the queue: " .. hex) end
  local env, body = sp:read(m)
  if not env then return fail(500, "cannot read the message: " .. tostring(body)) end
  if sp:get(num) ~= m then return fail(404, "no such message in the queue: " .. hex) end
  local now = os.time()
  local q = mta.queue
  local state, held_by = "queued", nil
  if q and q.parked[m] then
    state = "held"
    for _, s in ipairs(self.susp) do
      for _, w in ipairs(s.waiting) do
        if w.resume == q.parked[m] then state, held_by = "suspended", s.key end
      end
    end
  elseif m[NEXT] and m[NEXT] > now and (m[ATTEMPTS] or 0) > 0 then
    state = "deferred"
  end
  local last = self.last[env.id] or {}
  local rcpts = {}
  for i, r in ipairs(env.rcpt) do
    local done = r.done or (m.rdone and m.rdone[i]) or false
    local lr = last[i]
    local rs = done and (lr and lr.status or "done") or "pending"
    if not done and lr and lr.status == "deferred" then rs = "deferred" end
    if not done and self.marks[env.id] and self.marks[env.id][i] then rs = "purging" end
    rcpts[i] = { address = r.a, state = rs, notify = r.n, orcpt = r.o, last_result = lr }
  end
  -- the header section, and at most body_max octets of the body: the whole
  -- message is never copied, split or checked on the loop thread
  local size, head, rest, body_size
  if type(body) == "string" then
    size = #body
    local e = find(body, "\r\n\r\n", 1, true)
    head = e and sub(body, 1, e + 1) or body
    body_size = e and size - e - 3 or 0
    if want_body and e then rest = sub(body, e + 4, e + 3 + body_max) end
  else
    size = body:size()
    head = body:headers()
    local hl = #head
    if sub(head, -4) == "\r\n\r\n" or head == "\r\n" then
      body_size = size - hl
      if want_body then rest = body:sub(hl + 1, hl + body_max) end
      if head ~= "\r\n" then head = sub(head, 1, -3) end
    else
      body_size = 0
    end
  end
  rest = rest or ""
  local truncated = want_body and #rest < body_size
  if truncated then
    -- not in the middle of a UTF-8 sequence: back to the start of the last one
    -- when it is cut (at most 3 octets)
    local n = #rest
    for k = n, math.max(1, n - 2), -1 do
      local c = string.byte(rest, k)
      if c < 0x80 then break end
      if c >= 0xC0 then
        local len = c >= 0xF0 and 4 or c >= 0xE0 and 3 or 2
        if k + len - 1 > n then rest = sub(rest, 1, k - 1) end
        break
      end
    end
  end
  local fields = mime.fields(head)
  for _, f in ipairs(fields) do
    -- 8-bit octets that are not UTF-8 (a legacy charset sent raw): shown
    -- with U+FFFD, and exactly in value_base64
    if not mime.utf8_valid(f.value) then
      f.value_base64 = require("moonpost.runtime.passwd").b64encode(f.value)
      f.value = log.utf8_clean(f.value)
    end
  end
  local out = {
    id = env.id, from = env.from, tenant = env.tenant, pool = env.pool, received = env.t,
    age = now - (env.t or ids.time_of(num)), size = size, record_size = m[LEN],
    attempts = m[ATTEMPTS] or 0, next_attempt = (m[NEXT] and m[NEXT] > 0) and m[NEXT] or nil,
    state = state, suspended_by = held_by, envid = env.envid, ret = env.ret, smtputf8 = env.utf8,
    client = env.ip, recipients = list(rcpts), headers = list(fields),
  }
  -- every string but the body made UTF-8 here (small), the body checked
  -- once: the encoded answer needs no second pass
  out = clean(out, {})
  if want_body then
    if mime.utf8_valid(rest) then
      out.body = rest
    else
      out.body_base64 = require("moonpost.runtime.passwd").b64encode(rest)
    end
    out.body_size = body_size
    if truncated then out.body_truncated = true end
  end
  return answer(200, out, true)
end

-- ---- purge -----------------------------------------------------------------------------------------

local BOUNCE_FIELDS = { tenant = true, domain = true, from = true, rcpt = true, older_than = true, dsn = true,
  all = true, wait = true }

function Admin:api_bounce(req)
  local mta = self.mta
  local o, err = body_object(req)
  if not o then return fail(400, err) end
  local ok
  ok, err = check_fields(o, BOUNCE_FIELDS)
  if not ok then return fail(400, err) end
  local f = {}
  for _, k in ipairs({ "tenant", "domain", "from", "rcpt" }) do
    f[k], err = get_string(o, k, k == "tenant" or k == "from")
    if err then return fail(400, err) end
  end
  if f.domain then f.domain = lower(f.domain) end
  if f.from then f.from = lower(f.from) end
  if f.rcpt then f.rcpt = lower(f.rcpt) end
  local older = opt(o.older_than)
  if older ~= nil then
    older = config.duration(older)
    if not older then return fail(400, "older_than: expected a duration (seconds, or like \"30m\", \"2h\", \"3d\")") end
    if older <= 0 then return fail(400, "older_than: must be more than 0 (all = true bounces everything)") end
  end
  local dsn = opt(o.dsn)
  if dsn == nil then dsn = true end
  if type(dsn) ~= "boolean" then return fail(400, "dsn: expected true or false") end
  local wait = opt(o.wait)
  if wait ~= nil and (type(wait) ~= "number" or wait < 0 or wait > 300) then
    return fail(400, "wait: expected seconds from 0 to 300")
  end
  wait = wait or PURGE_WAIT
  local any = f.tenant or f.domain or f.from or f.rcpt or older
  if not any and opt(o.all) ~= true then
    return fail(400, "give a filter (tenant, domain, from, rcpt, older_than), or all = true to bounce everything")
  end
  local sp, q = mta.spool, mta.queue
  if not sp or not q then return fail(409, "no spool: nothing is queued") end
  local op = { done = 0 }
  local res_text = "deleted from the queue by the administrator"
  local function result()
    return { status = "bounced", enhanced = "5.0.0", text = res_text, class = "admin", permanent = true,
      dsn = dsn, purged = true }
  end
  local function key_may_match(m)
    local k = m.key
    if k == nil or k == "?" or not (f.tenant or f.domain) then return true end
    for _, key in ipairs(type(k) == "table" and k or { k }) do
      local t, d = key:match("^(.-)@(.*)$")
      if (not f.tenant or t == f.tenant) and (not f.domain or d == f.domain) then return true end
    end
    return false
  end
  local all = {}
  sp:each(function(m) all[#all + 1] = m end)
  local now = os.time()
  local msgs, matched = {}, 0
  for i, m in ipairs(all) do
    if sp:get(m[ID]) == m and (not older or now - ids.time_of(m[ID]) >= older) and key_may_match(m) then
      local env = sp:read(m)
      if env and sp:get(m[ID]) == m and (not f.tenant or (env.tenant or "") == f.tenant)
          and (not f.from or lower(env.from or "") == f.from) and (not older or now - (env.t or now) >= older) then
        local hit
        for k, r in ipairs(env.rcpt) do
          if not r.done and not (m.rdone and m.rdone[k]) then
            local addr = lower(r.a)
            if (not f.rcpt or addr == f.rcpt) and (not f.domain or (addr:match("@([^@]*)$") or "") == f.domain) then
              hit = hit or self.marks[env.id] or {}
              if not hit[k] then
                hit[k] = { res = result(), op = op }
                matched = matched + 1
              end
            end
          end
        end
        if hit then
          self.marks[env.id] = hit
          msgs[#msgs + 1] = m
        end
      end
    end
    -- long scans let the loop run (see moonpost.suppress on why not yield)
    if i % 500 == 0 then sched.sleep(0.001) end
  end
  self:action(req, "bounce", { tenant = f.tenant, domain = f.domain, from = f.from, rcpt = f.rcpt,
    older_than = older, dsn = dsn, matched = matched, messages = #msgs })
  if #msgs > 0 then q:expedite(msgs) end
  -- wait (bounded) until the queue has bounced them
  local deadline = uv.now() + wait * 1000
  while op.done < matched and uv.now() < deadline do
    sched.sleep(0.02)
    self:sweep_marks()
  end
  self:sweep_marks()
  local pending = 0
  for id, marks in pairs(self.marks) do
    for _, mk in pairs(marks) do
      if mk.op == op then pending = pending + 1 end
    end
    if next(marks) == nil then self.marks[id] = nil end
  end
  return answer(200, { matched = matched, messages = #msgs, bounced = op.done, pending = pending, dsn = dsn })
end

-- Marks of messages that left the queue another way (delivered meanwhile)
function Admin:sweep_marks()
  local sp = self.mta.spool
  for id in pairs(self.marks) do
    if not (sp and sp:get(ids.number(id))) then self.marks[id] = nil end
  end
end

-- ---- suppressions ------------------------------------------------------------------------------

function Admin:suppress_block()
  for _, b in ipairs(self.mta.blocks or {}) do
    if b.name == "suppress" and type(b.add) == "function" and type(b.list) == "function" then return b end
  end
  return nil
end

local NO_SUPPRESS = "the policy uses no moonpost.suppress block"


function Admin:api_suppression_list(req)
  local sup = self:suppress_block()
  if not sup then return fail(404, NO_SUPPRESS) end
  local q = req.query
  local limit = tonumber(q.limit or "100")
  local offset = tonumber(q.offset or "0")
  if not limit or limit < 1 or limit > 10000 or limit % 1 ~= 0 then
    return fail(400, "limit: expected a whole number from 1 to 10000")
  end
  if not offset or offset < 0 or offset % 1 ~= 0 then return fail(400, "offset: expected a whole number >= 0") end
  local entries, seen, more = {}, 0, false
  local n, err = sup:list(q.tenant, function(address, reason, time, tenant)
    seen = seen + 1
    if seen <= offset then return end
    if #entries >= limit then
      more = true
      return false
    end
    entries[#entries + 1] = { tenant = tenant, address = address, reason = reason, time = time, since = iso(time) }
  end)
  if not n then return fail(500, "cannot list: " .. tostring(err)) end
  return answer(200, { entries = list(entries), offset = offset, limit = limit, count = #entries,
    total = sup:count(q.tenant), next_offset = more and (offset + limit) or nil })
end

-- { tenant, address | addresses, reason } -> { tenant, addrs, reason } | nil, err
local function addresses_of(o)
  local ok, err = check_fields(o, { tenant = true, address = true, addresses = true, reason = true })
  if not ok then return nil, err end
  local tenant
  tenant, err = get_string(o, "tenant", true)
  if err then return nil, err end
  local one
  one, err = get_string(o, "address")
  if err then return nil, err end
  local many = opt(o.addresses)
  local out = {}
  if one then out[1] = one end
  if many ~= nil then
    if type(many) ~= "table" then return nil, "addresses: expected a list of strings" end
    for i, a in ipairs(many) do
      if type(a) ~= "string" or a == "" then return nil, format("addresses item %d: expected an address", i) end
      out[#out + 1] = a
    end
  end
  if #out == 0 then return nil, "give address or addresses" end
  for _, a in ipairs(out) do
    if find(a, "[%s%c]") or not find(a, "@", 1, true) then return nil, format("bad address %q", a) end
  end
  local reason
  reason, err = get_string(o, "reason")
  if err then return nil, err end
  return { tenant = tenant, addrs = out, reason = reason }
end

function Admin:api_suppression_add(req)
  local sup = self:suppress_block()
  if not sup then return fail(404, NO_SUPPRESS) end
  local o, err = body_object(req)
  if not o then return fail(400, err) end
  local a
  a, err = addresses_of(o)
  if not a then return fail(400, err) end
  local tenant, addrs, reason = a.tenant, a.addrs, a.reason
  local added, existing = 0, 0
  for _, addr in ipairs(addrs) do
    local ok, aerr = sup:add(tenant, addr, reason or "admin")
    if ok == nil then return fail(500, "cannot add " .. addr .. ": " .. tostring(aerr)) end
    if ok then added = added + 1 else existing = existing + 1 end
  end
  local fok, ferr = sup:flush(30)
  if not fok then return fail(500, "not on disk: " .. tostring(ferr)) end
  self:action(req, "suppression_add", { tenant = tenant or "", added = added, existing = existing,
    reason = reason or "admin" })
  return answer(200, { added = added, existing = existing })
end

function Admin:api_suppression_remove(req)
  local sup = self:suppress_block()
  if not sup then return fail(404, NO_SUPPRESS) end
  local o
  if req.body ~= "" then
    local err
    o, err = body_object(req)
    if not o then return fail(400, err) end
  else
    o = { tenant = req.query.tenant, address = req.query.address }
  end
  local a, err = addresses_of(o)
  if not a then return fail(400, err) end
  local tenant = a.tenant
  local removed, missing = 0, 0
  for _, addr in ipairs(a.addrs) do
    local ok, rerr = sup:remove(tenant, addr)
    if ok == nil then return fail(500, "cannot remove " .. addr .. ": " .. tostring(rerr)) end
    if ok then removed = removed + 1 else missing = missing + 1 end
  end
  local fok, ferr = sup:flush(30)
  if not fok then return fail(500, "not on disk: " .. tostring(ferr)) end
  self:action(req, "suppression_remove", { tenant = tenant or "", removed = removed, missing = missing })
  return answer(200, { removed = removed, missing = missing })
end

function Admin:api_suppression_export(req)
  local sup = self:suppress_block()
  if not sup then return fail(404, NO_SUPPRESS) end
  local out = { "tenant,address,reason,time\n" }
  local csv_row = require("moonpost.suppress").csv_row -- the store's own format
  local n, err = sup:list(req.query.tenant, function(address, reason, time, tenant)
    out[#out + 1] = csv_row(tenant, address, reason, time)
  end)
  if not n then return fail(500, "cannot export: " .. tostring(err)) end
  return 200, concat(out), { ["content-type"] = "text/csv; charset=utf-8",
    ["content-disposition"] = 'attachment; filename="suppressions.csv"' }
end

-- ---- reload -----------------------------------------------------------------------------------------

function Admin:api_reload(req)
  local mta = self.mta
  -- As SIGHUP does: the policy file again when `moonpost run` loaded one
  -- (mta:reload_policy, runtime/reload.lua); when that fails, or for an MTA
  -- a program started itself, the blocks read their files again
  -- (mta:reload(): certificates, keys, users files).
  local policy = package.loaded["moonpost.runtime.policy"]
  local perr
  if type(mta.reload_policy) == "function" and policy and policy.source then
    local ok, err = mta:reload_policy()
    if ok then
      self:action(req, "reload", { policy = true, ok = true })
      return answer(200, { reloaded = true, policy = true })
    end
    perr = tostring(err)
  end
  local ok, err = mta:reload()
  self:action(req, "reload", { policy = perr ~= nil, ok = ok and perr == nil or false, error = perr or err })
  if perr then
    return fail(422, "policy reload failed: " .. perr .. "; the old policy keeps serving"
      .. (ok and "" or ("; " .. tostring(err))))
  end
  if not ok then return fail(500, "reload failed: " .. tostring(err)) end
  return answer(200, { reloaded = true, policy = false })
end

-- ---- routes -------------------------------------------------------------------------------------------

function Admin:routes()
  local mta = self.mta
  local function bind(method)
    return function(req) return method(self, req) end
  end
  mta:http_route("POST", "/api/v1/messages", bind(Admin.api_inject))
  mta:http_route("GET", "/api/v1/messages/:id", bind(Admin.api_message))
  mta:http_route("GET", "/api/v1/queues", bind(Admin.api_queues))
  mta:http_route("POST", "/api/v1/suspend", bind(Admin.api_suspend))
  mta:http_route("POST", "/api/v1/resume", bind(Admin.api_resume))
  mta:http_route("GET", "/api/v1/suspensions", bind(Admin.api_suspensions))
  mta:http_route("POST", "/api/v1/bounce", bind(Admin.api_bounce))
  mta:http_route("GET", "/api/v1/suppressions", bind(Admin.api_suppression_list))
  mta:http_route("POST", "/api/v1/suppressions", bind(Admin.api_suppression_add))
  mta:http_route("DELETE", "/api/v1/suppressions", bind(Admin.api_suppression_remove))
  mta:http_route("GET", "/api/v1/suppressions/export", bind(Admin.api_suppression_export))
  mta:http_route("POST", "/api/v1/reload", bind(Admin.api_reload))
end

return _M
