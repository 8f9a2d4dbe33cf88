-- File system calls for tasks: each runs in the libuv thread pool and the
-- task waits for it, so the loop never blocks on the disk.
--
--   local fd, err, code = fs.open(path, "wx", 384)
--   fs.fsync(fd), fs.fdatasync(fd), fs.close(fd), fs.rename(a, b), fs.mkdir(p, mode),
--   fs.unlink(p), fs.stat(p), fs.fstat(fd), fs.mkdir_p(p, mode), fs.fsync_dir(p),
--   fs.write(fd, data[, offset]) -> bytes written, fs.read(fd, size[, offset]) -> data ("" at the end)
--   fs.replace(path, data[, tmp]) in a task; fs.replace_now(path, data[, tmp]) blocking, for shutdown
--   fs.sync_all(fds, dir, what, done): a group commit's syncs, from callbacks
--
-- Errors come back as nil, "ENOSPC: no space left on device: /path", "ENOSPC".
local uv = require "luv"
local sched = require "moonpost.runtime.sched"

local reserve, wake_token, wait = sched.reserve, sched.wake_token, sched.wait
local select, unpack, match, format, sub = select, unpack, string.match, string.format, string.sub

local _M = { _VERSION = "0.1" }

local function code_of(err)
  return err and match(err, "^(%u[%u%d]+):") or nil
end

local function call(fn, ...)
  local n = select("#", ...)
  local args = { ... }
  local task, token = reserve()
  args[n + 1] = function(err, result)
    wake_token(task, token, err or false, result)
  end
  local req, err = fn(unpack(args, 1, n + 1))
  if not req then
    task.reserved = nil
    return nil, err, code_of(err)
  end
  local e, result = wait()
  if e then return nil, e, code_of(e) end
  if result == nil then result = true end
  return result
end

function _M.open(path, flags, mode) return call(uv.fs_open, path, flags, mode or 384) end
function _M.close(fd) return call(uv.fs_close, fd) end
function _M.fsync(fd) return call(uv.fs_fsync, fd) end
function _M.fdatasync(fd) return call(uv.fs_fdatasync, fd) end
function _M.rename(a, b) return call(uv.fs_rename, a, b) end
function _M.unlink(path) return call(uv.fs_unlink, path) end
function _M.stat(path) return call(uv.fs_stat, path) end
function _M.write(fd, data, offset) return call(uv.fs_write, fd, data, offset or -1) end

-- write_all(fd, data [, offset]) -> #data | nil, err, code: write(2) may
-- write less than asked (a disk filling up): the rest is written again, and
-- a write that makes no progress is an error, never a shorter file.
function _M.write_all(fd, data, offset)
  local done, len = 0, #data
  offset = offset or -1
  while done < len do
    local n, err, code = call(uv.fs_write, fd, done == 0 and data or sub(data, done + 1),
      offset >= 0 and offset + done or -1)
    if not n then return nil, err, code end
    if n <= 0 then return nil, "short write: no progress after " .. done .. " of " .. len .. " bytes", "EIO" end
    done = done + n
  end
  return done
end
function _M.read(fd, size, offset) return call(uv.fs_read, fd, size, offset or -1) end
function _M.fstat(fd) return call(uv.fs_fstat, fd) end
function _M.mkdir(path, mode) return call(uv.fs_mkdir, path, mode or 448) end

-- mkdir -p; existing directories are fine.
function _M.mkdir_p(path, mode)
  local ok, err, code = _M.mkdir(path, mode)
  if ok or code == "EEXIST" then return true end
  if code ~= "ENOENT" then return nil, err, code end
  local parent = match(path, "^(.*)/[^/]+/*$")
  if not parent or parent == "" or parent == path then return nil, err, code end
  ok, err, code = _M.mkdir_p(parent, mode)
  if not ok then return nil, err, code end
  ok, err, code = _M.mkdir(path, mode)
  if ok or code == "EEXIST" then return true end
  return nil, err, code
end

-- The steps of replace(): the file calls of a task (waiting in the thread
-- pool) or, for replace_now(), luv's blocking calls.
local function replace_via(op, path, data, tmp)
  tmp = path .. (tmp or ".tmp")
  local fd, err, code = op.open(tmp, "w", 384)
  if not fd then return nil, err, code end
  local done, ok = 0, true
  while ok and done < #data do
    local n
    n, err, code = op.write(fd, done == 0 and data or data:sub(done + 1), -1)
    if n and n > 0 then
      done = done + n
    else
      ok, err = nil, err or format("%s: short write", tmp)
    end
  end
  if ok then ok, err, code = op.fsync(fd) end
  op.close(fd)
  if ok then ok, err, code = op.rename(tmp, path) end
  if not ok then
    op.unlink(tmp)
    return nil, err, code
  end
  -- the rename is durable once the directory is
  local dfd
  dfd, err, code = op.open(match(path, "^(.*)/[^/]*$") or ".", "r", 0)
  if not dfd then return nil, err, code end
  ok, err, code = op.fsync(dfd)
  op.close(dfd)
  if not ok then return nil, err, code end
  return true
