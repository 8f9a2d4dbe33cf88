-- Clocks that compiled code reads without leaving its trace.
--
--   clock.mono_ns()  the monotonic clock in nanoseconds (uv.hrtime()'s clock)
--   clock.mono_ms()  the same in milliseconds (a float)
--   clock.time()     the wall clock in whole seconds (os.time()'s value)
--
-- Why not uv.hrtime(), uv.now() and os.time(): each is a Lua C function.
-- LuaJIT cannot compile a call to one, so a trace that reaches it ends,
-- the call runs through the interpreter, and a new trace starts after it
-- ("stitching"): about 150 instructions on top of the call itself (luv's
-- also looks its loop up in the registry). The relay made about 23 such
-- clock calls a message (callgrind: scripts/bench/instructions.sh). An FFI
-- call to clock_gettime() or time() is compiled into the trace.
--
-- (From the interpreter an FFI call costs more than a C function; these are
-- for the hot paths, which run compiled.)
local _M = { _VERSION = "0.1" }

local ok, ffi = pcall(require, "ffi")
if ok then
  -- Under names of our own (asm() names the symbol): LuaJIT keeps the
  -- first declaration of a C name, so a policy or library that declares
  -- clock_gettime() or time() with its own types keeps them.
  ok = pcall(ffi.cdef, [[
    typedef struct { long tv_sec; long tv_nsec; } moonpost_timespec_t;
    int moonpost_clock_gettime(int clk, moonpost_timespec_t *ts) asm("clock_gettime");
    long moonpost_time(void *t) asm("time");
  ]])
end

if ok then
  local tonumber = tonumber
  -- (the functions themselves, not ffi.C's: the interpreter then skips
  -- looking each name up in the library at every call)
  local gettime, time = ffi.C.moonpost_clock_gettime, ffi.C.moonpost_time
  local CLOCK_MONOTONIC = 1 -- Linux (and libuv's uv_hrtime())
  local ts = ffi.new("moonpost_timespec_t")
  function _M.mono_ns()
    gettime(CLOCK_MONOTONIC, ts)
    return tonumber(ts.tv_sec) * 1e9 + tonumber(ts.tv_nsec)
  end
  function _M.mono_ms()
    gettime(CLOCK_MONOTONIC, ts)
    return tonumber(ts.tv_sec) * 1e3 + tonumber(ts.tv_nsec) / 1e6
  end
  function _M.time()
    return tonumber(time(nil))
  end
else
  local uv = require "luv"
  local hrtime = uv.hrtime
  _M.mono_ns = hrtime
  function _M.mono_ms() return hrtime() / 1e6 end
  _M.time = os.time
end

return _M
