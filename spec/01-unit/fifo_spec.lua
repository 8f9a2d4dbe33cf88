-- moonpost.runtime.fifo: a FIFO kept in a ring, for the queue's lists
-- (per-destination order, messages set aside).
local fifo = require "moonpost.runtime.fifo"

-- what a FIFO holds, oldest first, taken out of it
local function drain(f)
  local out = {}
  while fifo.len(f) > 0 do out[#out + 1] = fifo.pop(f) end
  return out
end

describe("moonpost.runtime.fifo", function()
  it("gives entries back in the order they came, across growth", function()
    local f = fifo.new()
    assert.is_nil(fifo.peek(f))
    assert.is_nil(fifo.pop(f))
    for i = 1, 100 do fifo.push(f, i) end
    assert.equal(100, fifo.len(f))
    assert.equal(1, fifo.peek(f))
    assert.equal(2, fifo.peek(f, 2))
    assert.equal(100, fifo.peek(f, 100))
    assert.is_nil(fifo.peek(f, 101))
    assert.is_nil(fifo.peek(f, 0))
    local want = {}
    for i = 1, 100 do want[i] = i end
    assert.same(want, drain(f))
    assert.is_nil(fifo.pop(f))
  end)

  it("keeps its order when it grows while its head has moved on (wrapped)", function()
    local f, next_in, next_out = fifo.new(), 1, 1
    -- push two, take one, many times: the ring wraps and doubles mid-way
    for _ = 1, 300 do
      fifo.push(f, next_in); next_in = next_in + 1
      fifo.push(f, next_in); next_in = next_in + 1
      assert.equal(next_out, fifo.pop(f)); next_out = next_out + 1
    end
    assert.equal(300, fifo.len(f))
    assert.equal(next_out + 1, fifo.peek(f, 2)) -- (across the wrap)
    for _, x in ipairs(drain(f)) do
      assert.equal(next_out, x)
      next_out = next_out + 1
    end
    assert.equal(next_in, next_out)
  end)

  -- The pattern that lost entries from a plain Lua list used as a FIFO:
  -- once its head was past the middle, `#t` could answer 0 and the next
  -- append went to t[1], before the head, out of reach.
  it("reaches an entry added after most of a long list was taken", function()
    local f = fifo.new()
    for i = 1, 100 do fifo.push(f, i) end
    for i = 1, 70 do assert.equal(i, fifo.pop(f)) end
    fifo.push(f, "late")
    assert.equal(31, fifo.len(f))
    local out = drain(f)
    assert.equal(71, out[1])
    assert.equal("late", out[31])
  end)

  it("keep() drops what fails the test and keeps the rest in order", function()
    local f = fifo.new()
    for i = 1, 20 do fifo.push(f, i) end
    for _ = 1, 5 do fifo.pop(f) end -- head at 6: keep works on a moved head
    for i = 21, 30 do fifo.push(f, i) end
    fifo.keep(f, function(x) return x % 3 == 0 end)
    assert.same({ 6, 9, 12, 15, 18, 21, 24, 27, 30 }, drain(f))
    fifo.keep(f, function() return true end)
    assert.equal(0, fifo.len(f))
  end)

  -- The queue of recovered messages holds a whole spool until their first
  -- attempts move them on; its ring must not stay that large after.
  it("keep() gives back the room of a ring left a quarter full or less", function()
    local f = fifo.new()
    for i = 1, 1000 do fifo.push(f, i) end
    for _ = 1, 10 do fifo.pop(f) end -- a moved head: the shrunk ring starts at it
    assert.equal(1024, f.mask + 1)
    fifo.keep(f, function(x) return x % 2 == 0 end) -- half stay: no smaller
    assert.equal(1024, f.mask + 1)
    assert.equal(495, fifo.len(f))
    fifo.keep(f, function(x) return x % 10 == 0 or x > 990 end)
    assert.equal(103, fifo.len(f))
    assert.equal(256, f.mask + 1) -- twice what it holds, as a power of two
    -- in order, and it still grows past its new size
    for i = 1001, 1300 do fifo.push(f, i) end
    local out = drain(f)
    assert.equal(403, #out)
    assert.equal(20, out[1])
    assert.equal(990, out[98])
    assert.equal(992, out[99])
    assert.equal(1300, out[403])
    fifo.push(f, "x")
    fifo.keep(f, function() return false end)
    assert.equal(8, f.mask + 1) -- never below the first size
    assert.is_nil(fifo.pop(f))
  end)
end)
