-- The scheduler: a task that yields in a loop (long jobs done in slices,
-- like compaction and CSV import) must let I/O and timers run between
-- slices, or syncs, sessions and timeouts stall until it ends.
local H = require "helpers"
local sched = require "moonpost.runtime.sched"
local uv = require "luv"

describe("sched.yield", function()
  it("lets I/O callbacks run between the slices of a yielding loop", function()
    H.run(function()
      local accepted = false
      local server, port = H.listen(function(c)
        accepted = true
        c:close()
      end)
      local client = uv.new_tcp()
      client:connect("127.0.0.1", port, function() end)
      local n = 0
      while not accepted and n < 100000 do
        sched.yield()
        n = n + 1
      end
      client:close()
      server:close()
      assert.is_true(accepted, "the connection was not accepted during " .. n .. " yields")
    end)
  end)

  it("lets timers fire between the slices of a yielding loop", function()
    H.run(function()
      local fired = false
      local t = uv.new_timer()
      t:start(5, 0, function() fired = true end)
      local start = uv.hrtime()
      while not fired and uv.hrtime() - start < 2e9 do sched.yield() end
      t:close()
      assert.is_true(fired)
    end)
  end)
end)

-- wait() returns what wake() or wake_token() gave: two values at most (the
-- wake paths take a fixed number of arguments, which LuaJIT compiles), the
-- same whether the wake comes from a callback (the task resumes at once) or
-- from another task (it resumes later, from the ready queue).
describe("sched.wake", function()
  it("hands two values to the waiting task, from a callback or from another task", function()
    H.run(function()
      local got = {}
      local a = sched.spawn(function() got[1] = { sched.wait(5) } end)
      local b = sched.spawn(function()
        local task, token = sched.reserve()
        local t = uv.new_timer()
        t:start(1, 0, function()
          t:close()
          sched.wake_token(task, token, "from", "callback")
        end)
        got[2] = { sched.wait(5) }
      end)
      local c = sched.spawn(function() got[3] = { sched.wait(5) } end)
      -- from this task: deferred, in order
      assert.is_true(sched.wake(a, 1, nil))
      assert.is_true(sched.wake(c, false, "x"))
      H.wait_for(function() return got[1] and got[2] and got[3] end, 5)
      assert.same({ 1, nil }, got[1])
      assert.same({ "from", "callback" }, got[2])
      assert.same({ false, "x" }, got[3])
      -- a task not waiting is not woken; its next wait is not answered early
      assert.is_false(sched.wake(a, "late"))
      assert.is_true(b.done and c.done and a.done)
    end)
  end)

  it("keeps a wake that comes for a reserved token before the wait, and returns it without yielding", function()
    H.run(function()
      local got, yielded
      sched.spawn(function()
        local task, token = sched.reserve()
        -- a callback that ran at once (a request that failed to start)
        assert.is_true(sched.wake_token(task, token, "early", 7))
        local before = yielded
        got = { sched.wait(5) }
        assert.equal(before, yielded)
        -- only that wait: the next one waits for its own wake
        local t2, k2 = sched.reserve()
        local t = uv.new_timer()
        t:start(1, 0, function()
          t:close()
          sched.wake_token(t2, k2, "later")
        end)
        got[3] = sched.wait(5)
      end)
      yielded = 0
      sched.spawn(function()
        for _ = 1, 3 do
          yielded = yielded + 1
          sched.yield()
        end
      end)
      H.wait_for(function() return got and got[3] end, 5)
      assert.same({ "early", 7, "later" }, got)
    end)
  end)

  it("times a wait out with nil, \"timeout\"", function()
    H.run(function()
      local r
      sched.spawn(function() r = { sched.wait(0.05) } end)
      H.wait_for(function() return r end, 5)
      assert.same({ nil, "timeout" }, r)
    end)
  end)
end)

