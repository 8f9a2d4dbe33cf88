-- A durable FIFO of text lines on disk, consumed in order by one reader:
-- the queue of the event log's webhook (modules/eventlog.lua).
--
--   local ob, err = outbox.open { dir = "var/webhook", segment_size = 16 * 1048576 }
--   ob:append(line)                -- one line, without "\n": true | nil, err
--   local b, err = ob:read(100)    -- in a task: up to 100 lines from the cursor:
--                                  -- { n = 3, "...", "...", "..." } (n = 0: none)
--   ob:ack(b)                      -- in a task: the cursor moves past b, on disk
--   ob:close()
--
-- Layout: <dir>/<16 digits>.jsonl segment files, appended to in turn, and
-- <dir>/cursor, "<segment> <offset>\n": where the first line not yet
-- acknowledged starts. A segment behind the cursor is deleted.
--
-- One writer and one reader: open() takes an exclusive flock on <dir>/LOCK
-- (the spool's lock, core/lspool.c), held until close(), so that a second
-- process on the same directory (another worker, a second Moonpost) fails
-- to open it instead of writing over this one's lines. Within one process
-- a directory that is open already is refused with its own message.
--
-- Durability follows the spool (DESIGN.md section 6): append() writes the
-- line to the page cache from the loop thread at once, so a line appended
-- before the process is killed (SIGKILL, a crash) is in the file when it
-- restarts; fdatasync runs in the libuv thread pool, at most one at a time
-- and at most every sync_interval seconds, for the lines written since the
-- last one (group commit), so a power failure loses at most that interval.
-- The cursor is written to a new file renamed over the old one, without a
-- sync: a cursor that is lost or damaged only moves back, and the lines
-- after it are read (and sent) again: at-least-once, never lost.
--
-- Why not runtime/spool.lua: the spool keeps messages, each with its own
-- state and a done record, finds the live ones by scanning at recovery and
-- holds every queued message in memory. The event queue is a FIFO with a
-- single reader: one cursor says what is done, recovery reads one small
-- file, and nothing but the cursor is kept in memory however long the
-- endpoint stays down.
local uv = require "luv"
local core = require "moonpost.core.spool"
local sched = require "moonpost.runtime.sched"
local fs = require "moonpost.runtime.fs"
local log = require "moonpost.runtime.log"

local format, find, sub, tonumber = string.format, string.find, string.sub, tonumber
local C = uv.constants

local _M = { _VERSION = "0.1" }

local Outbox = {}
local mt = { __index = Outbox }

-- realpath -> true for the directories this process holds open
local held = {}

local READ_CHUNK = 262144  -- read() asks for this much at a time (more for a longer line)
local MAX_LINE = 16777216  -- a longer line is skipped as damaged

local function seg_name(dir, num)
  return format("%s/%016d.jsonl", dir, num)
end


local function list_segments(dir)
  return fs.list_numbered(dir, "jsonl")
end

local function read_cursor(dir)
  local fd = uv.fs_open(dir .. "/cursor", "r", 0)
  if not fd then return nil end
  local data = uv.fs_read(fd, 64, 0) or ""
  uv.fs_close(fd)
  local seg, off = data:match("^(%d+) (%d+)\n$")
  if not seg then
    log.warn("outbox: %s/cursor is damaged (%q): reading from the oldest segment", dir, data:sub(1, 40))
    return nil
  end
  return tonumber(seg), tonumber(off)
end

-- The size of a segment once a torn last line (a write cut short by a
-- crash) is cut off: the offset after its last "\n".
local function whole_size(fd, size)
  local pos = size
  while pos > 0 do
    local n = math.min(65536, pos)
    local data = uv.fs_read(fd, n, pos - n)
    if not data then return 0 end
    for i = #data, 1, -1 do
      if data:byte(i) == 10 then return pos - n + i end
    end
    pos = pos - n
  end
  return 0
end

-- open(opts) -> outbox | nil, err. Synchronous (at start, as the spool's
-- recovery): opts.dir, opts.segment_size (default 16 MiB), opts.max_size
-- (appends fail beyond it; default 1 GiB), opts.sync_interval (seconds,
-- default 0.05).
function _M.open(opts)
  local dir = opts.dir
  local ok, err = fs.mkdir_p_now(dir, 448)
  if not ok then return nil, "outbox: " .. tostring(err) end
  local real = uv.fs_realpath(dir) or dir
  if held[real] then return nil, "outbox " .. dir .. " is open already in this process" end
  local lock, lerr = core.lock(dir, "outbox")
  if not lock then return nil, lerr end
  held[real] = true
  local self = setmetatable({
    dir = dir,
    lock = lock, real = real,
    segment_size = opts.segment_size or 16 * 1048576,
    max_size = opts.max_size or 1073741824,
    sync_interval = (opts.sync_interval or 0.05) * 1000,
    segs = list_segments(dir),  -- segment numbers on disk, oldest first
    sizes = {},                 -- segment number -> its size
    total = 0,                  -- octets in the segments
    wseg = nil, wfd = nil, wsize = 0,
    retired = {},               -- fds of full segments: synced, then closed
    dirty = false, dir_dirty = false, syncing = false, last_sync = 0,
    closed = false,
    stats = { appended = 0, acked = 0, syncs = 0, refused = 0, read_errors = 0 },
  }, mt)
  local cseg, coff = read_cursor(dir)
  -- segments wholly behind the cursor were done when it was written
  local keep = {}
  for _, num in ipairs(self.segs) do
    if cseg and num < cseg then uv.fs_unlink(seg_name(dir, num)) else keep[#keep + 1] = num end
  end
  self.segs = keep
  if #keep == 0 then
    self.cur = { seg = cseg or 1, off = 0 }
  elseif not cseg or keep[1] ~= cseg then
    -- no cursor, or its segment is gone: from the oldest one
    self.cur = { seg = keep[1], off = 0 }
  else
    self.cur = { seg = cseg, off = coff }
  end
  for _, num in ipairs(keep) do
    local st = uv.fs_stat(seg_name(dir, num))
    self.sizes[num] = st and st.size or 0
    self.total = self.total + self.sizes[num]
  end
  -- the writer continues the newest segment, cut to its last whole line
  local last = keep[#keep]
  if last then
    local fd, oerr = uv.fs_open(seg_name(dir, last), C.O_RDWR, 384)
    if not fd then return self:unlock("outbox: " .. tostring(oerr)) end
    local size = self.sizes[last]
    local whole = whole_size(fd, size)
    if whole < size then
      log.warn("outbox: %s: cut a torn last line at offset %d (%d octets): a write that a crash interrupted",
        seg_name(dir, last), whole, size - whole)
      uv.fs_ftruncate(fd, whole)
      self.total = self.total - (size - whole)
      self.sizes[last] = whole
      self.dirty = true
    end
    self.wseg, self.wfd, self.wsize = last, fd, whole
    if self.cur.seg == last and self.cur.off > whole then self.cur.off = whole end
  else
    local fd, oerr = uv.fs_open(seg_name(dir, self.cur.seg), C.O_RDWR + C.O_CREAT, 384)
    if not fd then return self:unlock("outbox: " .. tostring(oerr)) end
    self.wseg, self.wfd, self.wsize = self.cur.seg, fd, 0
    self.segs[1] = self.cur.seg
    self.sizes[self.cur.seg] = 0
    self.dir_dirty = true
  end
  self.timer = uv.new_timer()
  self.timer:unref()
  if self.dirty or self.dir_dirty then self:schedule_sync() end
  return self
end

-- unlock([err]) -> nil, err: the directory is free for another opener
function Outbox:unlock(err)
  if self.lock then
    self.lock:close()
    self.lock = nil
    held[self.real] = nil
  end
  return nil, err
end

-- backlog() -> octets between the cursor and the end (what waits to be read)
function Outbox:backlog()
  local n = 0
  for _, num in ipairs(self.segs) do
    if num >= self.cur.seg then n = n + (self.sizes[num] or 0) end
  end
  return n - self.cur.off
end

-- ---- writing ---------------------------------------------------------------------------

-- The files of a closed outbox: a last fdatasync in the thread pool, then
-- close (when the loop stops first, the process exit closes them and the
-- lines are in the page cache all the same).
local function finish_close(self)
  if self.syncing then return end
  local fds = self.retired
  self.retired = {}
  if self.wfd then fds[#fds + 1] = self.wfd end
  self.wfd = nil
  for _, fd in ipairs(fds) do
    uv.fs_fdatasync(fd, function() uv.fs_close(fd, function() end) end)
  end
end

local function sync_done(self, failure, retired)
  self.syncing = false
  self.last_sync = uv.now()
  self.stats.syncs = self.stats.syncs + 1
  if failure then log.error("outbox: %s: sync failed: %s", self.dir, tostring(failure)) end
  for _, fd in ipairs(retired) do uv.fs_close(fd, function() end) end
  if self.closed then return finish_close(self) end
  self:schedule_sync()
end

-- Start an fdatasync of what was written since the last one, in the thread
-- pool; or arm the timer when the last one ended less than sync_interval ago.
function Outbox:schedule_sync()
  if self.syncing or self.closed or not (self.dirty or self.dir_dirty or #self.retired > 0) then return end
  local wait = self.last_sync + self.sync_interval - uv.now()
  if wait > 0 then
    if not self.timer:is_active() then
      self.timer:start(math.ceil(wait), 0, sched.callback(function() self:schedule_sync() end, "outbox: sync"))
    end
    return
  end
  self.syncing = true
  self.dirty = false
  local retired = self.retired
  self.retired = {}
  local fds = { self.wfd }
  for _, fd in ipairs(retired) do fds[#fds + 1] = fd end
  local dir
  if self.dir_dirty then
    self.dir_dirty = false
    dir = self.dir
  end
  fs.sync_all(fds, dir, "outbox: sync", function(failure)
    if failure and dir then self.dir_dirty = true end
    sync_done(self, failure, retired)
  end)
end

-- A new segment for the writer; the full one is synced and closed by the
-- next sync.
local function rotate(self)
  local num = self.wseg + 1
  local fd, err = uv.fs_open(seg_name(self.dir, num), C.O_RDWR + C.O_CREAT, 384)
  if not fd then return nil, err end
  self.retired[#self.retired + 1] = self.wfd
  self.wseg, self.wfd, self.wsize = num, fd, 0
  self.segs[#self.segs + 1] = num
  self.sizes[num] = 0
  self.dir_dirty = true
  return true
end

-- The segments before `seg` are done: deleted. The cursor on disk may
-- still point into one of them (its write failed): open() then reads from
-- the oldest segment left, which holds no line older than the cursor.
-- In the reading task; now: from the loop thread, synchronously (the
-- reader's file is left to the reading task, which moves on from it).
local function drop_behind(self, seg, now)
  local keep = {}
  for _, num in ipairs(self.segs) do
    if num < seg then
      if self.rseg == num and self.rfd and not now then
        local fd = self.rfd
        self.rfd, self.rseg = nil, nil
        fs.close(fd)
      end
      local uok, uerr, code
      if now then
        uok, uerr, code = uv.fs_unlink(seg_name(self.dir, num))
      else
        uok, uerr, code = fs.unlink(seg_name(self.dir, num))
      end
      if not uok and code ~= "ENOENT" then log.error("outbox: %s", tostring(uerr)) end
      self.total = self.total - (self.sizes[num] or 0)
      self.sizes[num] = nil
    else
      keep[#keep + 1] = num
    end
  end
  self.segs = keep
end

-- Every line of the segment being written is done (acknowledged) and it
-- holds some: a new segment for the writer, and the old one deleted. A
-- queue that never fills a segment (max_size below segment_size, a full
-- disk) frees its space this way. true if it did.
local function renew(self)
  local cur = self.cur
  if self.wsize == 0 or cur.seg ~= self.wseg or cur.off < self.wsize then return false end
  local old, num = self.wfd, self.wseg + 1
  local fd = uv.fs_open(seg_name(self.dir, num), C.O_RDWR + C.O_CREAT, 384)
  if not fd then return false end
  -- a deleted file keeps its space while it is open: the old segment's
  -- lines are all sent (no sync), it is closed now unless a sync uses it,
  -- and the reader's file unless a read uses it (the reader then moves on
  -- to the new segment, and closes it, at once)
  if self.syncing then self.retired[#self.retired + 1] = old else uv.fs_close(old) end
  if self.rfd and self.rseg == self.wseg and not self.reading then
    uv.fs_close(self.rfd)
    self.rfd, self.rseg = nil, nil
  end
  self.wseg, self.wfd, self.wsize = num, fd, 0
  self.segs[#self.segs + 1] = num
  self.sizes[num] = 0
  self.dir_dirty = true
  self.cur = { seg = num, off = 0 }
  drop_behind(self, num, true)
  return true
end

-- append(line) -> true | nil, err. The line is in the file (the page cache)
-- when this returns. max_size bounds the lines not yet acknowledged; the
-- files also hold, until their segment is deleted, the lines already
-- acknowledged in it (at most segment_size more).
function Outbox:append(line, again)
  if self.closed then return nil, "closed" end
  local data = line .. "\n"
  local len = #data
  if self:backlog() + len > self.max_size then
    self.stats.refused = self.stats.refused + 1
    return nil, "full"
  end
  if self.wsize > 0 and self.wsize + len > self.segment_size then
    local ok, err = rotate(self)
    if not ok then
      self.stats.refused = self.stats.refused + 1
      return nil, err
    end
  end
  local n, err = uv.fs_write(self.wfd, data, self.wsize)
  if n ~= len then
    -- a short write (the disk is full): the partial line is cut off again
    if n and n > 0 then uv.fs_ftruncate(self.wfd, self.wsize) end
    -- a full disk that this queue's own sent lines fill: they go, and the line is written again
    if not again and renew(self) then return self:append(line, true) end
    self.stats.refused = self.stats.refused + 1
    return nil, err or "short write"
  end
  self.wsize = self.wsize + len
  self.sizes[self.wseg] = self.wsize
  self.total = self.total + len
  self.stats.appended = self.stats.appended + 1
  self.dirty = true
  self:schedule_sync()
  return true
end

-- ---- reading -----------------------------------------------------------------------------

local function reader_at(self, seg)
  if self.rseg == seg and self.rfd then return self.rfd end
  if self.rfd then
    local old = self.rfd
    self.rfd, self.rseg = nil, nil
    fs.close(old)
  end
  local fd, err, code = fs.open(seg_name(self.dir, seg), "r", 0)
  if not fd then return nil, err, code end
  self.rfd, self.rseg = fd, seg
  return fd
end

-- read(max) -> { n, lines... , seg, off } | nil, err. In a task. The lines
-- after the cursor, up to max; read() again returns the same lines until
-- ack() moves the cursor past them.
function Outbox:read(max)
  -- renew() leaves the reader's file alone meanwhile
  self.reading = true
  local b, err = self:read_lines(max)
  self.reading = false
  return b, err
end

function Outbox:read_lines(max)
  local chunk = READ_CHUNK
  while true do
    if self.closed then return nil, "closed" end
    local cur = self.cur
    local fd, err, code = reader_at(self, cur.seg)
    if not fd then
      if code == "ENOENT" and cur.seg < self.wseg then
        -- a segment that is missing: the next one
        self.cur = { seg = cur.seg + 1, off = 0 }
      else
        self.stats.read_errors = self.stats.read_errors + 1
        return nil, err
      end
    else
      local data, rerr = fs.read(fd, chunk, cur.off)
      if self.closed then return nil, "closed" end
      if not data then
        self.stats.read_errors = self.stats.read_errors + 1
        return nil, rerr
      end
      local b = { n = 0, seg = cur.seg, off = cur.off }
      local pos = 1
      while b.n < max do
        local nl = find(data, "\n", pos, true)
        if not nl then break end
        b.n = b.n + 1
        b[b.n] = sub(data, pos, nl - 1)
        pos = nl + 1
      end
      b.off = cur.off + pos - 1
      if b.n > 0 then return b end
      if #data == chunk then
        -- one line longer than the chunk: read more of it, up to MAX_LINE
        if chunk >= MAX_LINE then
          log.error("outbox: %s: a line longer than %d octets at offset %d is skipped", seg_name(self.dir, cur.seg),
            MAX_LINE, cur.off)
          local nl
          local off = cur.off + #data
          repeat
            local more = fs.read(fd, chunk, off)
            if not more or more == "" then break end
            nl = find(more, "\n", 1, true)
            off = off + (nl or #more)
          until nl
          return { n = 0, seg = cur.seg, off = off, skip = true }
        end
        chunk = chunk * 4
      elseif cur.seg < self.wseg and cur.off + #data >= (self.sizes[cur.seg] or 0) then
        -- a full segment read to its end: on to the next one (the cursor
        -- on disk follows with the next ack)
        self.cur = { seg = cur.seg + 1, off = 0 }
        chunk = READ_CHUNK
      else
        return b -- nothing new
      end
    end
  end
end

-- ack(b): the lines of b are done. In a task: the cursor file is replaced,
-- then the segments behind it are deleted. true | nil, err (the cursor in
-- memory moves on all the same; the next ack writes it). The segments are
-- deleted even when the cursor cannot be written (a full disk: deleting
-- them is what frees it), since a cursor whose segment is gone reads from
-- the oldest one left.
function Outbox:ack(b)
  -- closed: the directory may have another owner already; the batch is
  -- sent again after the next start (at-least-once)
  if self.closed then return nil, "closed" end
  local cur = self.cur
  if b.seg < cur.seg or (b.seg == cur.seg and b.off < cur.off) then return true end
  self.cur = { seg = b.seg, off = b.off }
  self.stats.acked = self.stats.acked + b.n
  local tmp = self.dir .. "/cursor.tmp"
  local fd, err = fs.open(tmp, "w", 384)
  local ok = false
  if fd then
    ok, err = fs.write(fd, format("%d %d\n", b.seg, b.off), 0)
    fs.close(fd)
    -- closed while this waited for the disk: the directory is not ours now
    if self.closed then return nil, "closed" end
    if ok then ok, err = fs.rename(tmp, self.dir .. "/cursor") end
    if not ok then fs.unlink(tmp) end
  end
  if self.closed then return nil, "closed" end
  if not ok then log.error("outbox: %s: cannot write the cursor: %s", self.dir, tostring(err)) end
  -- what is behind the cursor can go
  drop_behind(self, b.seg)
  if not ok then return nil, err end
  return true
end

-- close(): the written lines are synced (here, or when the sync in flight
-- ends) and the files closed, and the lock is released: nothing is written
-- to the directory after this (read() and ack() answer "closed"). The
-- reader's file is closed by the task that reads (close_reader) or at exit.
function Outbox:close()
  if self.closed then return true end
  self.closed = true
  self.timer:close()
  finish_close(self)
  self:unlock()
  return true
end

-- close_reader(): in the reading task, once it has stopped reading.
function Outbox:close_reader()
  if self.rfd then
    local fd = self.rfd
    self.rfd, self.rseg = nil, nil
    if sched.current() then fs.close(fd) else uv.fs_close(fd) end
  end
end

return _M