end

local IN_TASK = {
  open = _M.open, write = _M.write, fsync = _M.fsync, close = _M.close, rename = _M.rename, unlink = _M.unlink,
}
local NOW = {
  open = uv.fs_open, write = uv.fs_write, fsync = uv.fs_fsync, close = uv.fs_close, rename = uv.fs_rename,
  unlink = uv.fs_unlink,
}

-- replace(path, data [, tmp]) -> true | nil, err, code: write data to a new
-- file beside path (path .. (tmp or ".tmp")), make it durable, rename it
-- over path and sync the directory: after a crash, path holds the old data
-- or the new, never a mix; on failure the new file is removed. In a task.
function _M.replace(path, data, tmp)
  return replace_via(IN_TASK, path, data, tmp)
end

-- replace_now(path, data [, tmp]): what replace() does, blocking the
-- calling thread: for shutdown, where no task waits (a state file written
-- as the process ends must be on disk before it is renamed over the last
-- good one).
function _M.replace_now(path, data, tmp)
  return replace_via(NOW, path, data, tmp)
end

-- sync_all(fds, dir, what, done) -> syncs started: fdatasync every
-- descriptor of the list fds and, with dir, fsync that directory (files made
-- or renamed in it), all at once in the thread pool; then done(err), err the
-- first failure or nil. A directory that cannot be opened is a failure: what
-- was made in it is not durable until it is synced. done runs from a
-- callback, or before sync_all returns when nothing could be started. For
-- the group commits driven by callbacks (the spool, the suppression store,
-- the outbox); `what` names them in error logs.
function _M.sync_all(fds, dir, what, done)
  local pending, failure = 1, nil -- the 1 holds done() until all are started
  local function one_done(err)
    if err and not failure then failure = err end
    pending = pending - 1
    if pending == 0 then done(failure) end
  end
  local cb = sched.callback(one_done, what)
  local started = 0
  for i = 1, #fds do
    local req, err = uv.fs_fdatasync(fds[i], cb)
    if req then
      pending, started = pending + 1, started + 1
    else
      failure = failure or err
    end
  end
  if dir then
    local dfd, err = uv.fs_open(dir, "r", 0)
    local req
    if dfd then
      req, err = uv.fs_fsync(dfd, sched.callback(function(serr)
        uv.fs_close(dfd)
        one_done(serr)
      end, what))
      if not req then uv.fs_close(dfd) end
    end
    if req then
      pending, started = pending + 1, started + 1
    else
      failure = failure or format("cannot sync %s: %s", dir, tostring(err))
    end
  end
  one_done(nil)
  return started
end

-- ---- at start, before the loop serves: plain blocking calls -------------------------

-- mkdir_p_now(path [, mode]) -> true | nil, err: mkdir -p on the calling
-- thread (for opening stores at start: ./var of a fresh checkout). As
-- `mkdir -p -m`: only path itself gets mode (default 0700); the parents it
-- makes get 0755 less the umask, so that a private store does not close
-- off the directories above it to other users.
function _M.mkdir_p_now(path, mode)
  if path == "" or path == "." or path == "/" then return true end
  local ok, err, code = uv.fs_mkdir(path, mode or 448)
  if not ok and code == "ENOENT" then
    local parent = match(path, "^(.+)/[^/]+$")
    if parent and parent ~= path then
      local pok, perr = _M.mkdir_p_now(parent, 493)
      if not pok then return nil, perr end
      ok, err, code = uv.fs_mkdir(path, mode or 448)
    end
  end
  if not ok and code ~= "EEXIST" then return nil, err end
  return true
end

-- list_numbered(dir, ext) -> the numbers N of the files "N.<ext>" in dir,
-- in ascending order (segment files of the spool and the outbox).
function _M.list_numbered(dir, ext)
  local out = {}
  local req = uv.fs_scandir(dir)
  if not req then return out end
  local pat = "^(%d+)%." .. ext:gsub("%p", "%%%0") .. "$"
  while true do
    local name = uv.fs_scandir_next(req)
    if not name then break end
    local num = match(name, pat)
    if num then out[#out + 1] = tonumber(num) end
  end
  table.sort(out)
  return out
end

-- Make a rename or create in the directory durable.
function _M.fsync_dir(path)
  local fd, err, code = _M.open(path, "r", 0)
  if not fd then return nil, err, code end
  local ok, e2, c2 = _M.fsync(fd)
  _M.close(fd)
  if not ok then return nil, e2, c2 end
  return true
end

return _M