describe("sched.wake from inside a task", function()
  it("defers the woken task until the waker yields, even from a coroutine of the task's own", function()
    local order = {}
    H.run(function()
      local sleeper = sched.spawn(function()
        sched.wait()
        order[#order + 1] = "woken"
      end)
      -- a policy may run its own coroutines (an iterator, say) inside a task
      local gen = coroutine.wrap(function()
        sched.wake(sleeper, true)
        order[#order + 1] = "after wake"
        coroutine.yield()
      end)
      gen()
      order[#order + 1] = "waker goes on"
      sched.yield()
      order[#order + 1] = "waker back"
    end)
    assert.same({ "after wake", "waker goes on", "woken", "waker back" }, order)
  end)
end)

-- park(): a task waits with no coroutine (an idle SMTP session holds no
-- stack); the wake or the timeout runs its continuation as the same task.
describe("sched.park", function()
  it("ends the task's run and runs the continuation, as the same task, with the wake's values", function()
    H.run(function()
      local got, task = {}, nil
      local cont = setmetatable({}, { __call = function(_, a, b)
        got.values = { a, b }
        got.same = sched.current() == task
        got.waited = { sched.wait(0.01) } -- a continuation may wait like any task
      end })
      task = sched.spawn(function()
        local r = sched.park(cont, 5)
        got.returned = r
        return r
      end)
      assert.equal(sched.PARKED, got.returned)
      assert.equal("suspended", sched.status(task))
      assert.is_true(sched.is_waiting(task))
      assert.is_true(sched.wake(task, "in", 2))
      H.wait_for(function() return got.waited end, 5)
      assert.same({ "in", 2 }, got.values)
      assert.is_true(got.same)
      assert.same({ nil, "timeout" }, got.waited)
      H.wait_for(function() return sched.status(task) == "dead" end, 5)
    end)
  end)

  it("runs the continuation with nil, \"timeout\" when its timeout passes", function()
    H.run(function()
      local got
      sched.spawn(function()
        return sched.park(function(a, b) got = { a, b } end, 0.05)
      end)
      H.wait_for(function() return got end, 5)
      assert.same({ nil, "timeout" }, got)
    end)
  end)

  it("takes the coroutine from the task: it can no longer wait there", function()
    H.run(function()
      local err
      sched.spawn(function()
        sched.park(function() end, 5)
        local ok, e = pcall(sched.wait, 0.01)
        err = not ok and e
      end)
      assert.matches("outside a task", err)
    end)
  end)

  it("gives a woken task a coroutine again, and a finished task's coroutine to the next", function()
    H.run(function()
      local cos = {}
      local first = sched.spawn(function()
        cos[1] = coroutine.running()
        return sched.park(function() cos[2] = coroutine.running() end)
      end)
      -- the parked task's coroutine went back for reuse: the next task has it
      sched.spawn(function() cos[3] = coroutine.running() end)
      assert.equal(cos[1], cos[3])
      sched.wake(first, true)
      H.wait_for(function() return cos[2] end, 5)
      assert.is_true(cos[2] ~= nil and cos[2] ~= coroutine.running())
    end)
  end)

  it("counts the tasks that hold a coroutine: waiting yes, parked and ended no", function()
    H.run(function()
      local base = sched.coroutines_in_use()
      local waiting = sched.spawn(function() sched.wait(5) end)
      assert.equal(base + 1, sched.coroutines_in_use())
      local resumed
      local parked = sched.spawn(function()
        return sched.park(function() resumed = sched.coroutines_in_use() end, 5)
      end)
      assert.equal(base + 1, sched.coroutines_in_use())
      sched.spawn(function() end) -- ended at once
      sched.spawn(function() error("a task that fails") end)
      assert.equal(base + 1, sched.coroutines_in_use())
      -- woken, the parked task's continuation runs on a coroutine of its own
      sched.wake(parked, true)
      H.wait_for(function() return resumed end, 5)
      assert.equal(base + 2, resumed)
      assert.is_true(H.wait_for(function() return sched.coroutines_in_use() == base + 1 end, 5))
      sched.wake(waiting, true)
      assert.is_true(H.wait_for(function() return sched.coroutines_in_use() == base end, 5))
    end)
  end)

  it("does not count a task that returned without parking as parked", function()
    H.run(function()
      local t = sched.spawn(function() return sched.PARKED end)
      assert.equal("dead", sched.status(t))
    end)
  end)
end)

describe("sched's coroutine pool", function()
  it("keeps nothing of a finished task alive: not its function, its arguments or its results", function()
    H.run(function()
      local weak = setmetatable({}, { __mode = "v" })
      do
        local arg, result = {}, {}
        local fn = function(a) return a, result end
        weak.arg, weak.fn, weak.result = arg, fn, result
        local t = sched.spawn(fn, arg)
        assert.equal("dead", sched.status(t))
      end
      collectgarbage()
      collectgarbage()
      assert.is_nil(weak.arg)
      assert.is_nil(weak.fn)
      assert.is_nil(weak.result)
    end)
  end)
end)
