-- The coroutine scheduler over luv. This is the only module that calls
-- coroutine.resume or sees a luv callback on behalf of tasks.
--
--   sched.spawn(fn, ...)  -> task   run fn as a task, now, until its first wait
--   sched.wait(timeout)   -> a, b   suspend the running task until wake() or timeout
--                                   (then returns nil, "timeout")
--   sched.wake(task, a, b)          resume a waiting task with (at most two) values
--   sched.sleep(seconds)
--   sched.park(cont, timeout) -> sched.PARKED
--                                   wait without a coroutine: return PARKED from
--                                   the task; the wake or timeout runs cont(a, b)
--   sched.is_parked(task) -> bool
--   sched.coroutines_in_use() -> n  tasks holding a coroutine now (not parked)
--   sched.current()       -> task | nil
--   sched.callback(fn)    -> fn     wrap a luv callback so that an error is logged
--                                   instead of taking the process down
--
-- Every task body runs under xpcall: an error ends that task only, with its
-- traceback logged (or handed to task.on_error). Wakes that come from inside
-- a task are deferred to the loop so that no task ever resumes another
-- re-entrantly; spawn() runs the new task at once, up to its first wait,
-- like a function call.
local uv = require "luv"
local clock = require "moonpost.runtime.clock"
local log = require "moonpost.runtime.log"
local tnew = require "table.new"

local co_create, co_resume, co_yield, co_running, co_status =
  coroutine.create, coroutine.resume, coroutine.yield, coroutine.running, coroutine.status
local xpcall, traceback = xpcall, debug.traceback
local floor, ceil = math.floor, math.ceil

local _M = { _VERSION = "0.1" }

local tasks = setmetatable({}, { __mode = "k" })   -- coroutine -> task
local in_use = 0 -- the entries of tasks: tasks holding a coroutine
local handles = setmetatable({}, { __mode = "k" }) -- internal handles (not leaks)

-- Timeouts live in a wheel of TICK-millisecond buckets, so a wait costs two
-- table writes instead of a timer start and stop, and a session needs no
-- timer handle of its own.
local TICK = 25
local buckets = {}       -- slot -> { [task] = token }
local armed = 0          -- entries in buckets
local wheel_timer        -- runs every TICK while armed > 0
local last_slot          -- slot processed up to

local ready = {}         -- deferred wakes: task, token, a, b
local ready_n = 0
local ready_idle        -- runs the deferred wakes, once per loop iteration
local ready_active = false -- ready_idle is started (kept here: is_active() costs a luv call)

-- The wheel's clock: the monotonic clock in milliseconds. Not uv.now():
-- luv finds its loop through a registry lookup by name on every call,
-- about 600 instructions, and a relayed message waits about ten times.
-- (clock.mono_ms, not uv.hrtime: a call compiled code makes, see clock.lua)
local now_ms = clock.mono_ms

local function on_task_error(task, err)
  if task.on_error then
    local ok, e2 = pcall(task.on_error, err)
    if not ok then log.error("task %s: error handler failed: %s", task.name or "?", tostring(e2)) end
  else
    log.error("task %s failed: %s", task.name or "?", tostring(err))
  end
end

-- What park() returns, for the task's function to return (see park()).
local PARKED = setmetatable({}, { __tostring = function() return "parked" end })

-- co's task no longer holds it (parked, ended, or its resume failed)
local function release(co)
  if tasks[co] then
    tasks[co] = nil
    in_use = in_use - 1
  end
end

local function finish(task, co, ok, err)
  release(co)
  if ok and err == PARKED and task.co ~= co then return end -- parked, not done
  task.done = true
  if not ok then
    task.error = err
    on_task_error(task, err)
  end
end

-- What a coroutine yields when its task has ended and it is free for the
-- next one.
local FREE = {}

-- A task's coroutine runs body(), which, when the task's function has
-- returned, yields FREE and then runs the next task given to it (a tail
-- call: the stack does not grow). Coroutines are kept for reuse, up to
-- POOL_MAX of them, so a task costs no coroutine and stack to allocate and
-- collect, and a session that parks leaves no dead stack behind.
local pool, pool_n, POOL_MAX = {}, 0, 256

local body

-- (A function of its own, called as a tail call: body's frame, with the
-- task, its function and their arguments, is gone while the coroutine
-- waits in the pool, so it keeps none of them from the collector.)
local function next_task()
  return body(co_yield(FREE))
end

function body(task, fn, ...)
  finish(task, co_running(), xpcall(fn, traceback, ...))
  return next_task()
end

local function take_co()
  local n = pool_n
  if n > 0 then
    local co = pool[n]
    pool[n] = nil
    pool_n = n - 1
    return co
  end
  return co_create(body)
end

-- The task whose coroutine the scheduler has resumed and not yet got back
-- from (the innermost one: spawn() runs a new task at once). The wakes ask
-- it, not coroutine.running(): in a coroutine of a task's own (a policy's
-- iterator, say) that named the inner coroutine, no task, and the woken
-- task was resumed inside the waker, re-entrantly.
local running = nil

