-- moonpost.eventlog: one JSON object per line for everything that happens
-- to mail (docs/eventlog.md).
--
--   mta:use(require("moonpost.eventlog").setup {
--     file = "/var/log/moonpost/events.jsonl",  -- appended; reopened on SIGUSR1
--     stdout = true,                            -- containers
--     webhook = { url = "http://127.0.0.1:9000/events", batch = 100, interval = "1s",
--                 headers = { Authorization = "Bearer ..." }, dir = "var/webhook" },
--   })
--   mta:event_log { type = "AdminAction", action = "purge", ... }   -- from other blocks
--
-- Records: Reception, Delivery, TransientFailure, Bounce, Expiration,
-- Rejection, DSN, Suppression (hooked from the session and delivery
-- events) and AdminAction (written by other blocks through
-- mta:event_log()).
--
-- Ordering and durability. Every record is encoded once, in the order the
-- events happen in the process, and handed to each sink in that order.
--  * file and stdout: lines wait in memory and are written by one task, one
--    write in flight at a time (in the libuv thread pool), in order; what
--    arrives during a write goes with the next. The file is opened with
--    O_APPEND and never fsynced: a SIGKILL loses the lines not yet written
--    (those of the last write's duration, typically well under a
--    millisecond), a power failure what the kernel had not written back.
--    At stop the rest is written synchronously.
--  * webhook: each record is appended to a durable queue on disk
--    (runtime/outbox.lua) before the event handler returns, so a record
--    of a state the spool has recorded (a delivery, a bounce) is in the
--    queue before the spool's own record is written; a SIGKILL loses
--    nothing that was appended. A task posts the queue in batches and moves
--    the queue's cursor only after a 2xx: at-least-once, in order. The
--    queue's directory is locked (one process); worker i of a supervisor
--    uses <dir>/w<i>.
local uv = require "luv"
local cjson = require("cjson").new()
local config = require "moonpost.runtime.config"
local log = require "moonpost.runtime.log"
local sched = require "moonpost.runtime.sched"
local fs = require "moonpost.runtime.fs"
local outbox = require "moonpost.runtime.outbox"
local http_client = require "moonpost.runtime.http_client"
local workers = require "moonpost.runtime.workers"

local type, tostring, tonumber, pairs, ipairs, floor, min = type, tostring, tonumber, pairs, ipairs, math.floor,
  math.min
local format, concat, find, gsub, sub, sort = string.format, table.concat, string.find, string.gsub,
  string.sub, table.sort
local encode_value = cjson.encode
local ffi = require "ffi"
local cast, u8p = ffi.cast, ffi.typeof("const uint8_t *")

local _M = { _VERSION = "0.1" }

local EventLog = {}
local mt = { __index = EventLog }

-- Every record type (docs/eventlog.md); mta:event_log() may add others.
_M.TYPES = { "Reception", "Delivery", "TransientFailure", "Bounce", "Expiration", "Rejection", "DSN",
  "Suppression", "AdminAction" }

local SCHEMA = {
  file = { type = "string", check = function(v) return v ~= "", "must not be empty" end },
  stdout = { type = "boolean", default = false },
  webhook = { type = "table" },
  types = { type = "list" },
  -- lines waiting for the file or stdout beyond this are dropped (and counted)
  max_buffer = { type = "size", default = 16 * 1048576 },
}

local WEBHOOK_SCHEMA = {
  url = { type = "string", required = true },
  batch = { type = "posint", default = 100 },
  interval = { type = "duration", default = 1 },
  headers = { type = "table" },
  dir = { type = "string", default = "var/webhook" },
  timeout = { type = "duration", default = 10, check = function(v) return v > 0, "must be > 0" end },
  retry_min = { type = "duration", default = 1, check = function(v) return v > 0, "must be > 0" end },
  retry_max = { type = "duration", default = 60, check = function(v) return v > 0, "must be > 0" end },
  segment_size = { type = "size", default = 16 * 1048576,
    check = function(v) return v >= 4096, "must be at least 4096" end },
  max_size = { type = "size", default = 1073741824 },
  sync_interval = { type = "duration", default = 0.05 },
  -- a batch refused this many times in a row with a client error (4xx but
  -- 408 and 429) is dropped, counted and logged: the endpoint will not take
  -- it, and it would hold up every later record. nil: never dropped.
  drop_after = { type = "posint" },
}

-- ---- encoding -------------------------------------------------------------------------

