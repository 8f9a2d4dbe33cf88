-- The durable spool: a log of segment files under <dir>/seg/.
--
--   local sp, err = spool.open { dir = "/var/spool/moonpost" }
--   local ok, err, code = sp:store(txn, msg)  -- in a task: returns once on disk
--   sp:accepting()                           -- false while the disk is full
--   local m = sp:get(id); local env, body = sp:read(m)
--   sp:update(id, state)                     -- a state change (attempts, results)
--   sp:done(id)                              -- finished: reclaimable
--
-- A message's entry (sp:get, sp:each) keeps its fields in array slots,
-- named by the module's constants: m[spool.ID] (the id, a number),
-- m[spool.ATTEMPTS], m[spool.NEXT] (the time of its next attempt, 0 for
-- now), m[spool.SEG], m[spool.OFF], m[spool.LEN] (where its record is).
-- An array slot costs 8 bytes and a field of the hash part 24, and a hash
-- part doubles past eight fields: a million queued messages took 300 MB
-- of Lua heap with named fields, 230 with slots (scripts/bench/memory.lua).
-- Fields few messages have stay named: rdone (recipient index -> final),
-- warned, and the queue's key, tenant and rnext.
--
-- Records go to the page cache from the loop (core/spool.c, pwritev straight
-- from the message buffer). Group commit: at most one fdatasync runs at a
-- time, in the libuv thread pool; every store() waiting when it starts is
-- answered when it ends, and the stores that arrive meanwhile form the next
-- batch. A new segment file is made durable with an fsync of its directory
-- in the same batch.
--
-- Preallocation: the segments records are appended to are made ahead of
-- time by a task, filled with zeros and synced (seg/prealloc, renamed when
-- it becomes the head). Appending into blocks already written changes
-- neither the file's size nor its block map, so a group commit's fdatasync
-- writes the data and flushes the disk's cache, with nothing for the
-- filesystem's journal: 0.11 ms against 0.19-0.25 ms on this project's
-- machines when idle. The records end where the zeros begin (core/spool.h).
--
-- Reclamation is oldest-first: a segment is deleted when it and every older
-- segment hold no live message (a younger segment may hold the state records
-- of an older one's messages). An old segment that keeps a few live messages
-- is compacted: the live messages are copied to the head as COPY records
-- carrying their current state, the copies are synced, and only then is the
-- old segment deleted. A crash in between leaves both copies; recovery keeps
-- the later one. Nothing is lost and nothing is delivered twice.
local uv = require "luv"
local clock = require "moonpost.runtime.clock"
local cjson = require "cjson.safe"
local core = require "moonpost.core.spool"
local sched = require "moonpost.runtime.sched"
local log = require "moonpost.runtime.log"
local ids = require "moonpost.runtime.ids"
local fs = require "moonpost.runtime.fs"
local fifo = require "moonpost.runtime.fifo"
local tnew = require "table.new"

local MSG, STATE, DONE, F_COPY, F_DSN, F_VOID = core.MSG, core.STATE, core.DONE, core.F_COPY, core.F_DSN,
  core.F_VOID
local format, tonumber, pairs, ipairs, type = string.format, tonumber, pairs, ipairs, type
local band = require("bit").band
local reserve, wake_token, wait = sched.reserve, sched.wake_token, sched.wait
local encode, decode = cjson.encode, cjson.decode

local _M = { _VERSION = "0.1" }

local ID, ATTEMPTS, NEXT, SEG, OFF, LEN = 1, 2, 3, 4, 5, 6
_M.ID, _M.ATTEMPTS, _M.NEXT, _M.SEG, _M.OFF, _M.LEN = ID, ATTEMPTS, NEXT, SEG, OFF, LEN

local COMPACT_RETRY_MS = 10000 -- a compaction that failed is tried again after this
local PREALLOC_NAME = "prealloc"  -- seg/prealloc: the next head, being filled with zeros
local PREALLOC_FIRST = 4 * 1048576 -- the first one's size; each next one twice the last, up to segment_size
local ZERO_CHUNK = 1048576        -- zeros written (and synced) at a time
local TMPFS_MAGIC = 0x01021994    -- statfs type of tmpfs: memory, no device to spare a sync
-- statfs types of copy-on-write file systems: a write into zeros allocates
-- new blocks anyway, so zeros written ahead are twice the writes for nothing
local COW_MAGIC = { [0x9123683E] = "btrfs", [0x2FC12FC1] = "ZFS", [0xCA451A4E] = "bcachefs" }

local Spool = {}
local mt = { __index = Spool }

local DEFAULTS = {
  segment_size = 64 * 1048576,
  preallocate = true,      -- append into zero-filled segments made ahead of time
  compact_ratio = 0.5,     -- compact the oldest segment when live bytes fall below this share
  min_free = 64 * 1048576, -- refuse new mail (452 4.3.1) below this much free space
  check_interval = 2,      -- seconds between free-space checks
  lazy_sync = 0.1,         -- state records reach the disk within this many seconds
  compact_delay = 60,      -- seconds a segment is closed before dense ones are compacted
  cache_bytes = 64 * 1048576, -- messages kept in memory after their store, for delivery
}

-- ---- helpers ------------------------------------------------------------------------

local function seg_name(num)
  return format("%016d.seg", num)
end

local function mkdir_sync(path)
  local ok, err = fs.mkdir_p_now(path, 448)
  if not ok then return nil, err end
  uv.fs_chmod(path, 448)
  return true
end

local function list_segments(dir)
  return fs.list_numbered(dir, "seg")
end

local NO_CONN = {}

-- The envelope written with each message (JSON metadata of its MSG record).
local function envelope_of(txn)
  local rcpts = tnew(#txn.recipients, 0)
  for i, r in ipairs(txn.recipients) do
    rcpts[i] = { a = r.address, n = r.notify, o = r.orcpt }
  end
  local conn = txn.conn or NO_CONN
  -- the fields most messages have; the others only when set (a table
  -- constructor sizes the table for every key it names, set or not: 16
  -- slots where 8 do, for every message)
  local e = {
    v = 1,
    from = txn.sender and txn.sender.address or "",
    rcpt = rcpts,
    t = txn.received_at or clock.time(),
    ip = conn.remote_ip,
    helo = conn.helo,
  }
  if txn.tenant ~= nil then e.tenant = tostring(txn.tenant) end
  if txn.pool ~= nil then e.pool = txn.pool end
  if txn.ret ~= nil then e.ret = txn.ret end
  if txn.envid ~= nil then e.envid = txn.envid end
  if txn.body_type ~= nil then e.body = txn.body_type end
  if txn.smtputf8 then e.utf8 = true end
  if txn.dsn then e.dsn = true end
  -- a DSN: the message it reports on (hex id), the recipients it makes
  -- final (indexes) and its action (see "DSNs and crashes" in recover)
  local of = txn.dsn_of
  if of then
    e.of, e.act = of.id, of.action
    if of.done and #of.done > 0 then e.ri = of.done end
  end
  return e
end

-- encode_envelope(envt) -> the JSON of an envelope_of() table. lua-cjson
-- formats every number through snprintf("%.14g"), which was half of what
-- encoding an envelope cost (callgrind: 5k of 10k instructions, a fifth of
-- what the durable spool adds to a message); the two integers are written
-- here and lua-cjson does the rest.
local MAX_INT = 9007199254740992

local function is_int(v)
  return type(v) == "number" and v % 1 == 0 and v > -MAX_INT and v < MAX_INT
end

function _M.encode_envelope(e)
  local v, t = e.v, e.t
  if not is_int(v) or not is_int(t) then return encode(e) end
  e.v, e.t = nil, nil
  local rest, err = encode(e)
  e.v, e.t = v, t
  if not rest then return nil, err end
  if rest == "{}" then return format('{"v":%d,"t":%d}', v, t) end
  return format('{"v":%d,"t":%d,', v, t) .. rest:sub(2)
end

-- ---- open and recover -------------------------------------------------------------------

-- open(opts) -> spool | nil, err. Takes the lock, recovers every segment and
-- starts a new head segment. Runs before the listeners open; it may block.
function _M.open(opts)
  local self = setmetatable({
    dir = opts.dir:gsub("/+$", ""),
    msgs = {},        -- id -> message entry
    nlive = 0,
    segs = {},        -- num -> segment entry
    order = {},       -- segment numbers, oldest first
    head = nil,
    dirty = {},       -- segments written since the last sync started
    dir_dirty = false,
    waiters = {},     -- tasks waiting for the next sync: task, token pairs
    syncing = false,
    full = false,
    stats = { batches = 0, synced = 0, fsyncs = 0, stored = 0, bytes = 0, quarantined = 0,
      torn = 0, recovered = 0, compactions = 0, deleted = 0 },
    fault = opts.fault or {},
    cache = {},       -- id -> { msg, env } for messages stored by this process
    cache_order = fifo.new(), -- ids, oldest first (and ids uncached since)
    ncached = 0,
    cached_bytes = 0,
    compact_retry_at = 0,
    -- DONE ids and updated message ids since the last sync started: written
    -- again when that sync fails (a failed write drops what was buffered)
    unsynced_done = {},
    unsynced_state = {},
  }, mt)
  for k, v in pairs(DEFAULTS) do
    -- (not `opts[k] ~= nil and opts[k] or v`: that turns false into the default)
    if opts[k] == nil then self[k] = v else self[k] = opts[k] end
  end
  if opts.readonly then
    -- Inspection (moonpost spool list): no lock, no change to any file.
    -- Works beside a running server. Envelopes are kept in memory (m.env),
    -- or with envelopes = false read when asked (spool.envelope(m)): a million
    -- queued messages then take ~150 MB to list, not gigabytes.
    self.readonly = true
    self.keep_env = opts.envelopes ~= false
    -- seg/ missing (or not a directory) is no spool; one that cannot be
    -- read is an error, not an empty spool
    local seg = self.dir .. "/seg"
    local st, serr, scode = uv.fs_stat(seg)
    if (not st and (scode == "ENOENT" or scode == "ENOTDIR")) or (st and st.type ~= "directory") then
      return nil, "spool: no spool at " .. self.dir
    end
    local req = st and uv.fs_scandir(seg)
    if not req then
      if st then serr = select(2, uv.fs_scandir(seg)) end
      return nil, "spool: cannot read " .. seg .. ": " .. tostring(serr)
    end
    local ok, err = self:recover()
    if not ok then return nil, err end
    return self
  end
  local ok, err = mkdir_sync(self.dir)
  if not ok then return nil, "spool: cannot create " .. self.dir .. ": " .. tostring(err) end
  local lock, lerr = core.lock(self.dir)
  if not lock then return nil, lerr end
  self.lock = lock
  for _, sub in ipairs({ "seg", "quarantine" }) do
    ok, err = mkdir_sync(self.dir .. "/" .. sub)
    if not ok then
      lock:close()
      return nil, "spool: cannot create " .. self.dir .. "/" .. sub .. ": " .. tostring(err)
    end
  end
  -- a next head that was being prepared when the last process ended
  uv.fs_unlink(self.dir .. "/seg/" .. PREALLOC_NAME)
  local t0 = uv.hrtime()
  ok, err = self:recover()
  if not ok then
    self:close()
    return nil, err
  end
  self.stats.recover_seconds = (uv.hrtime() - t0) / 1e9
  ok, err = self:new_head()
  if not ok then
    self:close()
    return nil, err
  end
  self:reclaim()
  self:check_space()
  return self
end

local function quarantine(self, seg, off, len, why)
  if self.readonly then
    self.stats.quarantined = self.stats.quarantined + 1
    log.warn("spool: %s offset %d: %d damaged bytes (%s)", seg_name(seg.num), off, len, why)
    return
  end
  local qname = format("%s/quarantine/%s-%d.bad", self.dir, seg_name(seg.num), off)
  local data = seg.file:read(off, len) or ""
  local f = io.open(qname, "wb")
  if f then
    f:write(data)
    f:close()
    uv.fs_chmod(qname, 384)
  end
  local wname = qname:gsub("%.bad$", ".why")
  local w = io.open(wname, "wb")
  if w then
    w:write(format("segment %s offset %d length %d: %s\n", seg_name(seg.num), off, #data, why))
    w:close()
    uv.fs_chmod(wname, 384)
  end
  self.stats.quarantined = self.stats.quarantined + 1
  log.error("spool: %s offset %d: %d damaged bytes quarantined (%s) as %s", seg_name(seg.num), off,
    #data, why, qname)
end

-- (from a record: a recipient index that is not a positive integer is passed
-- over). pending, at recovery: message id -> recipients not yet final.
local function apply_state(m, st, pending)
  if type(st) ~= "table" then return end
  if type(st.done) == "table" then
    m.rdone = m.rdone or {}
    for _, i in ipairs(st.done) do
      if type(i) == "number" and i >= 1 and i % 1 == 0 and not m.rdone[i] then
        m.rdone[i] = true
        if pending then pending[m[ID]] = pending[m[ID]] - 1 end
      end
    end
  end
  if st.attempts then m[ATTEMPTS] = st.attempts end
  if st.next then m[NEXT] = st.next end
  if st.warned then m.warned = true end
end

local function add_live(m, seg, off, len)
  m[SEG], m[OFF], m[LEN] = seg, off, len
  seg.live = seg.live + 1
  seg.live_bytes = seg.live_bytes + len
end

local function drop_live(m)
  local seg = m[SEG]
  seg.live = seg.live - 1
  seg.live_bytes = seg.live_bytes - m[LEN]
end

function Spool:recover()
  local nums = list_segments(self.dir .. "/seg")
  local max_id = 0
  local unknown, dups = 0, 0
  local idx, vanished = 0, false
  local reports = {} -- DSN id -> its envelope: { of, ri, act }
  -- id -> recipients not yet final (not in the entries: not needed after this)
  local pending = {}
  while true do
    if idx == #nums then
      if not vanished then break end
      -- Read-only, beside a running server, a segment was deleted since the
      -- listing: its messages were finished, or compaction copied them
      -- forward first, perhaps to a segment made after the listing.
      vanished = false
      local last = nums[#nums]
      for _, n in ipairs(list_segments(self.dir .. "/seg")) do
        if n > last then nums[#nums + 1] = n end
      end
      if idx == #nums then break end
    end
    idx = idx + 1
    local num = nums[idx]
    local path = format("%s/seg/%s", self.dir, seg_name(num))
    local file, err, code = core.open(path, false)
    if not file then
      if not (self.readonly and code == "ENOENT") then
        return nil, "spool: cannot open " .. path .. ": " .. tostring(err)
      end
      vanished = true
      goto next_segment
    end
    local seg = { num = num, path = path, file = file, size = file:size(), live = 0, live_bytes = 0, fd_users = 0 }
    self.segs[num] = seg
    self.order[#self.order + 1] = num
    local sc = file:scan()
    local data_end
    -- Envelopes are not decoded (but for listing): the recipient count is in
    -- the record header and the arrival time in the id.
    local skip_meta = not self.keep_env
    while true do
      local kind, a, b, c, d, e, f, g = sc:next(skip_meta)
      if kind == nil then break end
      if kind == "rec" then
        local off, len, rtype, flags, id, meta, aux = a, b, c, d, e, f, g
        if id > max_id then max_id = id end
        if rtype == MSG then
          local env, nrcpt = nil, aux
          if meta then
            env = decode(meta)
            nrcpt = env and type(env.rcpt) == "table" and #env.rcpt or 0
          end
          local m = self.msgs[id]
          if env and band(flags, F_DSN) ~= 0 and type(env.of) == "string" then reports[id] = env end
          if nrcpt == 0 then
            quarantine(self, seg, off, len, "message without recipients")
          elseif m and band(flags, F_COPY) ~= 0 then
            -- a compaction copy supersedes the older copy of the message; its
            -- state follows in a STATE record; the state known so far stays (a recipient once final
            -- stays final, even if a crash came between the two records)
            drop_live(m)
            add_live(m, seg, off, len)
            if self.keep_env then m.env = env end
          elseif m then
            dups = dups + 1
            log.warn("spool: %s offset %d: duplicate message id %s ignored", seg_name(num), off, ids.hex(id))
          else
            m = { id, 0, 0, false, 0, 0 }
            pending[id] = nrcpt
            if self.keep_env then m.env = env end
            add_live(m, seg, off, len)
            self.msgs[id] = m
            self.nlive = self.nlive + 1
          end
        elseif rtype == STATE then
          local m = self.msgs[id]
          if m then apply_state(m, decode(meta), pending) else unknown = unknown + 1 end
        elseif rtype == DONE then
          if band(flags, F_VOID) ~= 0 then reports[id] = nil end
          local m = self.msgs[id]
          if m then
            drop_live(m)
            self.msgs[id] = nil
            self.nlive = self.nlive - 1
          else
            unknown = unknown + 1
          end
        end
      elseif kind == "corrupt" then
        quarantine(self, seg, a, b, c)
      elseif kind == "torn" then
        local off, why = a, b
        local size = file:size()
        if self.readonly then
          -- the head of a running server may be mid-write: not damage
          if idx < #nums then quarantine(self, seg, off, size - off, why) end
          break
        end
        if idx < #nums then
          -- damage at the end of an older segment: keep it for inspection
          quarantine(self, seg, off, size - off, why)
        else
          self.stats.torn = self.stats.torn + 1
          log.warn("spool: %s: torn tail at offset %d (%s): %d bytes truncated", seg_name(num), off, why,
            size - off)
        end
        local ok, terr = file:truncate(off)
        if not ok then return nil, "spool: cannot truncate " .. path .. ": " .. tostring(terr) end
        break
      elseif kind == "zeros" then
        -- preallocated space the records did not reach: the file ends with them
        data_end = a
        if not self.readonly then
          local ok, terr = file:truncate(a)
          if not ok then return nil, "spool: cannot truncate " .. path .. ": " .. tostring(terr) end
        end
        break
      else
        return nil, format("spool: cannot read %s: %s", path, tostring(a))
      end
    end
    seg.size = data_end or file:size()
    ::next_segment::
  end
  -- DSNs and crashes: a DSN is stored (and synced) before the state record
  -- of the message it reports on, which follows with a later sync. After a
  -- crash between the two, that message's recipients would be tried again,
  -- and fail again: a second DSN. The DSN's record says which recipients it
  -- made final (and that a delay warning went): applied here, whatever
  -- came of the DSN since (unless it was never acknowledged, F_VOID).
  for _, env in pairs(reports) do
    local m = self.msgs[tonumber(env.of, 16)]
    if m then
      apply_state(m, { done = env.act == "failed" and env.ri or nil, warned = env.act == "delayed" }, pending)
    end
  end
  -- messages whose every recipient is final but whose DONE record was lost
  for id, m in pairs(self.msgs) do
    if pending[id] <= 0 then
      drop_live(m)
      self.msgs[id] = nil
      self.nlive = self.nlive - 1
    end
  end
  ids.bump(max_id)
  self.stats.recovered = self.nlive
  if unknown > 0 or dups > 0 then
    log.info("spool: %d state records for finished messages, %d duplicates ignored", unknown, dups)
  end
  log.info("spool: %s: %d segments, %d messages queued", self.dir, #self.order, self.nlive)
  return true
end

local prepare_next, discard_prepared

function Spool:new_head()
  local num = (self.order[#self.order] or 0) + 1
  local path = format("%s/seg/%s", self.dir, seg_name(num))
  local file, err, code, prealloc
  local p = self.prepared
  if p then
    -- the zero-filled file made ahead (its new name is durable with the
    -- directory's fsync in the next batch, before any record in it is)
    self.prepared = nil
    local ok, rerr = uv.fs_rename(p.path, path)
    if ok then
      file, prealloc = p.file, p.size
    else
      log.warn("spool: cannot rename %s to %s: %s", p.path, path, tostring(rerr))
      discard_prepared(p.file, p.path)
    end
  end
  if not file then
    file, err, code = core.open(path, true)
    if not file then return nil, "spool: cannot create " .. path .. ": " .. tostring(err), code end
  end
  local seg = { num = num, path = path, file = file, size = 0, live = 0, live_bytes = 0, fd_users = 0,
    prealloc = prealloc }
  self.segs[num] = seg
  self.order[#self.order + 1] = num
  if self.head then self.head.closed_at = uv.now() end
  self.head = seg
  self.dir_dirty = true
  prepare_next(self)
  return seg
end

-- ---- preallocation -------------------------------------------------------------------------

local zeros -- ZERO_CHUNK zero bytes, made at first use

-- The size of the next file to prepare, or nil: none on tmpfs (memory: no
-- device, and every zero would take RAM) or a copy-on-write file system,
-- and none that would bring the free space near min_free (it is kept for
-- messages).
local function prealloc_size(self)
  local size = math.min(self.segment_size, self.next_prealloc or PREALLOC_FIRST)
  local st = uv.fs_statfs(self.dir)
  if not st or st.type == TMPFS_MAGIC then return nil end
  local cow = COW_MAGIC[st.type]
  if cow then
    if not self.cow_said then
      self.cow_said = true
      log.info("spool: %s is on %s (copy-on-write): segments are not preallocated", self.dir, cow)
    end
    return nil
  end
  if st.bavail * st.bsize < self.min_free + 2 * size then return nil end
  return size
end

local function fill(self, file, size)
  zeros = zeros or string.rep("\0", ZERO_CHUNK)
  local fd, off = file:fd(), 0
  while off < size do
    if self.closed then return nil, "spool closed" end
    local n = math.min(ZERO_CHUNK, size - off)
    local ok, err = fs.write_all(fd, n == ZERO_CHUNK and zeros or zeros:sub(1, n), off)
    if not ok then return nil, err end
    -- synced a chunk at a time: one sync of the whole file would hold the
    -- disk's queue, and every waiting 250 with it, for tens of milliseconds
    ok, err = fs.fdatasync(fd)
    if not ok then return nil, err end
    off = off + n
  end
  return true
end

-- Close and remove a prepared file, if the name is still its own: a spool
-- opened on the same directory after this one closed (a reload, a test) may
-- have made its own seg/prealloc meanwhile.
function discard_prepared(file, path)
  local mine, there = uv.fs_fstat(file:fd()), uv.fs_stat(path)
  file:close()
  if mine and there and mine.ino == there.ino and mine.dev == there.dev then uv.fs_unlink(path) end
end

-- Make the next head ahead of time (a task; see the top of this file).
function prepare_next(self)
  if not self.preallocate or self.preparing or self.prepared or self.closed or self.readonly then return end
  local size = prealloc_size(self)
  if not size then return end
  self.preparing = true
  local path = format("%s/seg/%s", self.dir, PREALLOC_NAME)
  sched.spawn_named("spool preallocation", function(err)
    self.preparing = false
    log.error("spool: preallocation: %s", tostring(err))
  end, function()
    uv.fs_unlink(path)
    local file, err = core.open(path, true)
    local ok = file ~= nil
    if ok then ok, err = fill(self, file, size) end
    self.preparing = false
    if not ok then
      if file then discard_prepared(file, path) end
      if not self.closed then log.warn("spool: cannot preallocate %s: %s", path, tostring(err)) end
      return
    end
    if self.closed then
      discard_prepared(file, path)
      return
    end
    self.prepared = { file = file, path = path, size = size }
    self.next_prealloc = size * 2
  end)
end

-- ---- writing -------------------------------------------------------------------------------

-- set_full(self, code [, need]): refuse new mail. need: the size of the
-- write that failed; acceptance resumes once that much is free above
-- min_free (the space the failed write gave back when its file was cut is
-- not "space returning": the next such message would fail the same way).
local function set_full(self, code, need)
  if not self.full then
    log.error("spool: %s: %s; refusing new mail until space returns", self.dir, code or "write failed")
  end
  self.full = code or true
  if need and need > (self.full_need or 0) then self.full_need = need end
end

local function append(self, rtype, flags, id, meta, body, aux)
  -- closed (the MTA stopped with deliveries still out): nothing more is
  -- written; an outcome not recorded means one more attempt after a restart
  if self.closed then return nil, "spool is closed", "CLOSED" end
  local seg = self.head
  -- a new head when this one is full, or when a preallocated one is ready
  -- and this one's own preallocated space (if any) is used up
  if seg.size >= self.segment_size or (self.prepared and seg.size >= (seg.prealloc or 0)) then
    local nseg, err, code = self:new_head()
    if not nseg then return nil, err, code end
    seg = nseg
  end
  local off, len, code = seg.file:append(rtype, flags, id, meta, body, aux)
  if not off then
    if code == "ENOSPC" or code == "EDQUOT" or code == "EIO" then
      set_full(self, code, #(meta or "") + (type(body) == "string" and #body or body and body:size() or 0))
    end
    return nil, len, code
  end
  seg.size = off + len
  self.dirty[seg] = true
  self.stats.bytes = self.stats.bytes + len
  return seg, off, len
end

local lazy_sync, rewrite_later, sync_soon

local function state_of(m)
  local done = {}
  for k in pairs(m.rdone or {}) do done[#done + 1] = k end
  table.sort(done)
  return encode({ done = #done > 0 and done or nil, attempts = m[ATTEMPTS], next = m[NEXT],
    warned = m.warned or nil })
end

-- A failed write or sync may have lost the DONE and STATE records of this
-- batch: they are written again when the disk takes writes (check_space),
-- or else a restart would deliver again what was already delivered. (Some
-- may have reached the disk: a second DONE or the same state again is
-- harmless at recovery.) The free-space check every check_interval seconds
-- writes them.
function rewrite_later(self, done_ids, state_ids)
  if #done_ids == 0 and not next(state_ids) then return end
  local pend = self.pending_done or {}
  for i = 1, #done_ids do pend[done_ids[i]] = true end
  if next(pend) then self.pending_done = pend end
  local ps = self.pending_state or {}
  for id in pairs(state_ids) do
    if self.msgs[id] then ps[id] = true end
  end
  if next(ps) then self.pending_state = ps end
end

-- flush_segment(seg) -> true | nil, err, code, buffered: what is buffered
-- for seg, to its file
local function flush_segment(seg)
  local buffered = seg.file:pending()
  local ok, err, code = seg.file:flush()
  if ok then return true end
  seg.size = seg.file:size()
  return nil, err, code, buffered
end

-- A segment's file is closed only once no read or sync of it is in flight.
-- Both run in the thread pool with the fd they were given when they were
-- queued, and compaction (or the last DONE of a segment) may delete the
-- segment before a pool thread gets to it: closed under them, the fd would
-- fail them with EBADF (a failed sync fails its whole batch: 451 to every
-- transaction in it), or reach whatever file was given that number since.
-- A deleted file stays readable and syncable through the fd until the last
-- user releases it.
local function close_segment(seg)
  if seg.fd_users == 0 then
    seg.file:close()
    return
  end
  -- what is buffered goes to the file now, as close() would have written it
  if seg.file:pending() > 0 then seg.file:spill() end
  seg.retired = true
end

local function hold_fd(seg)
  seg.fd_users = seg.fd_users + 1
  return seg.file:fd()
end

local function release_fd(seg)
  local n = seg.fd_users - 1
  seg.fd_users = n
  if n == 0 and seg.retired then seg.file:close() end
end

local function start_sync(self)
  local batch = self.waiters
  self.waiters = tnew(32, 0) -- (a batch's pairs: sized, not rehashed as it grows)
  self.syncing = true
  local done_ids, state_ids = self.unsynced_done, self.unsynced_state
  if #done_ids > 0 then self.unsynced_done = tnew(16, 0) end
  if next(state_ids) then self.unsynced_state = {} end
  local segs = {}
  for seg in pairs(self.dirty) do segs[#segs + 1] = seg end
  self.dirty = {}
  local failure
  -- Write what is buffered (one write per segment), then sync. A failed
  -- write fails the whole batch: its records are gone from the file.
  local fds, held = {}, {}
  for i = 1, #segs do
    -- (an error here must fail this batch, not end start_sync half-way: the
    -- spool would stay "syncing" and no 250 would ever come again)
    local pok, ok, err, code, buffered = pcall(flush_segment, segs[i])
    if not pok then ok, err = nil, ok end
    if ok then
      -- (held open until the sync ends: the segment may be deleted meanwhile)
      held[#held + 1] = segs[i]
      fds[#fds + 1] = hold_fd(segs[i])
    else
      failure = failure or err
      if code == "ENOSPC" or code == "EDQUOT" or code == "EIO" then set_full(self, code, buffered) end
      log.error("spool: %s: %s", seg_name(segs[i].num), tostring(err))
    end
  end
  -- a new segment is durable once its directory entry is
  local dir
  if self.dir_dirty then
    self.dir_dirty = false
    dir = self.dir .. "/seg"
  end
  self.stats.fsyncs = self.stats.fsyncs + fs.sync_all(fds, dir, "spool: sync", function(err)
    for i = 1, #held do release_fd(held[i]) end
    failure = failure or err
    -- the next batch syncs the directory again
    if err and dir then self.dir_dirty = true end
    self.syncing = false
    if failure then rewrite_later(self, done_ids, state_ids) end
    self.stats.batches = self.stats.batches + 1
    self.stats.synced = self.stats.synced + #batch / 2
    for i = 1, #batch, 2 do
      wake_token(batch[i], batch[i + 1], not failure and true or nil, failure)
    end
    if #self.waiters > 0 then
      sync_soon(self)
    elseif next(self.dirty) then
      lazy_sync(self) -- state records written while this sync ran
    end
  end)
end

-- A batch starts once the loop iteration that asked for it has run its
-- callbacks: every transaction whose data ended in the same iteration joins
-- it, and its records go out in one write. An idle handle, which runs at
-- the start of the next iteration: while one is active the loop does not
-- block for I/O, where a check handle armed outside the poll phase (from a
-- timer, or a task resumed from the scheduler's idle handle) would wait
-- for the next I/O or timer to run.
local function make_sync_idle(self)
  local h = uv.new_idle()
  self.sync_idle = h
  self.sync_idle_cb = function()
    h:stop()
    self.sync_armed = false
    if not self.syncing and #self.waiters > 0 then
      local ok, err = pcall(start_sync, self)
      if not ok then log.error("spool: sync: %s", tostring(err)) end
    end
  end
  return h
end

function sync_soon(self)
  if self.sync_armed then return end
  -- (a closed spool makes no handle: its last batches start at once)
  if self.closed then return start_sync(self) end
  local h = self.sync_idle or make_sync_idle(self)
  h:start(self.sync_idle_cb)
  self.sync_armed = true
end

-- sync() waits until everything written so far is on disk.
function Spool:sync()
  -- nothing written since the last sync: a batch would end before the wait
  if not self.syncing and not next(self.dirty) and not self.dir_dirty then return true end
  local task, token = reserve()
  local w = self.waiters
  w[#w + 1] = task
  w[#w + 1] = token
  if not self.syncing then sync_soon(self) end
  return wait()
end

-- store(txn, msg) -> true | nil, err, code. In a task; returns when the
-- message is durable. txn.id names the message.
function Spool:store(txn, msg)
  local id = tonumber(txn.id, 16)
  local envt = envelope_of(txn)
  local meta = _M.encode_envelope(envt)
  local seg, off, len = append(self, MSG, txn.dsn_of and F_DSN or 0, id, meta, msg, #txn.recipients)
  if not seg then return nil, off, len end
  seg.live = seg.live + 1
  seg.live_bytes = seg.live_bytes + len
  local ok, err = self:sync()
  return self:stored(txn, msg, envt, id, seg, off, len, ok, err)
end

-- store's second half, once the sync has ended. (A function of its own: code
-- after a wait runs in LuaJIT's interpreter until it enters a function,
-- where a compiled trace can start.)
function Spool:stored(txn, msg, envt, id, seg, off, len, ok, err)
  if not ok then
    -- Not acknowledged: make sure it is not delivered either.
    seg.live = seg.live - 1
    seg.live_bytes = seg.live_bytes - len
    -- (the record may be on disk even so: a failed sync says nothing of it;
    -- F_VOID: a DSN's record then reports nothing at recovery)
    if not append(self, DONE, F_VOID, id, "") then
      self.pending_done = self.pending_done or {}
      self.pending_done[id] = true
    else
      local l = self.unsynced_done
      l[#l + 1] = id
    end
    log.error("spool: sync failed for %s: %s", txn.id, tostring(err))
    return nil, "sync: " .. tostring(err), err and err:match("^(%u+)")
  end
  -- A write that succeeds ends a refusal caused by a failed write; one caused
  -- by low free space ends when the space check says so.
  if self.full and self.full ~= "low disk space" then self.full, self.full_need = false, nil end
  -- (array slots, see the top; the queue adds key and tenant: the hash
  -- part is made for those two here, where adding each was a rehash). The
  -- arrival time is in the id (ids.time_of); the queue keeps the time of
  -- the 250 beside the entry until the first attempt (Queue:stored).
  local m = tnew(6, 2)
  m[ID], m[ATTEMPTS], m[NEXT], m[SEG], m[OFF], m[LEN] = id, 0, 0, seg, off, len
  self.msgs[id] = m
  self.nlive = self.nlive + 1
  self.stats.stored = self.stats.stored + 1
  -- Keep the message for its first delivery: no read from disk, no decode.
  local size = msg:size()
  if self.cache_bytes > 0 and size <= self.cache_bytes / 8 then
    envt.id = txn.id
    self.cache[id] = { msg = msg, env = envt, size = size }
    fifo.push(self.cache_order, id)
    self.ncached = self.ncached + 1
    self.cached_bytes = self.cached_bytes + size
    txn.kept = true
    self:trim_cache()
  end
  if self.on_stored then self.on_stored(m, envt) end
  return true
end

-- The ids of messages that left the cache (delivered) stay in cache_order
-- until trim_cache meets them: dropped here once they are most of it, or a
-- cache that stays under its size (every message delivered at once) would
-- keep an id for every message ever stored.
local function drop_uncached(self)
  local cache = self.cache
  fifo.keep(self.cache_order, function(id) return cache[id] ~= nil end)
end

-- Drop cached messages, oldest first, beyond cache_bytes (all: every one).
function Spool:trim_cache(all)
  local order = self.cache_order
  while fifo.len(order) > 0 and (all or self.cached_bytes > self.cache_bytes) do
    self:uncache(fifo.pop(order))
  end
  if fifo.len(order) > 2 * self.ncached + 64 then drop_uncached(self) end
end

-- The cache entry of id out of the cache (its id stays in cache_order
-- until met there); -> the entry, whose message the caller closes or takes.
local function forget(self, id)
  local c = self.cache[id]
  if c then
    self.cache[id] = nil
    self.ncached = self.ncached - 1
    self.cached_bytes = self.cached_bytes - c.size
  end
  return c
end

function Spool:uncache(id)
  local c = forget(self, id)
  if c then c.msg:close() end
end

function Spool:accepting()
  return not self.full
end

-- envelope(m) -> env | nil, err: a message's envelope, read from its
-- segment (blocking: for tools; a read-only open keeps its segments open,
-- so one deleted by a running server since is still read). A function of
-- the module: a listing of several spools need not know m's.
function _M.envelope(m)
  if m.env then return m.env end
  local seg = m[SEG]
  if not (seg and seg.file) then return nil, "no segment" end
  local ok, meta, err = pcall(seg.file.meta, seg.file, m[OFF])
  if not ok then return nil, tostring(meta) end
  if not meta then return nil, err end
  local env = decode(meta)
  if type(env) ~= "table" then return nil, "unreadable envelope" end
  return env
end

function Spool:get(id)
  return self.msgs[id]
end

function Spool:count()
  return self.nlive
end

-- each(fn): call fn(m) for every live message.
function Spool:each(fn)
  for _, m in pairs(self.msgs) do fn(m) end
end

-- The record from its segment (read's slow path: a function of its own, so
-- that the callback made here does not keep LuaJIT from compiling read).
-- m.seg, m.off and m.len are taken once: a compaction that moves the message
-- meanwhile leaves the same bytes at the old place, readable until the end
-- of this read (close_segment).
-- read_at(seg, off, len) -> octets | nil, err: a read of a segment in the
-- thread pool, in a task (the loop never waits for the disk). The segment's
-- fd stays open until the read ends, even if the segment is deleted
-- meanwhile (close_segment).
local function read_at(seg, off, len)
  local file = seg.file
  -- the record may still be in the head's write buffer (a fresh compaction copy)
  if file:pending() > 0 then file:spill() end
  local fd = hold_fd(seg)
  local task, token = reserve()
  local req, rerr = uv.fs_read(fd, len, off, function(err, data)
    release_fd(seg)
    wake_token(task, token, err, data)
  end)
  if not req then
    release_fd(seg)
    task.reserved = nil
    return nil, rerr
  end
  local err, data = wait()
  if err then return nil, err end
  return data
end

local function read_disk(m)
  local data, err = read_at(m[SEG], m[OFF], m[LEN])
  if not data then return nil, err end
  local rtype, _, id, meta, body = core.decode(data)
  if not rtype then return nil, "spool: record of " .. ids.hex(m[ID]) .. ": " .. tostring(_) end
  if id ~= m[ID] or rtype ~= MSG then return nil, "spool: record mismatch for " .. ids.hex(m[ID]) end
  local env = decode(meta)
  if not env then return nil, "spool: unreadable envelope of " .. ids.hex(m[ID]) end
  env.id = ids.hex(id)
  if m.rdone then
    for i, r in ipairs(env.rcpt) do r.done = m.rdone[i] or nil end
  end
  return env, body
end

-- read(m [, take]) -> envelope, body [, owned] | nil, err. In a task (reads
-- in the thread pool). A message still in the memory cache comes back as
-- the cached message object; with take, it leaves the cache and owned is
-- true: the caller closes it when done. Otherwise the body is valid only
-- until the task next waits (the cache may close it then).
function Spool:read(m, take)
  local c = self.cache[m[ID]]
  if c then
    -- the envelope as stored, with the recipients done so far
    local env = c.env
    for i, r in ipairs(env.rcpt) do r.done = m.rdone and m.rdone[i] or nil end
    if take then
      -- the caller owns the message now and closes it: the cache must not
      -- close it under a delivery that is still sending it (a later read
      -- comes from the disk)
      forget(self, m[ID])
      return env, c.msg, true
    end
    return env, c.msg
  end
  return read_disk(m)
end

-- State records (update, done) are not waited for: they are synced with
-- the next group commit, and at the latest lazy_sync seconds after they
-- were written, so that a power failure repeats few deliveries.
local function start_lazy_timer(self)
  local t = uv.new_timer()
  self.lazy_timer = t
  t:start(math.floor(self.lazy_sync * 1000), 0, function()
    t:close()
    self.lazy_timer = nil
    if next(self.dirty) and not self.syncing and self.head then
      local ok, err = pcall(start_sync, self)
      if not ok then log.error("spool: lazy sync: %s", tostring(err)) end
    end
  end)
end

-- (no closure in here: a function that makes one is not compiled by LuaJIT
-- past its returns, NYI bytecode UCLO, and this runs for every outcome)
function lazy_sync(self)
  if self.lazy_timer or self.readonly or self.closed then return end
  start_lazy_timer(self)
end

-- Work for the end of this loop iteration, after a burst of outcomes: the
-- state records written to the page cache (spill_pending), empty segments
-- reclaimed (reclaim_scheduled). One check handle and callback, made once,
-- here: a function that makes a closure is not compiled by LuaJIT past its
-- returns (NYI bytecode UCLO), so end_of_iteration(), which runs for every
-- outcome, makes none.
local function make_tick(self)
  local h = uv.new_check()
  h:unref()
  self.tick_handle = h
  self.tick_cb = function()
    h:stop()
    self.tick_armed = false
    if self.spill_pending then
      self.spill_pending = false
      if self.head and self.head.file:pending() > 0 then self.head.file:spill() end
    end
    if self.reclaim_scheduled then
      self.reclaim_scheduled = false
      local ok, err = pcall(self.reclaim, self)
      if not ok then log.error("spool: reclaim: %s", tostring(err)) end
    end
  end
  return h
end

local function end_of_iteration(self)
  local h = self.tick_handle or make_tick(self)
  -- (armed kept here: is_active() is a luv call, and this runs per outcome)
  if not self.tick_armed then
    h:start(self.tick_cb)
    self.tick_armed = true
  end
end

-- State records go to the page cache at the end of this loop iteration (one
-- write for all of them): a crash of the process then loses none, and the
-- deliveries they record are not repeated. (fdatasync still comes with the
-- next group commit or lazy_sync.)
local function spill_soon(self)
  if self.spill_pending or self.readonly or self.closed then return end
  self.spill_pending = true
  end_of_iteration(self)
end

-- update(id, state): record a state change. state.done lists recipient
-- indexes that are final; attempts and next are kept as given.
function Spool:update(id, state)
  local m = self.msgs[id]
  if not m then return nil, "unknown message" end
  apply_state(m, state)
  local seg, err, code = append(self, STATE, 0, id, encode(state))
  if not seg then
    log.error("spool: cannot record the state of %s: %s", ids.hex(id), tostring(err))
    self.pending_state = self.pending_state or {}
    self.pending_state[id] = true
    return nil, err, code
  end
  self.unsynced_state[id] = true
  spill_soon(self)
  lazy_sync(self)
  return true
end

-- reclaim() at the end of this loop iteration (done() comes in bursts)
local function reclaim_soon(self)
  if self.closed then return end -- (a delivery that ends after the close)
  self.reclaim_scheduled = true
  end_of_iteration(self)
end

-- done(id): the message is finished (delivered, bounced or expired).
function Spool:done(id)
  local m = self.msgs[id]
  if not m then return nil, "unknown message" end
  local seg, err, code = append(self, DONE, 0, id, "")
  if seg then
    local l = self.unsynced_done
    l[#l + 1] = id
    spill_soon(self)
    lazy_sync(self)
  elseif code == "CLOSED" then
    log.info("spool: %s finished after the spool closed: it is delivered again after a restart", ids.hex(id))
  else
    -- Keep it out of the queue; the DONE is written again when space returns.
    self.pending_done = self.pending_done or {}
    self.pending_done[id] = true
    log.error("spool: cannot record %s as done: %s", ids.hex(id), tostring(err))
  end
  drop_live(m)
  self.msgs[id] = nil
  self.nlive = self.nlive - 1
  self:uncache(id)
  if not self.reclaim_scheduled then reclaim_soon(self) end
  return true
end

-- ---- reclamation -------------------------------------------------------------------------------

local function delete_segment(self, seg)
  uv.fs_unlink(seg.path)
  -- written since the last sync began, it is not synced now: every message
  -- in it is finished (its state records are moot) and the file is gone
  self.dirty[seg] = nil
  close_segment(seg) -- (a read still in flight keeps the fd until it ends)
  self.segs[seg.num] = nil
  table.remove(self.order, 1)
  self.dir_dirty = true
  self.stats.deleted = self.stats.deleted + 1
  log.debug("spool: deleted %s", seg_name(seg.num))
end

-- A compaction of seg, as a task. (Its closures are made here, not in
-- reclaim(), which runs after every burst of outcomes: LuaJIT does not
-- compile a function that makes a closure past its returns.)
local function start_compaction(self, seg)
  self.compacting = true
  sched.spawn_named("spool compaction", function(err)
    self.compacting = false
    self.compact_retry_at = uv.now() + COMPACT_RETRY_MS
    log.error("spool: compaction failed: %s", tostring(err))
  end, function()
    -- a failed one (disk full, a write error) is not tried again at once
    if not self:compact(seg) then self.compact_retry_at = uv.now() + COMPACT_RETRY_MS end
    self.compacting = false
    if not self.closed then self:reclaim() end
  end)
end

-- reclaim(): delete empty segments from the oldest; compact the oldest one
-- when it holds little live data.
function Spool:reclaim()
  while #self.order > 1 do
    local seg = self.segs[self.order[1]]
    -- A segment under compaction may have no live message left while the
    -- copies made of them are not yet on disk: it goes only after the sync.
    if seg == self.head or seg.live > 0 or seg.compacting then break end
    delete_segment(self, seg)
  end
  local oldest = self.segs[self.order[1]]
  if oldest and oldest ~= self.head and not self.compacting and oldest.live > 0
    and uv.now() >= self.compact_retry_at and self:worth_compacting(oldest) then
    start_compaction(self, oldest)
  end
end

-- The oldest segment is worth compacting when little of it is live, or
-- when the dead bytes behind it (which its presence keeps on disk: deletion
-- is oldest-first) are at least twice its live bytes. The second rule keeps
-- long-deferred messages, which compaction gathers into dense segments,
-- from pinning the whole spool; copying costs at most half of what it frees.
function Spool:worth_compacting(oldest)
  if oldest.live_bytes <= self.compact_ratio * math.max(oldest.size, 1) then return true end
  -- Only once the segment has been closed a while: its live messages are
  -- then really waiting (deferred), not about to be delivered.
  if uv.now() - (oldest.closed_at or 0) < self.compact_delay * 1000 then return false end
  local dead = 0
  for i = 2, #self.order do
    local s = self.segs[self.order[i]]
    if s ~= self.head then dead = dead + (s.size - s.live_bytes) end
  end
  return dead >= 2 * oldest.live_bytes
end

-- compact(seg): copy its live messages to the head with their current
-- state, sync, then delete it.
function Spool:compact(seg)
  seg.compacting = true
  local ok, done = pcall(self.compact_segment, self, seg)
  seg.compacting = nil
  if not ok then error(done, 0) end
  return done
end

function Spool:compact_segment(seg)
  local live = {}
  for _, m in pairs(self.msgs) do
    if m[SEG] == seg then live[#live + 1] = m end
  end
  table.sort(live, function(a, b) return a[OFF] < b[OFF] end)
  local moves = {}
  log.info("spool: compacting %s: %d live messages, %d of %d bytes", seg_name(seg.num), #live,
    seg.live_bytes, seg.size)
  for i, m in ipairs(live) do
    if self.fault.compaction_pause and i == math.floor(#live / 2) + 1 then
      log.warn("spool: compaction paused for %gs (fault injection)", self.fault.compaction_pause)
      sched.sleep(self.fault.compaction_pause)
    end
    -- Delivered (or already moved) meanwhile: nothing to copy.
    if self.msgs[m[ID]] ~= m or m[SEG] ~= seg then goto continue end
    -- in the thread pool: a segment that is not in the page cache any more
    -- must not hold up the loop
    local raw, err = read_at(seg, m[OFF], m[LEN])
    local rtype, rflags, id, meta, body = core.decode(raw or "")
    if not rtype then
      log.error("spool: compaction of %s stopped at %s: %s", seg_name(seg.num), ids.hex(m[ID]),
        tostring(err or rflags))
      return false
    end
    -- Still live? (It may have been delivered while we worked.)
    if self.msgs[id] == m and m[SEG] == seg then
      local env = decode(meta)
      -- the copy, then its current state: recovery applies them in order
      local cseg, off, len = append(self, MSG, F_COPY + band(rflags, F_DSN), id, meta, body,
        env and #env.rcpt or 0)
      local sseg, serr = nil, off
      if cseg then sseg, serr = append(self, STATE, 0, id, state_of(m)) end
      if not sseg then
        log.error("spool: compaction of %s stopped: %s", seg_name(seg.num), tostring(serr))
        return false
      end
      moves[#moves + 1] = { m, cseg, off, len }
    end
    ::continue::
  end
  -- The messages move to their copies only once the copies are on disk: a
  -- failed sync leaves every one in this segment, which is then kept (the
  -- copies, if any reached the file, are harmless duplicates).
  local ok, err = self:sync()
  if not ok then
    log.error("spool: compaction sync failed, %s kept: %s", seg_name(seg.num), tostring(err))
    return false
  end
  for i = 1, #moves do
    local mv = moves[i]
    local m = mv[1]
    -- (finished while the copies were synced: nothing to move)
    if self.msgs[m[ID]] == m and m[SEG] == seg then
      drop_live(m)
      add_live(m, mv[2], mv[3], mv[4])
    end
  end
  if seg.live == 0 then
    self.stats.compactions = self.stats.compactions + 1
    log.info("spool: compacted %s", seg_name(seg.num))
  end
  return true
end

-- ---- free space ---------------------------------------------------------------------------------

function Spool:free_bytes()
  local st = uv.fs_statfs(self.dir)
  if not st then return nil end
  return st.bavail * st.bsize
end

-- Write again the DONE and STATE records a failed write may have lost (they
-- are tracked again, and kept for later if this write fails too).
function Spool:rewrite_pending()
  local pend, ps = self.pending_done, self.pending_state
  self.pending_done, self.pending_state = nil, nil
  for id in pairs(pend or {}) do
    if append(self, DONE, 0, id, "") then
      local l = self.unsynced_done
      l[#l + 1] = id
    else
      self.pending_done = self.pending_done or {}
      self.pending_done[id] = true
    end
  end
  for id in pairs(ps or {}) do
    local m = self.msgs[id]
    if m then
      if append(self, STATE, 0, id, state_of(m)) then
        self.unsynced_state[id] = true
      else
        self.pending_state = self.pending_state or {}
        self.pending_state[id] = true
      end
    end
  end
  if pend or ps then lazy_sync(self) end
end

-- Check free space now and every check_interval seconds.
function Spool:check_space()
  local function check()
    local free = self:free_bytes()
    if not free then return end
    if free < self.min_free then
      set_full(self, "low disk space")
      return
    end
    if self.full and free >= self.min_free + (self.full_need or 0) then
      log.info("spool: %s: space is back (%d bytes free); accepting mail", self.dir, free)
      self.full, self.full_need = false, nil
    end
    -- the records a failed write lost are small: written again as soon as
    -- the disk takes writes
    if self.pending_done or self.pending_state then self:rewrite_pending() end
  end
  check()
  if not self.space_timer then
    self.space_timer = uv.new_timer()
    self.space_timer:unref()
    self.space_timer:start(self.check_interval * 1000, self.check_interval * 1000,
      sched.callback(check, "spool space check"))
  end
end

function Spool:close()
  self.closed = true
  self:trim_cache(true)
  if self.sync_idle then
    -- a batch asked for in this iteration goes now, while its segments are open
    if self.sync_armed then self.sync_idle_cb() end
    self.sync_idle:close()
    self.sync_idle = nil
  end
  if self.tick_handle then
    self.tick_handle:close()
    self.tick_handle = nil
  end
  if not self.readonly and self.lock then
    local st = self.stats
    log.info("spool: closed: %d stored, %d sync batches, %d fsyncs, %d bytes written, %d compactions, "
      .. "%d segments deleted", st.stored, st.batches, st.fsyncs, st.bytes, st.compactions, st.deleted)
  end
  if self.lazy_timer then
    self.lazy_timer:close()
    self.lazy_timer = nil
  end
  if self.space_timer then
    self.space_timer:close()
    self.space_timer = nil
  end
  for _, seg in pairs(self.segs) do close_segment(seg) end
  self.segs = {}
  if self.prepared then
    discard_prepared(self.prepared.file, self.prepared.path)
    self.prepared = nil
  end
  if self.lock then
    self.lock:close()
    self.lock = nil
  end
end

_M.envelope_of = envelope_of
_M.seg_name = seg_name

-- stranded(dir, workers) -> list of { dir = path, messages = n }: the parts
-- of the spool at dir that an MTA with this many worker processes does not
-- deliver (docs/spool.md#partitions) and that still hold queued messages:
-- the partitions w<i> from i = workers on (all of them for one process),
-- and with workers the one-process spool at dir itself. Read without a
-- lock, as `moonpost spool list` reads.
function _M.stranded(dir, workers)
  local out = {}
  local function check(path)
    if not uv.fs_stat(path .. "/seg") then return end
    local sp = _M.open({ dir = path, readonly = true })
    if not sp then return end
    local n = sp:count()
    sp:close()
    if n > 0 then out[#out + 1] = { dir = path, messages = n } end
  end
  if workers > 1 then check(dir) end
  local parts = {}
  local req = uv.fs_scandir(dir)
  while req do
    local name = uv.fs_scandir_next(req)
    if not name then break end
    local i = tonumber(name:match("^w(%d+)$"))
    if i and (workers == 1 or i >= workers) then parts[#parts + 1] = i end
  end
  table.sort(parts)
  for _, i in ipairs(parts) do check(dir .. "/w" .. i) end
  return out
end

return _M
