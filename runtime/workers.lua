-- Worker processes (moonpost.new { workers = N }, docs/cli.md#workers).
--
-- With N > 1, `moonpost run` is a supervisor: it loads the policy, starts
-- nothing of it, and spawns N copies of the launcher with the same policy
-- and MOONPOST_WORKER=0..N-1. Each worker runs the policy normally, except
-- that its SMTP listeners are bound with SO_REUSEPORT (the kernel spreads
-- the connections over the workers), its spool is the partition
-- <spool>/w<i> and its HTTP listener is on port + i. The workers share
-- nothing but the SMTP ports (DESIGN.md §3).
--
--   local workers = require "moonpost.runtime.workers"
--   workers.index                 -- this worker's index, or nil (supervisor, single process)
--   workers.reuseport(tcp)        -> true | nil, err   before tcp:bind()
--   workers.ready()               -- a worker has started: tell the supervisor
--   workers.supervise(mta, n)     -> true | nil, err   run the supervisor loop
--   workers.launcher              -- { exe, script } that `moonpost run` was started as
--
-- The supervisor restarts a worker that exits (with a backoff) or hangs
-- (the watchdog, below), forwards
-- SIGTERM/SIGINT (stop), SIGHUP (reload) and SIGUSR1 to the workers and returns once
-- every worker has exited after a stop (killing one still running KILL_AFTER s
-- past stop_grace). An SMTP address already in use
-- (by another supervisor's workers too) fails it before any worker starts;
-- a worker that exits before it ever started (a spool it cannot lock, an
-- HTTP port in use) on its first launch makes the supervisor stop the others
-- and fail: that is a configuration error, not a crash to retry.
--
-- The watchdog: a ready worker writes a line on its fd 3 every HEARTBEAT
-- seconds from a timer of its loop; a worker the supervisor has heard
-- nothing from for `watchdog` seconds (the policy's option) has a loop that
-- no longer runs (a hook in an endless loop, a C call that never returns),
-- serves nobody and holds its partition: the supervisor kills it (SIGKILL)
-- and starts it again as any dead worker.
--
-- SIGUSR1 (reopen the event log's file) is forwarded as well: without a
-- handler it would end the supervisor, and with it every worker.
--
-- A worker reports ready once its signal handlers are installed. Until then
-- a SIGHUP or SIGUSR1 would take its default action and end it, so the
-- supervisor holds one for a worker that is still starting and sends it
-- when the worker reports ready. Once stopping, neither is forwarded: the
-- workers have closed their handlers.
local uv = require "luv"
local ffi = require "ffi"
local log = require "moonpost.runtime.log"
local sched = require "moonpost.runtime.sched"

local _M = { _VERSION = "0.1" }

local function env_index()
  local v = tonumber(os.getenv("MOONPOST_WORKER") or "")
  if v and v >= 0 and v % 1 == 0 then return v end
  return nil
end

_M.index = env_index()

-- Set by the CLI before the policy runs (the policy replaces the global arg).
_M.launcher = nil

-- Backoff between restarts of one worker: doubles from MIN up to MAX, and
-- starts again from MIN once a worker has run for STABLE seconds.
_M.BACKOFF_MIN, _M.BACKOFF_MAX, _M.STABLE = 0.1, 10, 10

-- A worker still running this many seconds after its grace period
-- (stop_grace of the policy the supervisor loaded) is hung: its loop never
-- ran the SIGTERM handler, which a second SIGTERM reaches no better. The
-- supervisor kills it (SIGKILL), so that a stop ends and no hung worker
-- outlives the supervisor, holding the port and its partition.
_M.KILL_AFTER = 2

-- Seconds between a worker's heartbeats, and between the supervisor's checks.
_M.HEARTBEAT = 1

ffi.cdef [[
int setsockopt(int sockfd, int level, int optname, const void *optval, unsigned int optlen);
int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4, unsigned long arg5);
int getppid(void);
int fcntl(int fd, int cmd, ...);
]]

-- Linux values (asm-generic/socket.h, linux/prctl.h, signal.h).
local SOL_SOCKET, SO_REUSEPORT = 1, 15
local PR_SET_PDEATHSIG, SIGTERM = 1, 15
local F_SETFD, FD_CLOEXEC = 2, 1

-- reuseport(tcp): SO_REUSEPORT on a TCP handle whose socket exists
-- (uv.new_tcp("inet") / "inet6"), before bind. libuv 1.44 has no flag for it.
function _M.reuseport(tcp)
  local fd = tcp:fileno()
  if not fd then return nil, "no socket yet" end
  local one = ffi.new("int[1]", 1)
  if ffi.C.setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, one, 4) ~= 0 then
    return nil, "setsockopt(SO_REUSEPORT): errno " .. ffi.errno()
  end
  return true
end

-- In a worker: a SIGTERM when the supervisor dies, so that no worker
-- outlives it (a SIGKILL to the supervisor would leave them serving, the
-- more so as they are not in its process group: supervise()).
local function follow_parent()
  local parent = tonumber(os.getenv("MOONPOST_SUPERVISOR") or "")
  ffi.C.prctl(PR_SET_PDEATHSIG, SIGTERM, 0, 0, 0)
  -- it died before prctl took effect
  if parent and ffi.C.getppid() ~= parent then uv.kill(uv.os_getpid(), "sigterm") end
end

if _M.index then
  follow_parent()
  local n = tonumber(os.getenv("MOONPOST_WORKERS") or "")
  if n and n > _M.index then require("moonpost.runtime.ids").partition(_M.index, n) end
end

-- ready(): the worker's MTA has started (spool recovered, listeners open)
-- and its signal handlers are installed. The supervisor reads it on the
-- worker's fd 3, and only then sends it the signals it forwards.
-- Then a heartbeat line on the same fd every HEARTBEAT seconds, for the
-- supervisor's watchdog (an unreferenced timer: it keeps no loop running).
function _M.ready()
  local fd = tonumber(os.getenv("MOONPOST_WORKER_FD") or "")
  if not fd then return end
  -- (kept open for the heartbeats: not for programs the policy starts)
  ffi.C.fcntl(fd, F_SETFD, ffi.new("int", FD_CLOEXEC)) -- (an int: a vararg number goes as a double)
  local p = uv.new_pipe(false)
  if not p:open(fd) then
    p:close()
    return
  end
  p:write("ready " .. uv.os_getpid() .. "\n")
  local t = uv.new_timer()
  t:unref()
  local ms = math.floor(_M.HEARTBEAT * 1000)
  t:start(ms, ms, function()
    -- (the supervisor gone: nothing to tell; PR_SET_PDEATHSIG ends this worker)
    if p:is_closing() or not p:write("alive\n") then
      t:stop()
      t:close()
      if not p:is_closing() then p:close() end
    end
  end)
end

-- The signals the supervisor forwards that a worker may not receive before
-- it is ready (SIGTERM/SIGINT may: a worker that is still starting can end).
local FORWARDED = { "sighup", "sigusr1" }

local function environ(index, n, supervisor)
  local out = {}
  for k, v in pairs(uv.os_environ()) do
    if not (k == "MOONPOST_WORKER" or k == "MOONPOST_WORKERS" or k == "MOONPOST_WORKER_FD"
        or k == "MOONPOST_SUPERVISOR") then
      out[#out + 1] = k .. "=" .. v
    end
  end
  out[#out + 1] = "MOONPOST_WORKER=" .. index
  out[#out + 1] = "MOONPOST_WORKERS=" .. n
  out[#out + 1] = "MOONPOST_WORKER_FD=3"
  out[#out + 1] = "MOONPOST_SUPERVISOR=" .. supervisor
  return out
end

-- free(specs) -> true | nil, err: every SMTP address (port 0 aside) can be
-- bound by a socket without SO_REUSEPORT. The workers' SO_REUSEPORT binds
-- succeed on a port whose listeners are SO_REUSEPORT sockets of the same
-- user (another supervisor's workers, on another spool): the kernel would
-- then spread connections over both instances. A plain bind fails there,
-- as it does on a port any other socket listens on.
local function free(specs)
  for _, spec in ipairs(specs or {}) do
    if spec.port ~= 0 then
      local v6 = spec.host:find(":", 1, true)
      local tcp = uv.new_tcp(v6 and "inet6" or "inet")
      local pok, ok, err = pcall(tcp.bind, tcp, spec.host, spec.port, v6 and { ipv6only = true } or nil)
      if not pok then ok, err = nil, ok end
      -- libuv reports EADDRINUSE at listen(), not at bind()
      if ok then ok, err = tcp:listen(1, function() end) end
      tcp:close()
      if not ok then
        local name = spec.name or ((v6 and ("[" .. spec.host .. "]") or spec.host) .. ":" .. spec.port)
        return nil, string.format("cannot listen on %s: %s", name, tostring(err))
      end
    end
  end
  return true
end

-- supervise(mta, n, source) -> true | nil, err. source: { path, args } of
-- the policy (runtime/policy.lua's source). Runs the loop until every
-- worker has exited after SIGTERM/SIGINT.
function _M.supervise(mta, n, source)
  local l = _M.launcher
  if not (l and source) then
    return nil, "workers > 1 needs the policy to run under `moonpost run`"
  end
  -- before any worker starts: a port another instance serves is a
  -- configuration error (docs/cli.md#workers)
  local fok, ferr = free(mta.listen_specs)
  if not fok then return nil, ferr end
  local me = uv.os_getpid()
  local slots = {}
  local stopping, failed = false, nil
  local signals = {}
  local timers = {}

  local function live()
    local c = 0
    for _, s in ipairs(slots) do if s.pid then c = c + 1 end end
    return c
  end

  local function finish_if_done()
    if stopping and live() == 0 then
      for _, s in ipairs(signals) do if not s:is_closing() then s:close() end end
      for t in pairs(timers) do if not t:is_closing() then t:close() end end
      log.info("supervisor: every worker has exited")
      uv.stop()
    end
  end

  local function stop_all(why, sig)
    if stopping then
      -- a second SIGTERM/SIGINT: the workers have closed their handlers
      -- (docs/cli.md#signals), so this one ends them at once
      if sig then
        log.info("supervisor: %s again: passed to %d workers", sig, live())
        for _, s in ipairs(slots) do
          if s.pid then uv.kill(s.pid, sig) end
        end
      end
      return
    end
    stopping = true
    log.info("supervisor: %s: stopping %d workers", why, live())
    for _, s in ipairs(slots) do
      if s.pid then uv.kill(s.pid, "sigterm") end
    end
    local grace = mta.opts.stop_grace
    local t = uv.new_timer()
    timers[t] = true
    t:start(math.floor((grace + _M.KILL_AFTER) * 1000), 0, sched.callback(function()
      t:close()
      timers[t] = nil
      for _, s in ipairs(slots) do
        if s.pid then
          log.warn("supervisor: worker %d (pid %d) has not exited %g s after its grace period (%g s): killed",
            s.index, s.pid, _M.KILL_AFTER, grace)
          uv.kill(s.pid, "sigkill")
        end
      end
    end, "supervisor"))
    finish_if_done()
  end

  local start
  local function schedule(slot, delay)
    local t = uv.new_timer()
    timers[t] = true
    t:start(math.floor(delay * 1000), 0, sched.callback(function()
      t:close()
      timers[t] = nil
      if not stopping then start(slot) end
    end, "supervisor"))
  end

  function start(slot)
    local args = { l.script, "run", source.path }
    for _, a in ipairs(source.args or {}) do args[#args + 1] = a end
    local ready = uv.new_pipe(false)
    local handle, pid
    local began = uv.now()
    handle, pid = uv.spawn(l.exe, {
      args = args,
      env = environ(slot.index, n, me),
      stdio = { 0, 1, 2, ready },
      -- a session (and process group) of its own: Ctrl-C at a terminal, or
      -- kill -INT -<pgid>, reaches the supervisor only, which passes the
      -- stop on once; a worker that got it from both would take the second
      -- as "end at once" and drop its transactions. PR_SET_PDEATHSIG
      -- (follow_parent) still ends a worker whose supervisor is killed.
      detached = true,
    }, sched.callback(function(code, signal)
      handle:close()
      if not ready:is_closing() then ready:close() end
      slot.pid, slot.ready, slot.killed, slot.heard = nil, false, nil, nil
      local ran = (uv.now() - began) / 1000
      if stopping then
        log.info("supervisor: worker %d (pid %d) exited: code %d%s", slot.index, pid, code,
          signal ~= 0 and (", signal " .. signal) or "")
        return finish_if_done()
      end
      log.warn("supervisor: worker %d (pid %d) exited: code %d%s after %.1f s", slot.index, pid, code,
        signal ~= 0 and (", signal " .. signal) or "", ran)
      if not slot.started then
        -- never served: a configuration problem the logs above name
        failed = string.format("worker %d exited before it started (code %d%s)", slot.index, code,
          signal ~= 0 and (", signal " .. signal) or "")
        return stop_all("worker " .. slot.index .. " failed to start")
      end
      if ran >= _M.STABLE then slot.delay = _M.BACKOFF_MIN end
      log.info("supervisor: restarting worker %d in %.1f s", slot.index, slot.delay)
      schedule(slot, slot.delay)
      slot.delay = math.min(slot.delay * 2, _M.BACKOFF_MAX)
    end, "supervisor"))
    if not handle then
      ready:close()
      log.error("supervisor: cannot start worker %d: %s", slot.index, tostring(pid))
      if not slot.started then
        failed = "cannot start worker " .. slot.index .. ": " .. tostring(pid)
        return stop_all("worker " .. slot.index .. " failed to start")
      end
      schedule(slot, slot.delay)
      slot.delay = math.min(slot.delay * 2, _M.BACKOFF_MAX)
      return
    end
    slot.pid, slot.ready, slot.pending = pid, false, {}
    log.info("supervisor: worker %d started: pid %d", slot.index, pid)
    ready:read_start(sched.callback(function(_, chunk)
      if chunk then slot.heard = uv.now() end
      if chunk and chunk:find("ready", 1, true) and not slot.ready then
        slot.started, slot.ready = true, true
        -- what came while it started, now that it has its handlers
        for _, name in ipairs(FORWARDED) do
          if slot.pending[name] and not stopping then
            log.info("supervisor: worker %d is ready: %s passed on", slot.index, name)
            uv.kill(pid, name)
          end
        end
        slot.pending = {}
      elseif not chunk and not ready:is_closing() then
        ready:close()
      end
    end, "supervisor"))
  end

  for _, name in ipairs({ "sigterm", "sigint" }) do
    local s = uv.new_signal()
    s:start(name, sched.callback(function() stop_all(name, name) end, "signal"))
    signals[#signals + 1] = s
  end
  -- a signal for every worker: now to those that are ready, and to one
  -- still starting once it reports ready (start())
  local function forward(name)
    if stopping then
      -- a worker that has stopped its handlers would die of it mid-grace
      log.info("supervisor: %s: not forwarded: the workers are stopping", name)
      return
    end
    local sent, held = 0, 0
    for _, s in ipairs(slots) do
      if s.pid and s.ready then
        uv.kill(s.pid, name)
        sent = sent + 1
      elseif s.pid then
        s.pending[name] = true
        held = held + 1
      end
    end
    if held > 0 then
      log.info("supervisor: %s: forwarded to %d workers; %d starting get it once ready", name, sent, held)
    else
      log.info("supervisor: %s: forwarded to %d workers", name, sent)
    end
  end
  for _, name in ipairs(FORWARDED) do
    local s = uv.new_signal()
    s:start(name, sched.callback(function() forward(name) end, "signal"))
    signals[#signals + 1] = s
  end

  -- the watchdog (see the top of this file): only a worker that has
  -- reported ready has a heartbeat; recovery before that may take long
  local watchdog = mta.opts.watchdog or 0
  if watchdog > 0 then
    local t = uv.new_timer()
    timers[t] = true
    t:unref()
    local ms = math.floor(_M.HEARTBEAT * 1000)
    local last = uv.now()
    t:start(ms, ms, sched.callback(function()
      if stopping then return end
      local now = uv.now()
      -- Silence counts only while this loop runs. A tick this late means the
      -- supervisor itself was stopped (a frozen container, a paused VM,
      -- SIGSTOP): its workers most likely were too, and their heartbeats
      -- may not have come in yet; the time it missed is not held against them.
      local late = now - last - ms
      last = now
      if late > ms / 2 then
        for _, s in ipairs(slots) do
          if s.heard then s.heard = math.min(now, s.heard + late) end
        end
      end
      for _, s in ipairs(slots) do
        if s.pid and s.ready and not s.killed and now - (s.heard or now) > watchdog * 1000 then
          s.killed = true
          log.error("supervisor: worker %d (pid %d) has not answered for %.1f s (watchdog %g s): its loop does not "
            .. "run; killed", s.index, s.pid, (now - s.heard) / 1000, watchdog)
          uv.kill(s.pid, "sigkill")
        end
      end
    end, "supervisor"))
  end

  log.info("supervisor: pid %d, %d workers, policy %s", me, n, source.path)
  for i = 0, n - 1 do
    slots[i + 1] = { index = i, delay = _M.BACKOFF_MIN }
    start(slots[i + 1])
  end
  mta.supervising = true
  uv.run("default")
  if failed then return nil, failed end
  return true
end

return _M
