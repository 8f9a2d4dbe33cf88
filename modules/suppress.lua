-- moonpost.suppress: per-tenant suppression lists.
--
--   local suppress = require("moonpost.suppress").setup {
--     path = "/var/lib/moonpost/suppress",  -- the log file
--     check = "rcpt",                       -- "rcpt" | "queue" | "both" | "none"
--     auto = true,                          -- add hard bounces of these classes:
--                                           -- { classes = { ... }, permanent_only = true }
--     reply = { 550, "5.7.1", "{address} is on the suppression list" },
--   }
--   mta:use(suppress)
--   suppress:add(tenant, address, reason)   -- then, in a task, suppress:flush() to wait for the disk
--   suppress:check(tenant, address)         -- nil | { reason = ..., time = ... }
--
-- The entries live in memory as 64-bit keys (moonpost.core.suppress); the
-- file is an append-only log of adds and removes. Writes go to the page
-- cache at once and are fdatasynced in the libuv thread pool, one sync for
-- every change made while the previous one ran (group commit, as the
-- spool does). When the log holds more dead lines than live entries it is
-- compacted into a new file, synced, and renamed over the old one.
-- docs/suppress.md has every option and method.
local uv = require "luv"
local core = require "moonpost.core.suppress"
local config = require "moonpost.runtime.config"
local fs = require "moonpost.runtime.fs"
local hooks = require "moonpost.runtime.hooks"
local log = require "moonpost.runtime.log"
local sched = require "moonpost.runtime.sched"
local dns = require "moonpost.runtime.dns"

local type, tostring, tonumber, pairs, ipairs = type, tostring, tonumber, pairs, ipairs
local format, concat = string.format, table.concat

local _M = { _VERSION = "0.1" }

local Suppress = {}
local mt = { __index = Suppress }

local DEFAULT_CLASSES = { "invalid-recipient", "bad-domain", "inactive-mailbox" }

local SCHEMA = {
  path = { type = "string", default = "var/suppress" },
  check = { type = "enum", values = { "rcpt", "queue", "both", "none" }, default = "rcpt" },
  auto = { type = "any" },
  reply = { type = "table" },
  compact_min = { type = "nonneg", default = 10000 },
}

local AUTO_SCHEMA = {
  classes = { type = "list", default = function() return DEFAULT_CLASSES end },
  permanent_only = { type = "boolean", default = true },
}

-- Used when a delivery result carries no class (no moonpost.bounce in the
-- pipeline): the enhanced status codes that name the address or domain.
local CLASS_OF_STATUS = {
  ["5.1.1"] = "invalid-recipient",
  ["5.1.2"] = "bad-domain",
  ["5.1.10"] = "bad-domain",
  ["5.2.1"] = "inactive-mailbox",
}

-- Rows scanned between two turns of the loop in import_csv().
local IMPORT_BATCH = 5000

-- Long work (listing, import, compaction) lets the loop run between its
-- chunks. Not with sched.yield(): it re-arms a 0 ms timer, which libuv
-- before 1.46 runs again in the same pass over the timers, so a task that
-- yields in a loop keeps the loop from polling (fs callbacks, sockets)
-- until it is done. A 1 ms sleep ends the pass.
local function breathe()
  sched.sleep(0.001)
end

-- The form an address is kept and looked up in: an internationalized
-- domain by its A-labels (bob@bücher.example and bob@xn--bcher-kva.example
-- are one mailbox, as route.smtp treats them); the store lowercases ASCII.
local function canon(address)
  return dns.address_to_ascii(address) or address
end

local function tenant_of(t)
  if t == nil then return "" end
  if type(t) ~= "string" then return tostring(t) end
  return t
end

local function iso(t)
  return os.date("!%Y-%m-%dT%H:%M:%SZ", t)
end

