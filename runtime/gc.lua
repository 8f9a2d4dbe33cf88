-- The pace of the Lua garbage collector (moonpost.new's gc_pause and
-- gc_headroom, docs/api.md).
--
--   gc.configure(pause, headroom)   -- percent; bytes (0: pause alone)
--   gc.cycles()                     -- collection cycles ended since the first configure()
--   gc.pause()                      -- the pause now (what the headroom made of gc_pause)
--
-- Lua starts a collection cycle once the heap has grown to `pause` percent
-- of what the last cycle left alive. A high pause saves collector work
-- while little is alive (a relay: a few MB in flight), but it scales with
-- the live heap: a queue of a million messages holds about 230 MB, and 400
-- lets the heap reach about 900 MB before the next cycle, every page of it
-- touched (a page fault each, 12 us apiece on the development VM). With a
-- headroom, the pause is worked out again at the end of every cycle from
-- what that cycle left alive, so that the next one starts once the heap has
-- grown by `headroom` bytes: never above `pause`, and never below 110 (a heap
-- over ten times the headroom grows by a tenth of itself, so the collector
-- does not run without a break).
local collectgarbage, floor, pcall = collectgarbage, math.floor, pcall

local _M = {}

local MIN_PAUSE = 110
_M.MIN_PAUSE = MIN_PAUSE

local pause, headroom = 200, 0
local current = 200 -- the pause set last
local cycles = 0
local armed = false

-- The pause for a heap of live bytes.
function _M.pause_for(live, max_pause, room)
  if room <= 0 or live <= 0 then return max_pause end
  local p = floor(100 + 100 * room / live)
  if p > max_pause then return max_pause end
  if p < MIN_PAUSE then return MIN_PAUSE end
  return p
end

-- the pause for the heap as it is now
local function repace()
  current = _M.pause_for(collectgarbage("count") * 1024, pause, headroom)
  collectgarbage("setpause", current)
end

local on_gc

-- A sentinel that only the collector refers to: its finalizer runs at the
-- end of the cycle that finds it unreachable, and makes the next one.
local function arm()
  armed = true
  getmetatable(newproxy(true)).__gc = on_gc
end

-- Runs at the end of every cycle, before Lua works out when the next one
-- starts: the heap now holds what the cycle left alive and what was made
-- meanwhile. (pcall: an error in a finalizer would be raised in whatever
-- code allocated.)
local function cycle_ended()
  cycles = cycles + 1
  arm()
  repace()
end
function on_gc() pcall(cycle_ended) end

function _M.configure(p, room)
  pause, headroom = p, room or 0
  repace()
  if not armed then arm() end
end

function _M.cycles() return cycles end
function _M.pause() return current end

return _M
