-- The suppression store at scale: a log of N entries (default 1000000)
-- over ten tenants is written, then loaded the way the MTA loads it at
-- start (in a process of its own, so that its RSS growth is the store's
-- alone), looked up, and compacted.
--
--   luajit scripts/bench/suppress.lua [N] [DIR]
--
-- prints (one figure a line):
--   suppress write: N adds in s (adds/s), log of octets (octets/entry)
--   suppress load: N entries in s (page cache warm)
--   suppress memory: octets/entry counted by the store, octets/entry of RSS growth
--   suppress lookup: ns per hit, ns per miss (store:check from Lua, one call each)
--   suppress block check: ns per hit, ns per miss (moonpost.suppress :check, a table per hit)
--   suppress compaction: lines (live) in s
local root = debug.getinfo(1, "S").source:sub(2):match("^(.*)/scripts/bench/suppress%.lua$") or "."
dofile(root .. "/runtime/devpath.lua").install(root)
local uv = require "luv"
local core = require "moonpost.core.suppress"

local TENANTS = 10

local function rss_kib()
  local f = assert(io.open("/proc/self/status"))
  local s = f:read("*a")
  f:close()
  return tonumber(s:match("VmRSS:%s*(%d+)"))
end

local function now() return uv.hrtime() / 1e9 end

local function address(i)
  return string.format("user%d.%x@example%d.com", i, i * 2654435761 % 4294967296, i % 97)
end

local function tenant(i)
  return "tenant" .. (i % TENANTS)
end

-- M addresses that are in the store and M that are not
local function samples(M)
  local hits, misses = {}, {}
  for i = 1, M do
    hits[i] = address(i)
    misses[i] = "nobody" .. i .. "@example.org"
  end
  return hits, misses
end

-- ns per call of check(tenant, address) over the hits, then the misses
local function time_lookups(check, hits, misses)
  local M, found = #hits, 0
  local t0 = now()
  for i = 1, M do
    if check(tenant(i), hits[i]) then found = found + 1 end
  end
  local h = now() - t0
  t0 = now()
  for i = 1, M do
    if check(tenant(i), misses[i]) then found = found + 1 end
  end
  local m = now() - t0
  assert(found == M, "found " .. found .. " of " .. M)
  return h / M * 1e9, m / M * 1e9
end

-- `suppress.lua --load PATH N`: the child process
if arg[1] == "--load" then
  local path, N = arg[2], tonumber(arg[3])
  local hits, misses = samples(math.min(N, 1000000))
  collectgarbage()
  local rss0 = rss_kib()
  local t0 = now()
  local st, rep = assert(core.open(path))
  local secs = now() - t0
  local rss1 = rss_kib()
  assert(rep.live == N, "loaded " .. tostring(rep.live))
  print(string.format("suppress load: %d entries in %.3f s (page cache warm)", rep.live, secs))
  local s = st:stats()
  print(string.format("suppress memory: %.1f octets/entry counted by the store (%d slots), "
    .. "%.1f octets/entry of RSS growth", s.memory / s.live, s.slots, (rss1 - rss0) * 1024 / s.live))
  local h, m = time_lookups(function(t, a) return st:check(t, a) end, hits, misses)
  -- the loop without the lookup
  t0 = now()
  local x = 0
  for i = 1, #hits do
    if #tenant(i) + #hits[i] > 0 then x = x + 1 end
  end
  print(string.format("suppress lookup: %.0f ns per hit, %.0f ns per miss (store:check from Lua, %d each; "
    .. "the loop alone %.0f ns)", h, m, #hits, (now() - t0) / #hits * 1e9))
  st:close()
  os.exit(0)
end

local N = tonumber(arg[1]) or 1000000
local dir = arg[2] or uv.fs_mkdtemp("/tmp/moonpost-bench-suppress-XXXXXX")
local path = dir .. "/suppress"
os.remove(path)
os.remove(path .. ".compact")

-- write
local t0 = now()
local st = assert(core.open(path))
for i = 1, N do
  st:add(tenant(i), address(i), i % 3 == 0 and "invalid-recipient" or "bad-domain", 1700000000 + i % 86400)
  if i % 65536 == 0 then assert(st:flush()) end
end
assert(st:flush())
local secs = now() - t0
local fsize = uv.fs_stat(path).size
st:close()
print(string.format("suppress write: %d adds in %.2f s (%.0f adds/s), log of %d octets (%.1f octets/entry)",
  N, secs, N / secs, fsize, fsize / N))

-- load and lookups, in a fresh process
local script = debug.getinfo(1, "S").source:sub(2)
local child = assert(io.popen(string.format("luajit '%s' --load '%s' %d", script, path, N)))
io.write(child:read("*a"))
assert(child:close(), "the load process failed")

-- through the block, as a policy or the RCPT check calls it
local log = require "moonpost.runtime.log"
log.set_level("warn")
local block = require("moonpost.suppress").setup { path = path, check = "none" }
assert(block:open())
local hits, misses = samples(math.min(N, 1000000))
local h, m = time_lookups(function(t, a) return block:check(t, a) end, hits, misses)
print(string.format("suppress block check: %.0f ns per hit, %.0f ns per miss (moonpost.suppress :check)", h, m))
block:close()
uv.run() -- the close's last sync

-- compaction: every other entry removed, then the live half copied
st = assert(core.open(path))
for i = 1, N, 2 do st:remove(tenant(i), address(i)) end
assert(st:flush())
local lines = st:stats().records
t0 = now()
local E = assert(st:compact_begin(path .. ".compact"))
local pos = 0
while pos < E do pos = assert(st:compact_step(pos, E)) end
assert(st:compact_finish(path .. ".compact", path))
secs = now() - t0
local after = st:stats()
print(string.format("suppress compaction: %d lines (%d live) in %.3f s, %d -> %d octets", lines, after.live, secs,
  E, after.size))
st:close()
if not arg[2] then
  os.remove(path)
  uv.fs_rmdir(dir)
end