local function check_reply(v)
  local where = "suppress.setup: field 'reply'"
  local code, enh, text = v[1], v[2], v[3]
  if type(code) ~= "number" or code % 1 ~= 0 or code < 400 or code > 599 then
    config.raise(format("%s: item 1: expected a 4xx or 5xx code, got %s", where, tostring(code)))
  end
  if enh ~= nil and (type(enh) ~= "string" or not enh:match("^[45]%.%d%d?%d?%.%d%d?%d?$")
      or enh:sub(1, 1) ~= tostring(code):sub(1, 1)) then
    config.raise(format("%s: item 2: expected an enhanced status code of class %d (like \"%d.7.1\"), got %s",
      where, math.floor(code / 100), math.floor(code / 100), tostring(enh)))
  end
  if text ~= nil and type(text) ~= "string" then
    config.raise(format("%s: item 3: expected a string, got %s", where, type(text)))
  end
  for k in pairs(v) do
    if type(k) ~= "number" or k < 1 or k > 3 or k % 1 ~= 0 then
      config.raise(format("%s: expected { code, enhanced, text }, got a field '%s'", where, tostring(k)))
    end
  end
  return { code = code, enhanced = enh or (tostring(code):sub(1, 1) .. ".7.1"),
    text = text or "{address} is on the suppression list" }
end

local function check_auto(v)
  if v == nil or v == false then return nil end
  if v == true then v = {} end
  if type(v) ~= "table" then
    config.raise("suppress.setup: field 'auto': expected true, false or { classes = ..., permanent_only = ... }, got "
      .. type(v))
  end
  local a = config.check("suppress.setup: auto", v, AUTO_SCHEMA)
  local bounce = require "moonpost.bounce"
  local set = {}
  for i, c in ipairs(a.classes) do
    -- a misspelt class would never match a bounce: the list would stay empty
    if type(c) ~= "string" or not bounce.describe(c) then
      config.raise(format("suppress.setup: auto: field 'classes': item %d: unknown class %s (known: %s)", i,
        type(c) == "string" and format("'%s'", c) or type(c), concat(bounce.CLASSES, ", ")))
    end
    set[c] = true
  end
  a.set = set
  return a
end

-- setup(opts) -> the block, which is also the store's handle.
function _M.setup(opts)
  local o = config.check("suppress.setup", opts, SCHEMA)
  if o.path == "" then config.raise("suppress.setup: field 'path': must not be empty") end
  o.auto = check_auto(o.auto)
  o.reply = check_reply(o.reply or { 550, "5.7.1" })
  local self = setmetatable({
    name = "suppress",
    opts = o,
    path = o.path,
    state = "new",     -- new -> open -> closing -> closed (-> open again at the next start)
    st = nil,          -- the core store while open
    wseq = 0,          -- changes made
    synced = 0,        -- changes known to be on disk
    syncing = false,
    hold = false,      -- a compaction is switching files: no sync starts
    dir_dirty = false, -- the directory needs an fsync (a new file, a rename)
    waiters = {},      -- flush(): { task, token, seq }
    idle_waiters = {}, -- tasks waiting for the sync in flight to end
    scan_waiters = {}, -- list/export/compaction take turns
    scanning = false,
    compacting = false,
    counters = { syncs = 0, refused = 0, suppressed = 0, auto_added = 0, compactions = 0 },
    on = {},
  }, mt)
  if o.check == "rcpt" or o.check == "both" then
    self.on.smtp_server_rcpt_to = function(txn, rcpt) return self:rcpt_check(txn, rcpt) end
  end
  if o.auto then
    self.on.delivery_bounced = function(env, rcpt, result) return self:auto_add(env, rcpt, result) end
  end
  return self
end

-- ---- opening and closing ----------------------------------------------------------------


local function dirname(path)
  return path:match("^(.*)/[^/]*$") or "."
end

local start_sync

