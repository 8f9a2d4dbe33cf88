-- The scheduler: a task that yields in a loop (long jobs done in slices,
-- like compaction and CSV import) must let I/O and timers run between
-- slices, or syncs, sessions and timeouts stall until it ends.
local H = require "helpers"
local sched = require "moonpost.runtime.sched"
local uv = require "luv"

describe("sched.yield", function()
  it("lets I/O callbacks run between the slices of a yielding loop", function()
    H.run(function()
      local server = uv.new_tcp()
      assert(server:bind("127.0.0.1", 0))
      local accepted = false
      server:listen(16, function()
        local c = uv.new_tcp()
        server:accept(c)
        accepted = true
        c:close()
      end)
      local port = server:getsockname().port
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
