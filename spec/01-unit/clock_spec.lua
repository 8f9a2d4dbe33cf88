-- moonpost.runtime.clock: the clocks the hot paths read through the FFI
-- (compiled into LuaJIT's traces) instead of uv.hrtime() and os.time().
local clock = require "moonpost.runtime.clock"
local uv = require "luv"
local ffi = require "ffi"

describe("moonpost.runtime.clock", function()
  it("reads the clock uv.hrtime() reads: a reading taken between two of its readings lies between them", function()
    for _ = 1, 1000 do
      local a = uv.hrtime()
      local m = clock.mono_ns()
      local ms = clock.mono_ms()
      local b = uv.hrtime()
      assert.is_true(a <= m and m <= b, ("%.0f <= %.0f <= %.0f"):format(a, m, b))
      assert.is_true(a / 1e6 <= ms and ms <= b / 1e6)
    end
  end)

  it("moves on: a wait of 20 ms shows on both monotonic readings", function()
    local ns, ms = clock.mono_ns(), clock.mono_ms()
    uv.sleep(20)
    assert.is_true(clock.mono_ns() - ns >= 20e6)
    assert.is_true(clock.mono_ms() - ms >= 20)
  end)

  it("gives os.time()'s wall clock in whole seconds", function()
    for _ = 1, 1000 do
      local a = os.time()
      local t = clock.time()
      local b = os.time()
      assert.equal("number", type(t))
      assert.equal(t, math.floor(t))
      assert.is_true(a <= t and t <= b)
    end
  end)

  it("leaves the C names free: a policy may still declare clock_gettime() and time() itself", function()
    -- (the module declares them under names of its own: LuaJIT keeps the
    -- first declaration of a C name, so had the module taken the plain
    -- names, the call below, with the policy's own struct, would fail with
    -- "cannot convert")
    assert.has_no.errors(function()
      ffi.cdef [[
        struct clock_spec_timespec { long tv_sec; long tv_nsec; };
        int clock_gettime(int clk, struct clock_spec_timespec *ts);
        long time(long *t);
      ]]
    end)
    local ts = ffi.new("struct clock_spec_timespec")
    assert.equal(0, ffi.C.clock_gettime(1, ts))
    assert.is_true(math.abs(tonumber(ffi.C.time(nil)) - clock.time()) <= 1)
  end)
end)