-- open() -> true | nil, err: load the file (made if missing). mta:start()
-- calls it; the methods open the store themselves on first use.
function Suppress:open()
  if self.state == "open" then return true end
  if self.state == "closing" then return nil, "suppress: " .. self.path .. ": still closing" end
  local ok, err = fs.mkdir_p_now(dirname(self.path), 448)
  if not ok then return nil, "suppress: " .. tostring(err) end
  -- a compaction cut short by a crash: the log is whole, the copy is not
  local tmp = self.path .. ".compact"
  if uv.fs_stat(tmp) then
    log.warn("suppress: %s: removing an unfinished compaction (%s)", self.path, tmp)
    uv.fs_unlink(tmp)
  end
  local t0 = uv.hrtime()
  local st, rep, code = core.open(self.path)
  if not st then return nil, "suppress: " .. self.path .. ": " .. tostring(rep), code end
  local ms = (uv.hrtime() - t0) / 1e6
  self.st, self.state, self.report = st, "open", rep
  for _, b in ipairs(rep.bad) do
    log.error("suppress: %s: damaged line at offset %d skipped: %s", self.path, b.off, b.why)
  end
  if rep.corrupt > #rep.bad then
    log.error("suppress: %s: %d damaged lines skipped in all", self.path, rep.corrupt)
  end
  if rep.torn then
    log.warn("suppress: %s: cut a damaged tail at offset %d (%d lines, %s): a write the crash interrupted",
      self.path, rep.torn, rep.torn_lines, rep.torn_why)
  end
  log.info("suppress: %s: %d entries loaded in %.0f ms (%d records, %d octets)", self.path, rep.live, ms,
    rep.records, rep.size)
  if rep.size == 0 or rep.torn or rep.unterminated then
    -- a new file (its header and its name), a cut one, or one given its last LF: to disk
    self.dir_dirty = rep.size == 0
    self.wseq = self.wseq + 1
    start_sync(self)
  end
  self:maybe_compact()
  return true
end

-- The open store, opening it on first use; nil, err when closed.
function Suppress:store()
  if self.state == "open" then return self.st end
  if self.state == "new" then
    if require("moonpost").check_mode then return nil, "suppress: not opened by moonpost check" end
    local ok, err = self:open()
    if not ok then return nil, err end
    return self.st
  end
  return nil, "closed"
end

local function wake_waiters(list, a, b)
  for _, w in ipairs(list) do sched.wake_token(w[1], w[2], a, b) end
end

local function finish_close(self)
  if self.state ~= "closing" or self.syncing or self.compacting or self.scanning then return end
  if self.synced < self.wseq and not self.close_synced then
    -- the last changes to disk first
    self.close_synced = true
    start_sync(self)
    if self.syncing then return end
  end
  local live = self.st:count()
  self.st:close()
  self.st, self.state, self.close_synced = nil, "closed", nil
  local w = self.waiters
  self.waiters = {}
  wake_waiters(w, nil, "closed")
  log.info("suppress: %s: closed with %d entries (%d syncs)", self.path, live, self.counters.syncs)
end

-- close(): written changes are synced, then the file is closed (at once,
-- or when the sync or compaction in flight ends). Returns true.
function Suppress:close()
  if self.state == "open" then
    self.state = "closing"
    finish_close(self)
  elseif self.state == "new" then
    self.state = "closed"
  end
  return true
end

function Suppress:is_open()
  return self.state == "open"
end

-- ---- durability: group commit ------------------------------------------------------------