-- After a resume: back to the task that was running (if any); a coroutine
-- whose task ended goes back to the pool; a failed resume is logged
-- (body() wraps everything in xpcall, so that is a scheduler bug).
local function resumed(task, co, prev, ok, err)
  running = prev
  if not ok then
    task.done = true
    release(co)
    log.error("task %s: resume failed: %s", task.name or "?", tostring(err))
  elseif err == FREE and pool_n < POOL_MAX then
    pool_n = pool_n + 1
    pool[pool_n] = co
  end
end

-- A task's first run: body(task, fn, ...) on a coroutine of its own.
local function start(task, fn, ...)
  local prev = running
  running = task
  local co = take_co()
  task.co = co
  tasks[co] = task
  in_use = in_use + 1
  resumed(task, co, prev, co_resume(co, task, fn, ...))
end

-- Every later resume, with the values wait() returns: two at most, as a
-- fixed number of arguments lets LuaJIT compile the wake paths (it does not
-- record "..." passed on here: NYI bytecode VARG). A parked task (task.co
-- is its continuation) starts again on a coroutine from the pool.
local function resume(task, a, b)
  local co = task.co
  if type(co) ~= "thread" then return start(task, co, a, b) end
  local prev = running
  running = task
  resumed(task, co, prev, co_resume(co, a, b))
end

local function wheel_remove(task)
  local slot = task.slot
  if slot then
    local b = buckets[slot]
    if b and b[task] then
      b[task] = nil
      armed = armed - 1
    end
    task.slot = nil
  end
end

local function wheel_tick()
  local now_slot = floor(now_ms() / TICK)
  last_slot = last_slot or now_slot
  -- last_slot moves past a slot before its tasks run, so a task that waits
  -- again from here is filed in a slot still to come.
  while last_slot <= now_slot do
    local s = last_slot
    last_slot = s + 1
    local b = buckets[s]
    if b then
      buckets[s] = nil
      for task, token in pairs(b) do
        armed = armed - 1
        if task.waiting == token then
          task.slot = nil
          task.waiting = false
          resume(task, nil, "timeout")
        end
      end
    end
  end
  if armed <= 0 then
    armed = 0
    wheel_timer:stop()
    last_slot = nil
  end
end

-- (made once: wheel_add runs for every wait with a timeout, and a function
-- that makes a closure is not compiled by LuaJIT, NYI bytecode FNEW)
local function on_wheel_timer()
  local ok, err = pcall(wheel_tick)
  if not ok then log.error("timer wheel: %s", tostring(err)) end
end

local function wheel_add(task, token, timeout)
  if not wheel_timer then
    wheel_timer = uv.new_timer()
    wheel_timer:unref()
    handles[wheel_timer] = true
  end
  local slot = ceil((now_ms() + timeout * 1000) / TICK)
  -- A slot the wheel has already passed would never fire (timeout <= 0,
  -- or a wait filed from inside a tick): use the next one it will process.
  if last_slot and slot < last_slot then slot = last_slot end
  local b = buckets[slot]
  if not b then
    b = {}
    buckets[slot] = b
  end
  b[task] = token
  task.slot = slot
  armed = armed + 1
  if armed == 1 then
    last_slot = floor(now_ms() / TICK)
    wheel_timer:start(TICK, TICK, on_wheel_timer)
  end
end

local function run_ready()
  local q, n = ready, ready_n
  -- (sized: one grown from {} is rehashed at 1, 2, 3, 5, 9, 17 slots)
  ready, ready_n = tnew(16, 0), 0
  local i = 1
  while i <= n do
    local task, token = q[i], q[i + 1]
    -- A wake meant for an earlier wait (that timed out since) is dropped.
    if task.waiting == token and not task.done then
      task.waiting = false
      wheel_remove(task)
      resume(task, q[i + 2], q[i + 3])
    end
    i = i + 4
  end
end

local function on_ready_idle()
  local ok, err = pcall(run_ready)
  if not ok then log.error("scheduler: %s", tostring(err)) end
  if ready_n == 0 then
    ready_idle:stop()
    ready_active = false
  end
end

local function defer(task, a, b)
  ready[ready_n + 1] = task
  ready[ready_n + 2] = task.waiting
  ready[ready_n + 3] = a
  ready[ready_n + 4] = b
  ready_n = ready_n + 4
  -- An idle handle, not a 0 ms timer: libuv runs a timer that is re-armed
  -- with 0 ms from its own callback again in the same pass, so a task that
  -- yields in a loop kept I/O callbacks (and fsync completions) from ever
  -- running. The idle callback runs one batch per loop iteration, and the
  -- loop polls for I/O (without blocking) between batches.
  if not ready_idle then
    ready_idle = uv.new_idle()
    handles[ready_idle] = true
  end
  if not ready_active then
    ready_idle:start(on_ready_idle)
    ready_active = true
  end
end

local token_seq = 0

-- A task is { co, name, waiting, slot } while it runs (on_error and done
-- only when set): four fields fit the table's smallest hash part, where a
-- fifth doubles it (every idle SMTP session is a task waiting for a
-- command; scripts/bench/conns_probe.lua counts them).
function _M.spawn(fn, ...)
  local task = { waiting = false, co = false }
  start(task, fn, ...)
  return task