-- Invalid UTF-8 (a remote server's 8-bit reply text) becomes U+FFFD
-- (log.utf8_clean), so that every line is valid JSON for strict parsers.
local utf8_clean = log.utf8_clean

local MAX_DEPTH = 16

-- A string JSON takes as it is: printable ASCII without '"' and '\\'. A
-- byte loop (compiled by the JIT) rather than a pattern with a character
-- class, which costs about ten times as much on every field of every record.
local function plain(s)
  local n = #s
  local p = cast(u8p, s)
  for i = 0, n - 1 do
    local c = p[i]
    if c < 32 or c > 126 or c == 34 or c == 92 then return false end
  end
  return true
end

-- put(buf, n, v) appends the JSON of v to buf after position n and returns
-- the new end: scalars that need escapes through lua-cjson, tables by hand
-- so that the keys of an object come in sorted order (lines read the same
-- way every time). A table whose keys are 1..n is an array. The pieces are
-- joined once per record: LuaJIT interns every string, so building pieces
-- of pieces costs a hash each.
local function put(buf, n, v, depth)
  local t = type(v)
  if t == "string" then
    if plain(v) then
      buf[n + 1], buf[n + 2], buf[n + 3] = '"', v, '"'
      return n + 3
    end
    local s = encode_value(utf8_clean(v))
    -- lua-cjson 2.1.0 writes "/" as "\/": valid, but not what people grep for
    if find(s, "/", 1, true) then s = gsub(s, "\\/", "/") end
    buf[n + 1] = s
    return n + 1
  elseif t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then error("cannot encode NaN or infinity in JSON", 0) end
    if v % 1 == 0 and v > -9007199254740992 and v < 9007199254740992 then
      buf[n + 1] = format("%d", v)
    else
      buf[n + 1] = format("%.14g", v) -- as lua-cjson
    end
    return n + 1
  elseif t == "boolean" then
    buf[n + 1] = v and "true" or "false"
    return n + 1
  elseif t ~= "table" then
    error("cannot encode a " .. t .. " in JSON", 0)
  end
  depth = (depth or 0) + 1
  if depth > MAX_DEPTH then error("a value nested more than " .. MAX_DEPTH .. " deep", 0) end
  local len, count, keys = #v, 0, {}
  for k in pairs(v) do
    count = count + 1
    keys[count] = k
  end
  if len > 0 and count == len then
    buf[n + 1] = "["
    n = n + 1
    for i = 1, len do
      if i > 1 then
        buf[n + 1] = ","
        n = n + 1
      end
      n = put(buf, n, v[i], depth)
    end
    buf[n + 1] = "]"
    return n + 1
  end
  for i = 1, count do keys[i] = tostring(keys[i]) end
  sort(keys)
  buf[n + 1] = "{"
  n = n + 1
  for i, k in ipairs(keys) do
    if i > 1 then
      buf[n + 1] = ","
      n = n + 1
    end
    local x = v[k]
    if x == nil then x = v[tonumber(k)] end
    n = put(buf, n, k)
    buf[n + 1] = ":"
    n = put(buf, n + 1, x, depth)
  end
  buf[n + 1] = "}"
  return n + 1
end

-- The fields in this order, then any others by name.
local ORDER = { "type", "time", "id", "tenant", "sender", "recipient", "recipients", "size", "stage", "reply",
  "class", "permanent", "host", "ip", "tls", "attempt", "latency", "source", "helo", "site", "listener",
  "session", "auth" }
local KEY = {}  -- '"name":' for each of them
for _, k in ipairs(ORDER) do KEY[k] = '"' .. k .. '":' end

-- encode(record) -> one line of JSON, without the newline
local shared_buf = {} -- reused: encode() never waits, so no two run at once

function _M.encode(rec)
  local buf, n = shared_buf, 1
  buf[1] = "{"
  for _, k in ipairs(ORDER) do
    local v = rec[k]
    if v ~= nil then
      if n > 1 then
        buf[n + 1] = ","
        n = n + 1
      end
      buf[n + 1] = KEY[k]
      n = put(buf, n + 1, v)
    end
  end
  local extra
  for k in pairs(rec) do
    if not KEY[k] then
      extra = extra or {}
      extra[#extra + 1] = tostring(k)
    end
  end
  if extra then
    sort(extra)
    for _, k in ipairs(extra) do
      local v = rec[k]
      if v == nil then v = rec[tonumber(k)] end
      if n > 1 then
        buf[n + 1] = ","
        n = n + 1
      end
      n = put(buf, n, k)
      buf[n + 1] = ":"
      n = put(buf, n + 1, v)
    end
  end
  buf[n + 1] = "}"
  return concat(buf, "", 1, n + 1)
end

-- RFC 3339 UTC with milliseconds, and the same instant in seconds.
local stamp_sec, stamp_str = -1, ""
local function now()
  local s, us = uv.gettimeofday()
  if s ~= stamp_sec then
    stamp_sec = s
    stamp_str = os.date("!%Y-%m-%dT%H:%M:%S", s)
  end
  local ms = floor(us / 1000)
  return format("%s.%03dZ", stamp_str, ms), s + ms / 1000
end
_M.now = now

-- ---- records ------------------------------------------------------------------------------

local function str(v)
  if v == nil then return nil end
  return tostring(v)
end

local function tls_of(info)
  if not info then return nil end
  return { version = info.version, cipher = info.cipher }
end

-- "[192.0.2.1]:25" -> "192.0.2.1"
local function ip_of(host)
  if type(host) ~= "string" then return nil end
  return host:match("^%[([^%]]+)%]") or host:match("^([%d.]+):%d+$")
end

local function reply_of(res)
  local text = res.text
  local enhanced = res.enhanced
  if not enhanced and type(text) == "string" then enhanced = text:match("^([245]%.%d+%.%d+) ") end
  if res.code == nil and enhanced == nil and text == nil then return nil end
  return { code = res.code, enhanced = enhanced, text = text and tostring(text) }
end

local function round3(x)
  return floor(x * 1000 + 0.5) / 1000
end

-- Arrival times to the millisecond, for the latency of deliveries: the
-- envelope's `t` counts whole seconds. An entry is set at the Reception
-- (or the DSN) with the number of recipients, and goes when they all have
-- a final record; two generations of ARRIVALS entries bound what messages
-- that never finish here (a restart, no transport) keep.
local ARRIVALS = 100000

local function arrived(self, id, t, n)
  local a = self.arrivals
  if a.n >= ARRIVALS then
    a.old, a.cur, a.n = a.cur, {}, 0
  end
  a.cur[id] = { t = t, left = n }
  a.n = a.n + 1
end

local function arrival(self, id, final)
  local a = self.arrivals
  local e = a.cur[id] or a.old[id]
  if not e then return nil end
  if final then
    e.left = e.left - 1
    if e.left <= 0 then
      a.cur[id], a.old[id] = nil, nil
    end
  end
  return e.t
end

local function delivery_record(self, kind, env, rcpt, res)
  local time, t = now()
  local since = arrival(self, env.id, kind ~= "TransientFailure") or env.t
  local rec = {
    type = kind, time = time, id = env.id, tenant = str(env.tenant), sender = env.from, recipient = rcpt.address,
    host = res.host, ip = ip_of(res.host), reply = reply_of(res), stage = res.stage,
    attempt = rcpt.attempt, latency = since and round3(math.max(0, t - since)) or nil,
    source = res.source, helo = res.helo, site = res.site,
  }
  if res.tls then rec.tls = { version = res.tls, cipher = res.tls_cipher } end
  if kind ~= "Delivery" then
    rec.class, rec.permanent = res.class, res.permanent
  else
    rec.relayed = res.relayed or nil
  end
  if res.rule then rec.rule = res.rule end
  return rec
end

-- ---- the file and stdout sinks ------------------------------------------------------------

local Writer = {}
local writer_mt = { __index = Writer }

local APPEND = uv.constants.O_WRONLY + uv.constants.O_CREAT + uv.constants.O_APPEND

local function new_writer(name, path, max_buffer)
  return setmetatable({ name = name, path = path, fd = nil, buf = {}, nbuf = 0, bytes = 0, max = max_buffer,
    req = nil, inflight = nil, idle = false, task = nil, stopped = false, reopen = false,
    stats = { lines = 0, writes = 0, dropped = 0, errors = 0, reopened = 0 } }, writer_mt)
end


-- At start (synchronous, as every block's start): the directory and the file.
function Writer:open()
  if not self.path then
    self.fd = 1
    return true
  end
  local dir = self.path:match("^(.*)/[^/]*$")
  if dir then
    local ok, err = fs.mkdir_p_now(dir, 488)
    if not ok then return nil, err end
  end
  local fd, err = uv.fs_open(self.path, APPEND, 416)
  if not fd then return nil, err end
  self.fd = fd
  return true
end

function Writer:push(line)
  if self.stopped then return end
  if self.bytes > self.max then
    self.stats.dropped = self.stats.dropped + 1
    if self.stats.dropped == 1 or self.stats.dropped % 10000 == 0 then
      log.error("eventlog: %s: %d records dropped: more than %d octets wait for the disk", self.name,
        self.stats.dropped, self.max)
    end
    return
  end
  local n = self.nbuf + 1
  self.buf[n] = line
  self.buf[n + 1] = "\n"
  self.nbuf = n + 1
  self.bytes = self.bytes + #line + 1
  self.stats.lines = self.stats.lines + 1
  if self.idle then
    self.idle = false
    sched.wake(self.task, true)
  end
end

-- One write through the thread pool; the request is kept so that stop()
-- can cancel it if it has not started.
local function pool_write(self, data)
  local task, token = sched.reserve()
  local req, rerr = uv.fs_write(self.fd, data, -1, function(err, n)
    sched.wake_token(task, token, err or false, n)
  end)
  if not req then
    task.reserved = nil
    return nil, rerr
  end
  self.req, self.inflight = req, data
  local err, n = sched.wait()
  self.req, self.inflight = nil, nil
  if err then return nil, err end
  return n
end

-- SIGUSR1: the file at path again (logrotate has renamed the old one).
local function reopen(self)
  self.reopen = false
  local fd, err = fs.open(self.path, APPEND, 416)
  if not fd then
    log.error("eventlog: cannot reopen %s: %s (writing on to the old file)", self.path, tostring(err))
    return
  end
  if self.stopped then
    fs.close(fd)
    return
  end
  local old = self.fd
  self.fd = fd
  fs.close(old)
  self.stats.reopened = self.stats.reopened + 1
  log.info("eventlog: reopened %s", self.path)
end

local function writer_loop(self)
  while not self.stopped do
    if self.reopen and self.path then reopen(self) end
    if self.stopped then break end
    if self.nbuf == 0 then
      self.idle = true
      sched.wait()
      self.idle = false
    else
      local data = concat(self.buf, "", 1, self.nbuf)
      self.buf, self.nbuf, self.bytes = {}, 0, 0
      while #data > 0 do
        local n, err = pool_write(self, data)
        if self.stopped then break end -- stop() wrote it (or saw it written)
        if not n then
          self.stats.errors = self.stats.errors + 1
          local lost = select(2, gsub(data, "\n", ""))
          self.stats.dropped = self.stats.dropped + lost
          if self.stats.errors == 1 or self.stats.errors % 1000 == 0 then
            log.error("eventlog: %s: write failed (%d failures), %d records lost: %s", self.name, self.stats.errors,
              lost, tostring(err))
          end
          break
        end
        self.stats.writes = self.stats.writes + 1
        data = n < #data and sub(data, n + 1) or ""
      end
    end
  end
  -- a write was in flight at stop(): the file is closed now that it ended
  if self.close_after and self.fd and self.fd ~= 1 then
    fs.close(self.fd)
    self.fd = nil
  end
end

function Writer:start()
  self.task = sched.spawn_named("eventlog " .. self.name, function(err)
    log.error("eventlog: %s: writer failed: %s", self.name, tostring(err))
  end, writer_loop, self)
end

local function write_all(fd, data)
  while #data > 0 do
    local n, err = uv.fs_write(fd, data, -1)
    if not n then return nil, err end
    data = sub(data, n + 1)
  end
  return true
end

-- stop(): what waits is written now, synchronously (the process may exit
-- as soon as the MTA has stopped, before the thread pool would run another
-- write). A write in flight that has not started is cancelled and done
-- here instead, so the order stays; one that has started ends by itself.
function Writer:stop()
  if self.stopped then return end
  self.stopped = true
  local rest = self.nbuf > 0 and concat(self.buf, "", 1, self.nbuf) or ""
  self.buf, self.nbuf, self.bytes = {}, 0, 0
  local running = false
  if self.req then
    if uv.cancel(self.req) == 0 then
      rest = self.inflight .. rest
    else
      running = true
    end
  end
  if self.fd == 1 and running and #rest > 0 then
    -- stdout's reader is behind (a write is still blocked): a blocking
    -- write here could hold the process's exit for as long as it stalls
    local lost = select(2, gsub(rest, "\n", ""))
    self.stats.dropped = self.stats.dropped + lost
    log.error("eventlog: stdout: %d records not written at stop: the reader is not keeping up", lost)
  elseif self.fd and #rest > 0 then
    local ok, err = write_all(self.fd, rest)
    if not ok then log.error("eventlog: %s: final write failed: %s", self.name, tostring(err)) end
  end
  if running then
    self.close_after = true
  elseif self.fd and self.fd ~= 1 then
    uv.fs_close(self.fd)
    self.fd = nil
  end
  if self.idle and self.task then
    self.idle = false
    sched.wake(self.task, true)
  end
end

-- ---- the webhook ------------------------------------------------------------------------

-- Wait for `want` more records (none: only the timeout or stop() ends it).
-- Records queued since the sender's last read began count already: they
-- may have come while the read waited for the disk, after it had looked,
-- and no later record need ever come to wake the sender for them. (Some
-- may be in the batch read, and are counted twice: that costs one more
-- read, never a record left waiting.)
local function webhook_wait(w, timeout, want)
  if want and w.queued - w.read_mark >= want then return end
  w.want = want or math.huge
  w.idle = true
  sched.wait(timeout)
  w.idle = false
end

local function post(w, b)
  local body = "[" .. concat(b, ",", 1, b.n) .. "]"
  local res, err = w.client:request("POST", body, { ["Content-Type"] = "application/json",
    ["User-Agent"] = "Moonpost/" .. _M._VERSION, ["X-Moonpost-Events"] = b.n })
  if not res then return nil, err end
  if res.status < 200 or res.status > 299 then
    -- 429 and 503 may say when to come back (RFC 9110 10.2.3): seconds or
    -- an HTTP-date
    local after = (res.status == 429 or res.status == 503) and http_client.retry_after(res.headers["retry-after"])
      or nil
    return nil, format("HTTP %d %s", res.status, res.reason or ""), res.status, after
  end
  return true
end

-- A reply that says this batch will never be taken: a 4xx other than
-- 408 (timeout) and 429 (too many requests).
local function refused_for_good(status)
  return status ~= nil and status >= 400 and status < 500 and status ~= 408 and status ~= 429
end

-- The sender task: reads the queue from its cursor, posts full batches at
-- once and short ones `interval` after they were first seen, and moves the
-- cursor only after a 2xx. w.opts and w.client may be replaced while it
-- runs (a policy reload).
local function sender_loop(w)
  local ob = w.outbox
  local since -- uv.now() when a batch short of `batch` was first seen
  local delay = 0
  while not w.stopped do
    w.read_mark = w.queued
    local b, err = ob:read(w.opts.batch)
    if w.stopped then break end
    if not b then
      log.error("eventlog: webhook: cannot read the queue: %s", tostring(err))
      webhook_wait(w, 1)
    elseif b.skip then
      ob:ack(b)
    elseif b.n == 0 then
      since = nil
      webhook_wait(w, nil, 1)
    elseif b.n < w.opts.batch and (since == nil or uv.now() - since < w.opts.interval * 1000) then
      since = since or uv.now()
      webhook_wait(w, (since + w.opts.interval * 1000 - uv.now()) / 1000, w.opts.batch - b.n)
    else
      local ok, perr, status, after = post(w, b)
      if w.stopped and not ok then break end
      w.refusals = refused_for_good(status) and (w.refusals or 0) + 1 or 0
      if not ok and w.opts.drop_after and w.refusals >= w.opts.drop_after then
        log.error("eventlog: webhook: %s refused a batch of %d records %d times (%s): dropped", w.opts.url, b.n,
          w.refusals, tostring(perr))
        w.stats.dropped_batches = (w.stats.dropped_batches or 0) + 1
        w.stats.dropped_events = (w.stats.dropped_events or 0) + b.n
        w.refusals, w.failures, delay, since = 0, 0, 0, nil
        ob:ack(b)
      elseif ok then
        if w.failures > 0 then
          log.info("eventlog: webhook: %s accepts again after %d failed attempts", w.opts.url, w.failures)
        end
        w.failures, delay, since = 0, 0, nil
        w.stats.posts = w.stats.posts + 1
        w.stats.events = w.stats.events + b.n
        ob:ack(b)
      else
        w.failures = w.failures + 1
        w.stats.failures = w.stats.failures + 1
        delay = delay == 0 and w.opts.retry_min or min(delay * 2, w.opts.retry_max)
        -- a little jitter, so that several Moonposts do not retry in step
        local pause = delay * (0.8 + 0.4 * math.random())
        -- an endpoint that said when (Retry-After): not before, up to retry_max
        if after and after > pause then pause = min(after, w.opts.retry_max) end
        if w.failures == 1 or w.failures % 10 == 0 then
          log.warn("eventlog: webhook: POST %s failed (%d in a row): %s; %d octets waiting, next try in %.1fs",
            w.opts.url, w.failures, tostring(perr), ob:backlog(), pause)
        end
        webhook_wait(w, pause)
      end
    end
  end
  w.client:close()
  ob:close_reader()
  w.done = true
end

-- ---- the block --------------------------------------------------------------------------

-- the header fields of every request that the client and post() write
local OWN_HEADERS = { host = true, ["content-length"] = true, ["transfer-encoding"] = true,
  ["content-type"] = true, ["user-agent"] = true, ["x-moonpost-events"] = true }

local function check_webhook(v)
  if v == nil or v == false then return nil end
  local o = config.check("eventlog.setup: webhook", v, WEBHOOK_SCHEMA)
  local ok, err = http_client.parse_url(o.url)
  if not ok then config.raise("eventlog.setup: webhook: field 'url': " .. err) end
  for k, hv in pairs(o.headers or {}) do
    if type(k) ~= "string" or not k:match("^[!#$%%&'*+.^_`|~%w-]+$") then
      config.raise("eventlog.setup: webhook: field 'headers': bad header name " .. tostring(k))
    end
    if OWN_HEADERS[k:lower()] then
      config.raise("eventlog.setup: webhook: field 'headers': " .. k .. " is set by Moonpost (it would be sent twice)")
    end
    if (type(hv) ~= "string" and type(hv) ~= "number") or tostring(hv):find("[\r\n]") then
      config.raise("eventlog.setup: webhook: field 'headers': bad value for " .. k)
    end
  end
  if o.retry_max < o.retry_min then config.raise("eventlog.setup: webhook: retry_max is less than retry_min") end
  -- a worker process (docs/cli.md#workers) has a queue of its own, as it
  -- has a spool partition: one writer and one reader per directory
  if workers.index then o.dir = o.dir:gsub("/+$", "") .. "/w" .. workers.index end
  return o
end

-- setup(opts) -> the block
function _M.setup(opts)
  local o = config.check("eventlog.setup", opts, SCHEMA)
  o.webhook = check_webhook(o.webhook)
  if not o.file and not o.stdout and not o.webhook then
    config.raise("eventlog.setup: give at least one sink: file, stdout or webhook")
  end
  local types
  if o.types then
    types = {}
    local known = {}
    for _, t in ipairs(_M.TYPES) do known[t] = true end
    for _, t in ipairs(o.types) do
      if not known[t] then
        config.raise(format("eventlog.setup: field 'types': unknown record type %q (known: %s)", t,
          concat(_M.TYPES, ", ")))
      end
      types[t] = true
    end
  end
  local self = setmetatable({
    name = "eventlog",
    opts = o,
    types = types,
    open = false,
    writers = {},
    webhook = nil,
    counts = {},   -- records by type
    dropped = 0,   -- records written while the block was not started
    arrivals = { cur = {}, old = {}, n = 0 },
    on = {},
  }, mt)
  local on = self.on
  on.smtp_server_message_queued = function(txn) self:reception(txn) end
  on.smtp_server_rejected = function(conn, txn, rej) self:rejection(conn, txn, rej) end
  on.delivery_delivered = function(env, rcpt, res)
    self:log(delivery_record(self, "Delivery", env, rcpt, res))
  end
  on.delivery_deferred = function(env, rcpt, res)
    self:log(delivery_record(self, "TransientFailure", env, rcpt, res))
  end
  on.delivery_bounced = function(env, rcpt, res)
    self:log(delivery_record(self, res.expired and "Expiration" or "Bounce", env, rcpt, res))
  end
  on.delivery_suppressed = function(env, rcpt, res)
    arrival(self, env.id, true)
    self:log({ type = "Suppression", action = "suppressed", id = env.id, tenant = str(env.tenant),
      sender = env.from, recipient = rcpt.address, attempt = rcpt.attempt, reason = res.reason,
      detail = res.text })
  end
  on.delivery_dsn = function(env, dsn)
    local reported = {}
    for i, r in ipairs(dsn.recipients) do reported[i] = r.address end
    arrived(self, dsn.id, select(2, now()), 1)
    self:log({ type = "DSN", id = env.id, tenant = str(env.tenant), sender = env.from, recipient = dsn.to,
      action = dsn.action, dsn_id = dsn.id, reported = reported })
  end
  return self
end

function EventLog:attach(mta)
  self.mta = mta
  local list = mta.event_logs
  if not list then
    list = {}
    mta.event_logs = list
  end
  list[#list + 1] = self
end

local function emit(self, kind, line)
  self.counts[kind] = (self.counts[kind] or 0) + 1
  for _, wr in ipairs(self.writers) do wr:push(line) end
  local w = self.webhook
  if w then
    local ok, err = w.outbox:append(line)
    if not ok then
      w.stats.refused = w.stats.refused + 1
      if w.stats.refused == 1 or w.stats.refused % 10000 == 0 then
        log.error("eventlog: webhook: %d records not queued: %s", w.stats.refused, tostring(err))
      end
    else
      w.queued = w.queued + 1
      if w.idle and w.queued - w.read_mark >= w.want then
        w.idle = false
        sched.wake(w.task, true)
      end
    end
  end
end

-- log(record): a record built here (the handlers): `time` is set, then it
-- goes to every sink.
function EventLog:log(rec)
  local kind = rec.type
  if self.types and not self.types[kind] then return end
  if not self.open then
    self.dropped = self.dropped + 1
    return
  end
  if rec.time == nil then rec.time = now() end
  local ok, line = pcall(_M.encode, rec)
  if not ok then
    log.error("eventlog: cannot encode a %s record: %s", tostring(kind), tostring(line))
    return
  end
  emit(self, kind, line)
end

-- record(rec): a record from another block (mta:event_log()). The table is
-- not changed; a record without a string `type`, or with a value that JSON
-- cannot hold (a function), is an error at the caller's line.
function EventLog:record(rec, level)
  level = (level or 1) + 1
  if type(rec) ~= "table" or type(rec.type) ~= "string" or rec.type == "" then
    error("event_log(record): record must be a table with a string field 'type'", level)
  end
  local copy = {}
  for k, v in pairs(rec) do copy[k] = v end
  if copy.time == nil then copy.time = now() end
  local ok, line = pcall(_M.encode, copy)
  if not ok then error("event_log(record): " .. tostring(line), level) end
  if self.types and not self.types[copy.type] then return end
  if not self.open then
    self.dropped = self.dropped + 1
    return
  end
  emit(self, copy.type, line)
end

function EventLog:reception(txn)
  local conn = txn.conn or {}
  local rcpts = {}
  for i, r in ipairs(txn.recipients) do rcpts[i] = r.address end
  local time, t = now()
  arrived(self, txn.id, t, #rcpts)
  self:log({ time = time, type = "Reception", id = txn.id, tenant = str(txn.tenant),
    sender = txn.sender and txn.sender.address, recipients = rcpts, size = txn.size, host = conn.helo,
    ip = conn.remote_ip, tls = tls_of(conn.tls_info), listener = conn.listener, session = conn.id, auth = txn.auth })
end

function EventLog:rejection(conn, txn, rej)
  local rec = { type = "Rejection", stage = rej.stage, reply = { code = rej.code, enhanced = rej.enhanced,
    text = rej.text }, host = conn.helo, ip = conn.remote_ip, tls = tls_of(conn.tls_info),
    listener = conn.listener, session = conn.id, auth = conn.auth }
  if txn then
    rec.id = txn.id
    rec.tenant = str(txn.tenant)
    rec.sender = txn.sender and txn.sender.address
  else
    rec.tenant = str(conn.tenant)
  end
  if rej.stage == "MAIL FROM" then
    rec.sender = rej.address or rec.sender
  elseif rej.stage == "RCPT TO" then
    rec.recipient = rej.address
  end
  self:log(rec)
end

local function close_writers(list)
  for _, wr in ipairs(list) do
    if wr.fd and wr.fd ~= 1 then uv.fs_close(wr.fd) end
    wr.fd = nil
  end
end

-- start(): the sinks open (or, after a policy reload, those of the block
-- this one replaces are shared), the writer tasks, the webhook's sender and
-- the SIGUSR1 handler start.
function EventLog:start(mta)
  local o = self.opts
  local shared = self.shared or {}
  self.shared = nil
  local writers, fresh = {}, {}
  local function want(name, path)
    local wr = shared[name]
    if not wr then
      wr = new_writer(name, path, o.max_buffer)
      fresh[#fresh + 1] = wr
    end
    writers[#writers + 1] = wr
  end
  if o.file then want("file " .. o.file, o.file) end
  if o.stdout then want("stdout", nil) end
  for _, wr in ipairs(fresh) do
    local ok, err = wr:open()
    if not ok then
      close_writers(fresh)
      return nil, tostring(err)
    end
  end
  local wh = o.webhook
  local w = shared.webhook
  if wh and w then
    -- one queue, one sender: it carries on with this policy's options
    -- (the old block, while it still runs, writes to the same queue)
    local old = w.client
    -- what stop() puts back if this policy is dropped while the old one runs on
    self.took_over = { opts = w.opts }
    w.opts = wh
    w.client = assert(http_client.new(wh.url, { timeout = wh.timeout, headers = wh.headers }))
    old:retire() -- a POST in flight finishes; the next batch goes with the new client
    w.retired = old
  elseif wh then
    local ob, err = outbox.open({ dir = wh.dir, segment_size = wh.segment_size, max_size = wh.max_size,
      sync_interval = wh.sync_interval })
    if not ob then
      close_writers(fresh)
      return nil, err
    end
    w = { opts = wh, outbox = ob, failures = 0, stopped = false, idle = false, want = math.huge,
      queued = 0, read_mark = 0, -- records queued, and how many when the sender's last read began
      users = 0, client = assert(http_client.new(wh.url, { timeout = wh.timeout, headers = wh.headers })),
      stats = { posts = 0, events = 0, failures = 0, refused = 0 } }
    local backlog = ob:backlog()
    if backlog > 0 then
      log.info("eventlog: webhook: %d octets of records from before the restart to send to %s", backlog, wh.url)
    end
    w.task = sched.spawn_named("eventlog webhook", function(terr)
      log.error("eventlog: webhook sender failed: %s", tostring(terr))
    end, sender_loop, w)
  end
  for _, wr in ipairs(writers) do
    wr.users = (wr.users or 0) + 1
    wr.max = o.max_buffer
  end
  if w then w.users = w.users + 1 end
  self.writers, self.webhook = writers, w
  self.open = true
  for _, wr in ipairs(fresh) do wr:start() end
  -- SIGUSR1: reopen the file (logrotate)
  if o.file then
    local sig = uv.new_signal()
    sig:start("sigusr1", sched.callback(function() self:reopen() end, "eventlog: sigusr1"))
    self.signal = sig
  end
  if self.dropped > 0 then
    log.warn("eventlog: %d records written before the event log started were dropped", self.dropped)
    self.dropped = 0
  end
  self.mta = mta or self.mta
  return true
end

-- handover(old): a policy reload (runtime/reload.lua). This block will use
-- the open sinks of the block it replaces: the same file, stdout and
-- webhook queue and sender, shared (each stop() releases its use, the last
-- one closes), so that the records of the old policy's last sessions and
-- of the new one stay in one ordered stream and the queue has one writer.
-- The old block is left working. start() opens what is not shared.
function EventLog:handover(old)
  if getmetatable(old) ~= mt or not old.open or self.open then return true end
  local shared = {}
  for _, wr in ipairs(old.writers) do shared[wr.name] = wr end
  local w = old.webhook
  if w and self.opts.webhook and self.opts.webhook.dir == w.opts.dir then shared.webhook = w end
  self.shared = shared
  self.arrivals = old.arrivals
  return true
end

-- reopen(): the file sink opens its path again (after the write in
-- flight). SIGUSR1 calls it.
function EventLog:reopen()
  for _, wr in ipairs(self.writers) do
    if wr.path then
      wr.reopen = true
      if wr.idle then
        wr.idle = false
        sched.wake(wr.task, true)
      end
    end
  end
end

local function stop_webhook(w)
  -- what the queue still holds is sent by the next start of a policy whose
  -- webhook uses this dir (after a restart, or a reload back to it): said,
  -- since a reload to another dir leaves it behind
  local left = w.outbox:backlog()
  if left > 0 then
    log.warn("eventlog: webhook: %d octets of records in %s not sent yet: they are sent when a policy "
      .. "whose webhook uses that dir starts", left, w.opts.dir)
  end
  w.stopped = true
  -- a POST in progress ends now (its batch is sent again after a restart)
  w.client:abort()
  if w.retired then w.retired:abort() end
  if w.idle then
    w.idle = false
    sched.wake(w.task, true)
  end
  w.outbox:close()
end

-- stop(): this block's use of its sinks ends; a sink no other block uses
-- closes: the file and stdout get what waits (synchronously), the queue is
-- closed and the sender ends (a batch it was posting stays queued).
function EventLog:stop()
  self.shared = nil
  if not self.open then return end
  self.open = false
  if self.signal then
    self.signal:close()
    self.signal = nil
  end
  for _, wr in ipairs(self.writers) do
    wr.users = wr.users - 1
    if wr.users <= 0 then wr:stop() end
  end
  local w = self.webhook
  if w then
    w.users = w.users - 1
    if w.users <= 0 then
      stop_webhook(w)
    elseif self.took_over and w.opts == self.opts.webhook then
      -- a reload that failed after this block started (start_blocks() stops
      -- it): the policy that still runs gets its endpoint and options back
      local mine, prev = w.client, self.took_over.opts
      w.opts = prev
      w.client = assert(http_client.new(prev.url, { timeout = prev.timeout, headers = prev.headers }))
      mine:retire()
      w.retired = mine
    end
  end
  self.took_over = nil
  local parts = {}
  for _, t in ipairs(_M.TYPES) do
    if self.counts[t] then parts[#parts + 1] = t .. " " .. self.counts[t] end
  end
  log.info("eventlog: stopped: %s", #parts > 0 and concat(parts, ", ") or "no records")
end

-- stats() -> { counts = { Type = n }, sinks = { name = { lines, writes, dropped, errors, reopened } },
--   webhook = { posts, events, failures, refused, backlog, queue = outbox stats } }
function EventLog:stats()
  local out = { counts = {}, sinks = {} }
  for k, v in pairs(self.counts) do out.counts[k] = v end
  for _, wr in ipairs(self.writers) do
    local s = {}
    for k, v in pairs(wr.stats) do s[k] = v end
    out.sinks[wr.name] = s
  end
  local w = self.webhook
  if w then
    local s = {}
    for k, v in pairs(w.stats) do s[k] = v end
    s.backlog = w.outbox:backlog()
    s.queue = w.outbox.stats
    s.failing = w.failures
    out.webhook = s
  end
  return out
end

return _M