local function sync_done(self, target, failure)
  self.syncing = false
  self.counters.syncs = self.counters.syncs + 1
  if failure then
    log.error("suppress: %s: sync failed: %s", self.path, tostring(failure))
  elseif target > self.synced then
    self.synced = target
  end
  local keep, wake = {}, {}
  for _, w in ipairs(self.waiters) do
    if w[3] <= target then wake[#wake + 1] = w else keep[#keep + 1] = w end
  end
  self.waiters = keep
  for _, w in ipairs(wake) do
    if failure then sched.wake_token(w[1], w[2], nil, tostring(failure))
    else sched.wake_token(w[1], w[2], true) end
  end
  local idle = self.idle_waiters
  self.idle_waiters = {}
  wake_waiters(idle, true)
  if self.state == "closing" then return finish_close(self) end
  start_sync(self)
end

-- Write the buffered changes and fdatasync them in the thread pool. At
-- most one sync runs; changes made meanwhile go with the next one.
function start_sync(self)
  if self.syncing or self.hold or not self.st then return end
  if self.synced >= self.wseq and not self.dir_dirty then return end
  local target = self.wseq
  local ok, err = self.st:flush()
  if not ok then
    -- the buffer is kept: the next change or flush() tries again
    log.error("suppress: %s: %s", self.path, tostring(err))
    local keep, fail = {}, {}
    for _, w in ipairs(self.waiters) do
      if w[3] <= target then fail[#fail + 1] = w else keep[#keep + 1] = w end
    end
    self.waiters = keep
    wake_waiters(fail, nil, err)
    return
  end
  self.syncing = true
  local dir
  if self.dir_dirty then
    self.dir_dirty = false
    dir = dirname(self.path)
  end
  fs.sync_all({ self.st:fd() }, dir, "suppress: sync", function(failure)
    if failure and dir then self.dir_dirty = true end
    sync_done(self, target, failure)
  end)
end

-- A change was written to the buffer.
function Suppress:changed()
  self.wseq = self.wseq + 1
  start_sync(self)
  self:maybe_compact()
end

-- flush([timeout]) -> true | nil, err. In a task: returns once every
-- change made before the call is on disk (fdatasync done).
function Suppress:flush(timeout)
  if self.state == "new" then return true end
  if self.synced >= self.wseq then return true end
  if self.state == "closed" then return nil, "closed" end
  if not sched.current() then
    error("suppress:flush() waits for the disk: call it in a task (a hook, or moonpost.spawn)", 2)
  end
  local task, token = sched.reserve()
  self.waiters[#self.waiters + 1] = { task, token, self.wseq }
  start_sync(self)
  return sched.wait(timeout)
end

-- ---- entries ----------------------------------------------------------------------------------

local function check_address(method, address)
  if type(address) ~= "string" then
    error(format("suppress:%s(): address must be a string, got %s", method, type(address)), 3)
  end
end

-- add(tenant, address [, reason [, time]]) -> true (added) | false (there
-- already: the first entry and its reason stay) | nil, err
function Suppress:add(tenant, address, reason, time)
  check_address("add", address)
  if reason == nil then reason = "manual" end
  if type(reason) ~= "string" then error("suppress:add(): reason must be a string", 2) end
  if time ~= nil and type(time) ~= "number" then error("suppress:add(): time must be a number", 2) end
  local st, err = self:store()
  if not st then return nil, err end
  local ok, aerr = st:add(tenant_of(tenant), canon(address), reason, time)
  if ok == nil then return nil, aerr end
  if ok then
    self:changed()
    local m = self.mta
    if m and m.event_logs then
      m:event_log({ type = "Suppression", action = "added", tenant = tenant_of(tenant), recipient = address,
        reason = reason })
    end
  end
  return ok
end

-- remove(tenant, address) -> true | false (not there) | nil, err
function Suppress:remove(tenant, address)
  check_address("remove", address)
  local st, err = self:store()
  if not st then return nil, err end
  local ok = st:remove(tenant_of(tenant), canon(address))
  if ok then
    self:changed()
    local m = self.mta
    if m and m.event_logs then
      m:event_log({ type = "Suppression", action = "removed", tenant = tenant_of(tenant), recipient = address })
    end
  end
  return ok
end

-- check(tenant, address) -> nil | { reason = ..., time = ... }. Memory only.
function Suppress:check(tenant, address)
  check_address("check", address)
  local st, err = self:store()
  if not st then return nil, err end
  local t, reason = st:check(tenant_of(tenant), canon(address))
  if not t then return nil end
  return { reason = reason, time = t }
end

-- count([tenant]) -> entries of that tenant, or of all of them
function Suppress:count(tenant)
  local st = self:store()
  if not st then return 0 end
  if tenant == nil then return st:count() end
  return st:count(tenant_of(tenant))
end

-- ---- scans: list, export, compaction --------------------------------------------------------

local function lock_scan(self)
  while self.scanning do
    local task, token = sched.reserve()
    self.scan_waiters[#self.scan_waiters + 1] = { task, token }
    sched.wait()
  end
  self.scanning = true
end

local function unlock_scan(self)
  self.scanning = false
  local w = table.remove(self.scan_waiters, 1)
  if w then sched.wake_token(w[1], w[2], true) end
  if self.state == "closing" then finish_close(self) end
end

local function scan(self, st, tenant, fn, yield)
  local E, err = st:scan_begin()
  if not E then return nil, err end
  local pos, n = 0, 0
  while pos < E do
    local nxt, rows = st:read(pos, E, tenant)
    if not nxt then return nil, rows end
    for i = 1, #rows, 4 do
      n = n + 1
      if fn(rows[i + 1], rows[i + 2], rows[i + 3], rows[i]) == false then return n end
    end
    pos = nxt
    if yield and pos < E then
      breathe()
      if self.st ~= st or self.state ~= "open" then return nil, "closed" end
    end
  end
  return n
end

-- list(tenant, fn) -> entries listed | nil, err. fn(address, reason,
-- time, tenant) for each entry of that tenant (nil: of every tenant),
-- read from the file in chunks (in a task, the loop runs between them);
-- fn returning false stops the listing.
function Suppress:list(tenant, fn)
  if type(fn) ~= "function" then error("suppress:list(tenant, fn): fn must be a function", 2) end
  if tenant ~= nil then tenant = tenant_of(tenant) end
  local st, err = self:store()
  if not st then return nil, err end
  local in_task = sched.current() ~= nil
  if in_task then
    lock_scan(self)
  elseif self.scanning then
    return nil, "busy: a listing or compaction is running"
  else
    self.scanning = true
  end
  local ok, n, lerr = pcall(scan, self, st, tenant, fn, in_task)
  if self.st == st then st:scan_end() end
  unlock_scan(self)
  if not ok then error(n, 0) end
  return n, lerr
end

local function csv_field(s)
  s = tostring(s)
  if s:find('[",\r\n]') or s:match("^%s") or s:match("%s$") then
    return '"' .. s:gsub('"', '""') .. '"'
  end
  return s
end

-- csv_row(tenant, address, reason, time) -> one line of the CSV format
-- (export_csv, and the HTTP API's export)
function _M.csv_row(tenant, address, reason, time)
  return csv_field(tenant) .. "," .. csv_field(address) .. "," .. csv_field(reason) .. "," .. format("%d", time) .. "\n"
end

-- export_csv(path [, tenant]) -> rows written | nil, err. Columns:
-- tenant,address,reason,time (Unix seconds), with that header line.
function Suppress:export_csv(path, tenant)
  if type(path) ~= "string" then error("suppress:export_csv(path): path must be a string", 2) end
  local f, ferr = io.open(path, "wb")
  if not f then return nil, ferr end
  f:write("tenant,address,reason,time\n")
  local n, err = self:list(tenant, function(address, reason, time, ten)
    f:write(_M.csv_row(ten, address, reason, time))
  end)
  local ok, cerr = f:close()
  if not n then return nil, err end
  if not ok then return nil, cerr end
  return n
end

-- One CSV line -> fields | nil, why (RFC 4180 quoting; no line breaks
-- inside fields: no address has one).
local function csv_split(line)
  local out, i, n = {}, 1, #line
  while true do
    if line:sub(i, i) == '"' then
      local buf, j = {}, i + 1
      while true do
        local q = line:find('"', j, true)
        if not q then return nil, "unbalanced quote" end
        buf[#buf + 1] = line:sub(j, q - 1)
        if line:sub(q + 1, q + 1) == '"' then
          buf[#buf + 1] = '"'
          j = q + 2
        else
          i = q + 1
          break
        end
      end
      out[#out + 1] = concat(buf)
      local c = line:sub(i, i)
      if c == "," then
        i = i + 1
      elseif i > n then
        return out
      else
        return nil, "text after a quoted field"
      end
    else
      local c = line:find(",", i, true)
      out[#out + 1] = line:sub(i, (c or n + 1) - 1)
      if not c then return out end
      i = c + 1
    end
  end
end

local HEADER_NAMES = { tenant = "tenant", address = "address", email = "address", ["e-mail"] = "address",
  ["email address"] = "address", ["e-mail address"] = "address", email_address = "address",
  reason = "reason", time = "time", added = "time", added_at = "time" }

local function trim(s)
  return (s:gsub("^%s+", ""):gsub("%s+$", ""))
end

-- import_csv(path [, tenant]) -> { added, existing, skipped, invalid,
-- errors = { "line 3: bad address", ... } } | nil, err. A header line
-- names the columns (tenant, address or email, reason, time); without
-- one, the columns are address[,reason[,time]]. Rows without a tenant
-- column go to `tenant` ("" if nil); with one, and a `tenant` given, only
-- that tenant's rows are imported.
function Suppress:import_csv(path, tenant)
  if type(path) ~= "string" then error("suppress:import_csv(path): path must be a string", 2) end
  if tenant ~= nil then tenant = tenant_of(tenant) end
  local st, err = self:store()
  if not st then return nil, err end
  local f, ferr = io.open(path, "rb")
  if not f then return nil, ferr end
  local res = { added = 0, existing = 0, skipped = 0, invalid = 0, errors = {} }
  local function bad(lineno, why)
    res.invalid = res.invalid + 1
    if #res.errors < 100 then res.errors[#res.errors + 1] = format("line %d: %s", lineno, why) end
  end
  local in_task = sched.current() ~= nil
  local cols, lineno, unsynced = nil, 0, false
  for line in f:lines() do
    lineno = lineno + 1
    if lineno == 1 then line = line:gsub("^\239\187\191", "") end
    line = line:gsub("\r$", "")
    if line:match("^%s*$") or line:match("^#") then goto continue end
    -- Excel's "sep=," first line names the separator: not a row
    if not cols and line:match("^sep=.?$") then goto continue end
    do
      local fields, why = csv_split(line)
      if not fields then
        bad(lineno, why)
        goto continue
      end
      if not cols then
        local named = {}
        for i, name in ipairs(fields) do
          local c = HEADER_NAMES[trim(name):lower()]
          if c then named[c] = i end
        end
        if named.address then
          cols = named
          goto continue
        end
        cols = { address = 1, reason = 2, time = 3 }
      end
      local rt
      if cols.tenant then
        rt = trim(fields[cols.tenant] or "")
        if tenant ~= nil and rt ~= tenant then
          res.skipped = res.skipped + 1
          goto continue
        end
      else
        rt = tenant or ""
      end
      local address = trim(fields[cols.address] or "")
      if address == "" then
        bad(lineno, "no address")
        goto continue
      end
      -- a header row with other names ("Email Address,Reason") is not one
      if not address:find("@", 1, true) then
        bad(lineno, "not an address: " .. address:sub(1, 80))
        goto continue
      end
      local reason = cols.reason and fields[cols.reason] or ""
      if reason == "" then reason = "import" end
      local t
      local tv = cols.time and trim(fields[cols.time] or "") or ""
      if tv ~= "" then
        t = tonumber(tv)
        if not t or t < 0 or t % 1 ~= 0 or t > 4294967295 then
          bad(lineno, "time is not Unix seconds: " .. tv)
          goto continue
        end
      end
      local ok, aerr = st:add(rt, canon(address), reason, t)
      if ok then
        res.added = res.added + 1
        self.wseq = self.wseq + 1
        unsynced = true
      elseif ok == false then
        res.existing = res.existing + 1
      else
        bad(lineno, aerr)
      end
    end
    ::continue::
    if in_task and lineno % IMPORT_BATCH == 0 then
      if unsynced then
        unsynced = false
        start_sync(self)
      end
      breathe()
      if self.st ~= st or self.state ~= "open" then
        f:close()
        return nil, "closed"
      end
    end
  end
  f:close()
  if unsynced then self:changed() end
  log.info("suppress: %s: imported %s: %d added, %d there already, %d skipped, %d invalid", self.path, path,
    res.added, res.existing, res.skipped, res.invalid)
  local m = self.mta
  if m and m.event_logs then
    m:event_log({ type = "Suppression", action = "imported", tenant = tenant, file = path, added = res.added,
      existing = res.existing, skipped = res.skipped, invalid = res.invalid })
  end
  return res
end

local function compact(self)
  breathe()
  lock_scan(self)
  self.compact_locked = true
  local st, tmp = self.st, self.path .. ".compact"
  local t0 = uv.hrtime()
  local function stop(why)
    if why then log.error("suppress: %s: compaction stopped: %s", self.path, tostring(why)) end
    if st then st:compact_abort(tmp) end
    self.hold = false
    self.compacting = false
    self.compact_locked = false
    unlock_scan(self)
    start_sync(self)
  end
  if self.state ~= "open" or self.st ~= st then return stop() end
  local before = st:stats()
  local E, err = st:compact_begin(tmp)
  if not E then return stop(err) end
  local pos = 0
  while pos < E do
    local nxt, serr = st:compact_step(pos, E)
    if not nxt then return stop(serr) end
    pos = nxt
    breathe()
    if self.state ~= "open" then return stop() end
  end
  -- What was appended meanwhile, as it is; then the new file to disk. From
  -- here no sync of the old file starts, so nothing written after this
  -- point is acknowledged until it is in the new file.
  local ok, terr = st:compact_tail()
  if not ok then return stop(terr) end
  self.hold = true
  ok, terr = fs.fdatasync(st:compact_fd())
  if not ok then return stop(terr) end
  while self.syncing do
    local task, token = sched.reserve()
    self.idle_waiters[#self.idle_waiters + 1] = { task, token }
    sched.wait()
  end
  if self.state ~= "open" then return stop() end
  ok, terr = st:compact_finish(tmp, self.path)
  if not ok then return stop(terr) end
  -- the rename to disk with the next sync, which also acknowledges the
  -- changes held meanwhile
  self.dir_dirty = true
  self.hold = false
  self.compacting = false
  self.counters.compactions = self.counters.compactions + 1
  local after = st:stats()
  log.info("suppress: %s: compacted: %d entries, %d records of %d octets -> %d records of %d octets in %.0f ms",
    self.path, after.live, before.records, before.size, after.records, after.size, (uv.hrtime() - t0) / 1e6)
  self.compact_locked = false
  unlock_scan(self)
  start_sync(self)
end

-- Compaction starts when the log holds more dead lines (removed entries,
-- duplicates) than live entries, and at least compact_min of them.
function Suppress:maybe_compact(force)
  if self.compacting or self.state ~= "open" then return end
  local dead, live = self.st:garbage()
  if not force and (dead < self.opts.compact_min or dead <= live) then return end
  self.compacting = true
  sched.spawn_named("suppress compaction", function(err)
    log.error("suppress: %s: compaction failed: %s", self.path, tostring(err))
    if self.st then self.st:compact_abort(self.path .. ".compact") end
    self.hold = false
    self.compacting = false
    if self.compact_locked then
      self.compact_locked = false
      unlock_scan(self)
    end
    if self.state == "closing" then return finish_close(self) end
    start_sync(self) -- what was held back meanwhile
  end, compact, self)
end

-- compact() -> true | nil, err. In a task: compacts now and returns when done.
function Suppress:compact()
  if not sched.current() then error("suppress:compact() waits: call it in a task", 2) end
  local st, err = self:store()
  if not st then return nil, err end
  while self.compacting do sched.sleep(0.01) end
  local before = self.counters.compactions
  self:maybe_compact(true)
  while self.compacting do sched.sleep(0.01) end
  if self.counters.compactions == before then return nil, "compaction failed (see the log)" end
  return self:flush()
end

-- stats() -> { live, records, dead, memory, slots, size, pending, syncs, refused, suppressed, auto_added,
-- compactions, path, state }
function Suppress:stats()
  local out = {}
  for k, v in pairs(self.counters) do out[k] = v end
  if self.st then
    for k, v in pairs(self.st:stats()) do out[k] = v end
  end
  out.path, out.state = self.path, self.state
  return out
end

-- ---- the block ------------------------------------------------------------------------------------

function Suppress:attach(mta)
  if self.mta and self.mta ~= mta then
    config.raise("suppress: this block is already used by another MTA (one file, one writer)")
  end
  local n = mta.opts and mta.opts.workers or 1
  if n > 1 then
    -- each worker would open the file, and all but one find it locked
    config.raise(format("suppress.setup: a suppression list is kept by one process, and this policy runs %d "
      .. "workers; run it with workers = 1 (docs/suppress.md#workers)", n))
  end
  self.mta = mta
  local o = self.opts
  if o.check == "queue" or o.check == "both" then
    mta:add_delivery_filter(function(env, rcpt) return self:queue_check(env, rcpt) end)
  end
end

-- start() and stop() count their users: after a policy reload the old
-- block and the new one share the store (handover()), and the last stop
-- closes it.
function Suppress:start()
  if self.state == "closed" then self.state = "new" end
  local ok, err, code = self:open()
  if not ok then return nil, err, code end
  self.users = (self.users or 0) + 1
  return true
end

function Suppress:stop()
  self.users = (self.users or 1) - 1
  if self.users > 0 then return true end
  return self:close()
end

-- The fields a handle keeps when it shares another's store.
local OWN = { name = true, opts = true, path = true, on = true, mta = true, share_root = true }

-- handover(old): a policy reload. A block on the same file takes over the
-- open store of the block before it (one file, one writer): its state is
-- read and written through the old handle, while this one keeps its own
-- options (check, auto, reply). Both work until the last of them stops.
function Suppress:handover(old)
  local root = rawget(old, "share_root") or old
  if root.path ~= self.path or self.state ~= "new" or (root.state ~= "open" and root.state ~= "new") then
    return true
  end
  for k in pairs(self) do
    if not OWN[k] then self[k] = nil end
  end
  self.share_root = root
  setmetatable(self, { __index = root, __newindex = root })
  return true
end

local function render(text, address)
  return (text:gsub("{address}", function() return address end))
end

-- smtp_server_rcpt_to: the reply for a suppressed recipient
function Suppress:rcpt_check(txn, rcpt)
  local st = self.st
  if not st or rcpt.postmaster then return nil end
  local tenant = tenant_of(txn.tenant)
  local t, reason = st:check(tenant, canon(rcpt.address))
  if not t then return nil end
  self.counters.refused = self.counters.refused + 1
  log.info("%s: to=<%s> refused: on the suppression list of tenant \"%s\" (%s, since %s)", txn.id,
    rcpt.address, tenant, reason, iso(t))
  local r = self.opts.reply
  local make = r.code >= 500 and hooks.reject or hooks.tempfail
  return make(r.code, r.enhanced, render(r.text, rcpt.address))
end

-- the delivery filter (check = "queue"): a suppressed recipient is dropped
function Suppress:queue_check(env, rcpt)
  local st = self.st
  if not st then return nil end
  local t, reason = st:check(tenant_of(env.tenant), canon(rcpt.address))
  if not t then return nil end
  self.counters.suppressed = self.counters.suppressed + 1
  return { status = "suppressed", reason = reason, since = t,
    text = format("on the suppression list of tenant \"%s\" (%s, since %s)", tenant_of(env.tenant), reason, iso(t)) }
end

-- delivery_bounced (auto): hard bounces of the listed classes are added
function Suppress:auto_add(env, rcpt, result)
  local a = self.opts.auto
  if (env.from or "") == "" then return end -- a DSN that bounced: not the tenant's recipient
  -- a refusal at MAIL FROM is about the sender (an account suspended at a
  -- relay, a sender domain refused): it says nothing of any recipient
  if result.stage == "MAIL FROM" then return end
  local class = result.class
  if class == nil then class = CLASS_OF_STATUS[result.enhanced or ""] end
  if not class or not a.set[class] then return end
  if a.permanent_only then
    local permanent = result.permanent
    if permanent == nil then
      permanent = not result.expired and ((result.code or 0) >= 500 or (result.enhanced or ""):sub(1, 1) == "5")
    end
    if not permanent then return end
  end
  local ok, err = self:add(env.tenant, rcpt.address, class)
  if ok then
    self.counters.auto_added = self.counters.auto_added + 1
    log.info("%s: to=<%s> added to the suppression list of tenant \"%s\": %s (%s %s %s)", env.id, rcpt.address,
      tenant_of(env.tenant), class, tostring(result.code or ""), tostring(result.enhanced or ""),
      tostring(result.text))
  elseif ok == nil then
    log.error("%s: to=<%s>: cannot add to the suppression list: %s", env.id, rcpt.address, tostring(err))
  end
end

return _M