end

-- Like spawn, with a name for the logs and an error handler.
function _M.spawn_named(name, on_error, fn, ...)
  local task = { name = name, on_error = on_error, waiting = false, co = false }
  start(task, fn, ...)
  return task
end

function _M.current()
  local co = co_running()
  return co and tasks[co]
end

function _M.wait(timeout)
  local task = tasks[co_running() or false]
  if not task then error("sched.wait() outside a task", 2) end
  local token = task.reserved
  if token then
    task.reserved = nil
    -- woken before it got here (a callback that ran at once): no yield
    local early = task.early
    if early then
      task.early = nil
      return early[1], early[2]
    end
  else
    token_seq = token_seq + 1
    token = token_seq
  end
  task.waiting = token
  if timeout then
    if timeout <= 0 then
      -- a poll: give others a turn, then time out (unless woken first)
      defer(task, nil, "timeout")
    else
      wheel_add(task, token, timeout)
    end
  end
  return co_yield()
end

local function wake_token(task, token, a, b)
  if task.waiting ~= token or task.done then
    -- the token of a wait not yet begun: that wait returns this at once
    if task.reserved == token and not task.done then
      task.early = { a, b }
      return true
    end
    return false
  end
  if running then
    -- from inside a task: no task resumes another re-entrantly
    defer(task, a, b)
    return true
  end
  task.waiting = false
  wheel_remove(task)
  resume(task, a, b)
  return true
end
_M.wake_token = wake_token

function _M.wake(task, a, b)
  local token = task.waiting
  if not token then return false end
  return wake_token(task, token, a, b)
end

-- reserve() -> task, token: the token of the current task's next wait(). A
-- callback registered before that wait wakes it with wake_token(), and a
-- callback that fires late (after a timeout) then wakes nothing. One that
-- fires before the wait begins (a request that failed or finished at once)
-- is kept: that wait returns its values without yielding.
function _M.reserve()
  local task = tasks[co_running() or false]
  if not task then error("sched.reserve() outside a task", 2) end
  token_seq = token_seq + 1
  task.reserved = token_seq
  task.early = nil
  return task, token_seq
end

-- park(cont [, timeout]) -> PARKED: wait() for a task that gives up its
-- coroutine while it waits. Unlike wait(), it returns at once, and the
-- task's function must return what it returned (from every frame down to
-- the function given to spawn), with nothing to do on the way: the
-- coroutine then goes back to the pool. The wake (or the timeout) that
-- ends the wait runs cont(a, b) -- a function or a callable table -- as
-- the task's body on a coroutine from the pool, with the values wait()
-- would have returned. An idle SMTP session parks, so 500,000 of them do
-- not hold 500,000 stacks; what the task needs after must not be on its
-- stack. The task can no longer wait on this coroutine.
function _M.park(cont, timeout)
  local co = co_running()
  local task = tasks[co or false]
  if not task then error("sched.park() outside a task", 2) end
  if task.reserved then error("sched.park() with a reserved wake", 2) end
  token_seq = token_seq + 1
  local token = token_seq
  task.waiting = token
  if timeout then wheel_add(task, token, timeout > 0 and timeout or 0.001) end
  release(co)
  task.co = cont
  return PARKED
end
_M.PARKED = PARKED

function _M.is_waiting(task)
  return task.waiting and true or false
end

-- waits_for(task, token) -> true while task waits in the wait that token
-- (from reserve()) names: a wake_token() with it would wake the task
function _M.waits_for(task, token)
  return task.waiting == token and not task.done
end

-- Sleeps use their own timer: precise, and not on any hot path.
function _M.sleep(seconds)
  local task = _M.current()
  if not task then error("sched.sleep() outside a task", 2) end
  local t = uv.new_timer()
  t:start(floor(seconds * 1000 + 0.5), 0, function()
    t:close()
    _M.wake(task, true)
  end)
  local r = _M.wait()
  if not t:is_closing() then t:close() end
  return r
end

-- Yield to let other tasks and callbacks run.
function _M.yield()
  local task = _M.current()
  if not task then return end
  token_seq = token_seq + 1
  task.waiting = token_seq
  defer(task, true)
  return co_yield()
end

function _M.callback(fn, what)
  return function(...)
    local ok, err = xpcall(fn, traceback, ...)
    if not ok then log.error("%s: %s", what or "callback", tostring(err)) end
  end
end

function _M.is_internal(handle)
  return handles[handle] == true
end

-- coroutines_in_use() -> how many tasks hold a coroutine now: running or
-- waiting, not parked, not ended
function _M.coroutines_in_use()
  return in_use
end

-- is_parked(task) -> true while the task waits parked (park()), holding
-- no coroutine
function _M.is_parked(task)
  return not task.done and type(task.co) ~= "thread"
end

function _M.status(task)
  if task.done then return "dead" end
  if _M.is_parked(task) then return "suspended" end
  return co_status(task.co)
end

return _M
