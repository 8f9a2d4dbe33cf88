-- moonpost.runtime.fifo: a first-in first-out list kept in a ring.
--
-- A Lua list used as a FIFO (append at #t + 1, take from a head index that
-- moves on) goes wrong once its head is past the middle of the array: `#t`
-- may then answer any border, 0 among them (LuaJIT finds it by bisection),
-- so an append lands before the head and is never reached. Its shape also
-- changes as it grows and drains (keys move between the array and the
-- hash part), and LuaJIT records new machine code for the functions that
-- read it each time. A ring keeps every entry in the array part of one
-- table whose size changes only when the ring doubles.
--
--   local f = fifo.new()
--   fifo.push(f, x); fifo.peek(f [, i]) -> x; fifo.pop(f) -> x; fifo.len(f) -> n
--   fifo.keep(f, pred): drop the entries for which pred(x) is false, in order
local band = require("bit").band
local tnew = require "table.new"

local _M = { _VERSION = "0.1" }

local FIRST = 8 -- a power of two

function _M.new()
  -- (every field made here: the table's shape never changes after)
  return { ring = tnew(FIRST, 0), mask = FIRST - 1, first = 0, n = 0 }
end

-- the entries, in order, into a new ring of size (a power of two, >= n)
local function resize(f, size)
  local old, mask, first = f.ring, f.mask, f.first
  local ring = tnew(size, 0)
  for i = 0, f.n - 1 do ring[i + 1] = old[band(first + i, mask) + 1] end
  f.ring, f.mask, f.first = ring, size - 1, 0
end

local function grow(f)
  resize(f, (f.mask + 1) * 2)
end

function _M.push(f, x)
  if f.n > f.mask then grow(f) end
  f.ring[band(f.first + f.n, f.mask) + 1] = x
  f.n = f.n + 1
end

-- peek(f [, i]) -> the i-th oldest entry (the oldest by default), or nil
function _M.peek(f, i)
  i = i or 1
  if i > f.n or i < 1 then return nil end
  return f.ring[band(f.first + i - 1, f.mask) + 1]
end

-- take the oldest entry out and return it (nil when empty)
function _M.pop(f)
  if f.n == 0 then return nil end
  local i = f.first + 1
  local x = f.ring[i]
  f.ring[i] = nil
  f.first = band(i, f.mask)
  f.n = f.n - 1
  return x
end

function _M.len(f) return f.n end

-- A ring a quarter full or less after keep() is made smaller (to twice
-- what it holds): a queue that drained after a burst (the recovered
-- messages of a large spool, all in one queue until their first attempt)
-- does not keep its peak size.
local function shrink(f)
  local size = FIRST
  while size < 2 * f.n do size = size * 2 end
  if size * 2 <= f.mask + 1 then resize(f, size) end
end

-- keep(f, pred): only the entries for which pred(x) is true stay, in their
-- order. O(len).
function _M.keep(f, pred)
  local ring, mask, first, n = f.ring, f.mask, f.first, f.n
  local kept = 0
  for i = 0, n - 1 do
    local j = band(first + i, mask) + 1
    local x = ring[j]
    ring[j] = nil
    if pred(x) then
      ring[band(first + kept, mask) + 1] = x
      kept = kept + 1
    end
  end
  f.n = kept
  if 4 * kept <= mask + 1 and mask + 1 > FIRST then shrink(f) end
end

return _M
