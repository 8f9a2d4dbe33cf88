-- The collector's pacing: gc_pause, capped by gc_headroom (runtime/gc.lua).
local gc = require "moonpost.runtime.gc"
local H = require "helpers"

describe("gc.pause_for", function()
  local MB = 1048576

  it("keeps the pause while the headroom allows more", function()
    assert.equal(400, gc.pause_for(2 * MB, 400, 64 * MB))
    assert.equal(400, gc.pause_for(21 * MB, 400, 64 * MB))
  end)

  it("lowers it so that the next cycle starts once the heap has grown by the headroom", function()
    assert.equal(164, gc.pause_for(100 * MB, 400, 64 * MB))
    assert.equal(127, gc.pause_for(230 * MB, 400, 64 * MB))
  end)

  it("never goes below 110, and a headroom of 0 leaves the pause as it is", function()
    assert.equal(110, gc.pause_for(10000 * MB, 400, 64 * MB))
    assert.equal(400, gc.pause_for(10000 * MB, 400, 0))
    assert.equal(250, gc.pause_for(100 * MB, 250, 0))
  end)
end)

-- A heap with about 60 MB alive, then garbage made at a steady rate: gc_pause
-- (400) alone lets it reach about four times what is alive; an 8 MB
-- headroom keeps it near what is alive.
describe("gc_headroom", function()
  local function peak_with(headroom)
    local dir = H.tmpdir("moonpost-gc")
    local script = dir .. "/heap.lua"
    H.write(script, string.format([[
dofile(%q .. "/runtime/devpath.lua").install(%q)
require("moonpost").new { spool = false, gc_headroom = tonumber(arg[1]) }
local gc = require "moonpost.runtime.gc"
local live = {}
for i = 1, 400000 do live[i] = { i, "entry " .. i, i * 2 } end
collectgarbage() collectgarbage()
local alive, cycles0, peak = collectgarbage("count"), gc.cycles(), 0
-- (kept a moment in a ring: an allocation that never escapes, LuaJIT sinks)
local ring = {}
for i = 1, 2000000 do
  ring[i %% 64] = { i, i + 1 }
  if i %% 1000 == 0 then peak = math.max(peak, collectgarbage("count")) end
end
print(alive, peak, gc.cycles() - cycles0, #live)
]], H.root, H.root))
    local p = io.popen("luajit " .. script .. " " .. headroom .. " 2>&1")
    local out = p:read("*a")
    p:close()
    H.rm_rf(dir)
    local alive, peak, cycles = out:match("^(%S+)%s+(%S+)%s+(%d+)%s+400000\n$")
    assert(alive, out)
    return tonumber(alive), tonumber(peak), tonumber(cycles)
  end

  it("keeps the heap within the headroom of what is alive, where gc_pause alone lets it grow fourfold", function()
    local alive, peak = peak_with(0)
    assert.is_true(alive > 40 * 1024, "alive: " .. alive .. " kB")
    assert.is_true(peak > 3 * alive, string.format("without a headroom: alive %.0f kB, peak %.0f kB", alive, peak))
    local alive8, peak8, cycles8 = peak_with(8 * 1048576)
    -- the cap: what is alive, a floor of a tenth more (110), and what an
    -- incremental cycle lets be made while it runs
    assert.is_true(peak8 < 2 * alive8, string.format("8 MB headroom: alive %.0f kB, peak %.0f kB", alive8, peak8))
    -- it paced cycles: the sentinel's finalizer ran at the end of each
    assert.is_true(cycles8 >= 3, "cycles: " .. cycles8)
  end)
end)
