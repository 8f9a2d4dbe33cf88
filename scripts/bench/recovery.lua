-- Recovery time of a spool holding N queued messages (default 1,000,000),
-- each with a one-recipient envelope and a SIZE-octet body (default 1000),
-- in 64 MiB segments. Prints the time to write the spool, then the time to
-- recover it with the page cache warm and, when it can be dropped (root),
-- cold, and the process RSS afterwards.
--
--   luajit scripts/bench/recovery.lua [N] [SIZE] [DIR]
local root = debug.getinfo(1, "S").source:sub(2):match("^(.*)/scripts/bench/recovery%.lua$") or "."
dofile(root .. "/runtime/devpath.lua").install(root)
local uv = require "luv"
local core = require "moonpost.core.spool"
local spool = require "moonpost.runtime.spool"
local cjson = require "cjson"
local log = require "moonpost.runtime.log"
log.set_level("warn")

local N = tonumber(arg[1]) or 1000000
local SIZE = tonumber(arg[2]) or 1000
local dir = arg[3] or uv.fs_mkdtemp("/tmp/moonpost-recovery-XXXXXX")
local SEG = 64 * 1048576

local function now() return uv.hrtime() / 1e9 end
local function rss_mib()
  for line in io.lines("/proc/self/status") do
    local kb = line:match("^VmRSS:%s+(%d+)")
    if kb then return tonumber(kb) / 1024 end
  end
end

os.execute("mkdir -p '" .. dir .. "/seg'")
local body = ("Subject: recovery benchmark\r\n\r\n"
  .. string.rep("0123456789abcdef\r\n", math.ceil(SIZE / 18))):sub(1, SIZE)
local t0 = now()
local segn, seg, bytes = 0, nil, 0
local base = os.time() * 1048576
for i = 1, N do
  if not seg or seg:size() >= SEG then
    if seg then seg:flush() seg:close() end
    segn = segn + 1
    seg = assert(core.open(string.format("%s/seg/%016d.seg", dir, segn), true))
  end
  local meta = cjson.encode({ v = 1, from = "sender" .. i .. "@source.test",
    rcpt = { { a = "rcpt" .. i .. "@dest.test" } }, t = os.time(), ip = "127.0.0.1", helo = "client.test" })
  local _, len = assert(seg:append(core.MSG, 0, base + i, meta, body, 1))
  bytes = bytes + len
end
seg:flush()
seg:close()
os.execute("sync")
local wrote = now() - t0
print(string.format("wrote %d messages, %d segments, %.0f MiB in %.1f s", N, segn, bytes / 1048576, wrote))

local function recover(label)
  collectgarbage()
  local r0 = now()
  local sp = assert(spool.open({ dir = dir, min_free = 0 }))
  local secs = now() - r0
  print(string.format("recovery (%s): %d messages in %.2f s (%.0f messages/s), RSS %.0f MiB",
    label, sp:count(), secs, sp:count() / secs, rss_mib()))
  sp:close()
  return secs
end

recover("page cache warm")
local f = io.open("/proc/sys/vm/drop_caches", "w")
if f and f:write("3") and f:close() then
  recover("page cache dropped")
else
  print("recovery (page cache dropped): skipped (cannot write /proc/sys/vm/drop_caches)")
end
if not arg[3] then os.execute("rm -rf '" .. dir .. "'") end
-- let closed handles finish closing, then exit without closing the Lua
-- state (luv cannot run its cleanup into a state being destroyed)
uv.run("nowait")
os.exit(0)
