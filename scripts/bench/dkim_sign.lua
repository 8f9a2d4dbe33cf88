-- The DKIM signer alone: how many signatures per second its threads make,
-- to set beside `openssl speed -multi` (which runs the same primitive on
-- every core with nothing else). One signature per job over a message of
-- SIZE octets, at most 256 jobs out at once, for N jobs.
--
--   luajit scripts/bench/dkim_sign.lua KEYFILE [N] [SIZE] [THREADS]
-- prints: dkim-sign <type> <bits>: <jobs/s> jobs/s (<N> jobs, <threads> threads)
local root = debug.getinfo(1, "S").source:sub(2):match("^(.*)/scripts/bench/dkim_sign%.lua$") or "."
dofile(root .. "/runtime/devpath.lua").install(root)
local uv = require "luv"
local dkim = require "moonpost.core.dkim"
local keyfile = assert(arg[1], "usage: dkim_sign.lua KEYFILE [N] [SIZE] [THREADS]")
local N = tonumber(arg[2]) or 5000
local SIZE = tonumber(arg[3]) or 1000
local threads = tonumber(arg[4]) or #uv.cpu_info()
local key = assert(dkim.load_key(keyfile))
local line = string.rep("x", 76) .. "\r\n"
local msg = "From: bench@bench.test\r\nTo: sink@sink.test\r\nSubject: bench\r\n"
  .. "Date: Mon, 30 Nov 2026 20:00:00 +0000\r\nMessage-ID: <1@bench.test>\r\n\r\n"
  .. string.rep(line, math.max(1, math.floor(SIZE / #line)))
local specs = { { key = key, domain = "bench.test", selector = "s1" } }
local s = assert(dkim.signer { threads = threads })
local poll = uv.new_poll(s:fd())
local sent, done, failed = 0, 0, 0
local t0 = uv.hrtime()
local function fill()
  while sent < N and sent - done < 256 do
    assert(s:submit(msg, specs))
    sent = sent + 1
  end
end
fill()
poll:start("r", function()
  for _, r in ipairs(s:collect()) do
    done = done + 1
    if not r[2] then failed = failed + 1 end
  end
  if done >= N then
    poll:close()
    return
  end
  fill()
end)
uv.run()
local secs = (uv.hrtime() - t0) / 1e9
s:close()
local info = key:info()
print(string.format("dkim-sign %s %d: %.0f jobs/s (%d jobs, %d threads, %d failed)", info.type, info.bits,
  N / secs, N, threads, failed))
