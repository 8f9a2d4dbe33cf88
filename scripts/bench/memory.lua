-- Memory per queued message: a spool of N queued messages (default
-- 1,000,000; one recipient, small body) recovered into the spool index and
-- the delivery queue, as at start-up; then the same messages once each has
-- had its envelope read and its queues set, as its first attempt does (the
-- shape of an entry with the sink down, and of one stored by this process).
-- Prints the Lua heap and the RSS that the index and the queue add, per
-- message, for both; and the peak of the heap and of the RSS during the
-- pass of first attempts, with the collector paced as moonpost.new paces it
-- (gc_pause, gc_headroom: their defaults, or HEADROOM octets; 0 lets
-- gc_pause alone pace it).
--
--   luajit scripts/bench/memory.lua [N [HEADROOM]]
local root = debug.getinfo(1, "S").source:sub(2):match("^(.*)/scripts/bench/memory%.lua$") or "."
dofile(root .. "/runtime/devpath.lua").install(root)
local uv = require "luv"
local core = require "moonpost.core.spool"
local spool = require "moonpost.runtime.spool"
local queue = require "moonpost.runtime.queue"
local cjson = require "cjson"
require("moonpost.runtime.log").set_level("warn")
local N = tonumber(arg[1]) or 1000000
-- the collector as a running MTA has it
require("moonpost").new({ spool = false, gc_headroom = arg[2] and tonumber(arg[2]) or nil })
local dir = uv.fs_mkdtemp("/tmp/moonpost-mem-XXXXXX")
os.execute("mkdir -p " .. dir .. "/seg")
local seg = assert(core.open(dir .. "/seg/0000000000000001.seg", true))
local base = os.time() * 1048576
for i = 1, N do
  local meta = cjson.encode({ v = 1, from = "s" .. i .. "@a.test", rcpt = { { a = "r" .. i .. "@b.test" } },
    t = os.time() })
  seg:append(core.MSG, 0, base + i, meta, "Subject: x\r\n\r\nbody\r\n", 1)
end
seg:flush() seg:close()
local function status(field)
  for l in io.lines("/proc/self/status") do
    local k = l:match("^" .. field .. ":%s+(%d+)")
    if k then return tonumber(k) end
  end
end
local function rss() return status("VmRSS") end
collectgarbage() collectgarbage()
local lua0, rss0 = collectgarbage("count"), rss()
local sp = assert(spool.open({ dir = dir, min_free = 0 }))
local q = queue.new({ bus = { emit = function() end }, hostname = "x" }, sp, {})
sp:each(function(m) q:account(m) q:add(m) end)
collectgarbage() collectgarbage()
local lua1, rss1 = collectgarbage("count"), rss()
print(string.format("%d queued (recovered): Lua heap %.0f bytes/message, RSS %.0f bytes/message", sp:count(),
  (lua1 - lua0) * 1024 / N, (rss1 - rss0) * 1024 / N))
-- each one's first attempt: its envelope read, its queues known (Queue:deliver)
local unread, seen, peak = 0, 0, 0
sp:each(function(m)
  local env = spool.envelope(m)
  if env then
    q:unaccount(m)
    q:account(m, env)
  else
    unread = unread + 1
  end
  seen = seen + 1
  if seen % 1000 == 0 then peak = math.max(peak, collectgarbage("count")) end
end)
assert(unread == 0, unread .. " envelopes unreadable")
local hwm = status("VmHWM")
print(string.format("during the pass of first attempts: Lua heap peak %.0f MiB, RSS peak %.0f MiB (%.0f bytes/message)",
  peak / 1024, hwm / 1024, hwm * 1024 / N))
collectgarbage() collectgarbage()
local lua2, rss2 = collectgarbage("count"), rss()
print(string.format("%d queued (attempted): Lua heap %.0f bytes/message, RSS %.0f bytes/message", sp:count(),
  (lua2 - lua0) * 1024 / N, (rss2 - rss0) * 1024 / N))
sp:close()
os.execute("rm -rf " .. dir)
uv.run("nowait")
os.exit(0)
