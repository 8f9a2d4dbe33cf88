-- Message ids (runtime/ids.lua): strictly increasing, above every id a
-- recovery found, and, in worker processes, of one residue per worker.
local ids = require "moonpost.runtime.ids"

describe("moonpost.runtime.ids", function()
  after_each(function() ids.partition(0, 1) end)

  it("next_number() increases strictly and reads as the current time", function()
    local a, b = ids.next_number(), ids.next_number()
    assert.is_true(b > a)
    assert.is_true(math.abs(ids.time_of(b) - os.time()) <= 1)
    assert.equal(b, ids.number(ids.hex(b)))
  end)

  it("bump(n) makes later ids greater than n", function()
    local n = ids.next_number() + 1000
    ids.bump(n)
    assert.is_true(ids.next_number() > n)
  end)

  it("partition(i, n) gives worker i only the ids equal to i modulo n, still increasing", function()
    for _, case in ipairs({ { 0, 2 }, { 1, 2 }, { 2, 3 } }) do
      local i, n = case[1], case[2]
      ids.partition(i, n)
      local last = 0
      for _ = 1, 50 do
        local id = ids.next_number()
        assert.equal(i, id % n)
        assert.is_true(id > last)
        last = id
      end
      -- after a recovery's bump, too
      ids.bump(last + 7)
      local id = ids.next_number()
      assert.equal(i, id % n)
      assert.is_true(id > last + 7)
    end
  end)
end)
