local core = require "moonpost.core.suppress"
local H = require "helpers"

local HEADER = "# moonpost suppression log 1\n"

local function append(path, data)
  local f = assert(io.open(path, "ab"))
  f:write(data)
  f:close()
end

local function size(path)
  return H.read(path):len()
end

-- every live entry, read from the file: { ["tenant|address"] = reason .. "@" .. time }
local function listing(st, tenant)
  local out, n = {}, 0
  local E = assert(st:scan_begin())
  local pos = 0
  while pos < E do
    local nxt, rows = st:read(pos, E, tenant)
    for i = 1, #rows, 4 do
      local k = rows[i] .. "|" .. rows[i + 1]
      assert.is_nil(out[k], "listed twice: " .. k)
      out[k] = rows[i + 2] .. "@" .. rows[i + 3]
      n = n + 1
    end
    pos = nxt
  end
  st:scan_end()
  return out, n
end

-- compact the whole log the way moonpost.suppress does, with `during()`
-- called between the copy and the switch (changes made meanwhile)
local function compact(st, path, during)
  local tmp = path .. ".compact"
  local E = assert(st:compact_begin(tmp))
  local pos = 0
  while pos < E do pos = assert(st:compact_step(pos, E)) end
  if during then during() end
  assert(st:compact_tail())
  if during then during() end
  assert(st:compact_finish(tmp, path))
end

describe("moonpost.core.suppress", function()
  local dir, path
  before_each(function()
    dir = H.tmpdir("moonpost-core-suppress")
    path = dir .. "/suppress"
  end)
  after_each(function() H.rm_rf(dir) end)

  it("open() makes the file with its header and reports an empty load", function()
    local st, rep = assert(core.open(path))
    assert.same({ records = 0, live = 0, size = 0, corrupt = 0, bad = {} }, rep)
    assert.equal(HEADER, H.read(path))
    assert.equal(0, st:count())
    assert.is_true(st:close())
  end)

  it("add(), check() and remove() keep entries by tenant and lowercased address", function()
    local st = assert(core.open(path))
    assert.is_true(st:add("a", "Bob@Example.COM", "manual", 1700000000))
    assert.is_false(st:add("a", "bob@example.com", "other reason", 1700000099))
    local t, reason = st:check("a", "BOB@example.com")
    assert.equal(1700000000, t)
    assert.equal("manual", reason)
    assert.is_nil(st:check("a", "bob@example.org"))
    assert.is_false(st:remove("a", "nobody@example.com"))
    assert.is_true(st:remove("a", "bob@EXAMPLE.com"))
    assert.is_nil(st:check("a", "bob@example.com"))
    assert.equal(0, st:count())
    st:close()
  end)

  it("keeps tenants apart: an entry of one tenant never answers for another", function()
    local st = assert(core.open(path))
    assert.is_true(st:add("A", "x@example.com", "manual"))
    assert.is_true(st:add("", "y@example.com", "manual"))
    assert.is_nil(st:check("B", "x@example.com"))
    assert.is_nil(st:check("", "x@example.com"))
    assert.is_nil(st:check("a", "x@example.com"), "tenant names are case-sensitive")
    assert.is_nil(st:check("A", "y@example.com"))
    -- removing it for B changes nothing for A
    assert.is_false(st:remove("B", "x@example.com"))
    assert.truthy(st:check("A", "x@example.com"))
    assert.is_true(st:add("B", "x@example.com", "complaint"))
    assert.equal(1, st:count("A"))
    assert.equal(1, st:count("B"))
    assert.equal(1, st:count(""))
    assert.equal(0, st:count("C"))
    assert.equal(3, st:count())
    assert.is_true(st:remove("A", "x@example.com"))
    assert.is_nil(st:check("A", "x@example.com"))
    assert.equal("complaint", select(2, st:check("B", "x@example.com")))
    st:close()
  end)

  it("add() returns nil and a reason for fields that cannot be stored, and raises on misuse", function()
    local st = assert(core.open(path))
    assert.same({ nil, "bad address" }, { st:add("", "", "r") })
    assert.same({ nil, "bad address" }, { st:add("", "a\tb@example.com", "r") })
    assert.same({ nil, "bad address" }, { st:add("", "a@example.com\n", "r") })
    assert.same({ nil, "bad address" }, { st:add("", string.rep("a", core.ADDRESS_MAX + 1), "r") })
    assert.same({ nil, "bad tenant" }, { st:add("t\n", "a@example.com", "r") })
    assert.same({ nil, "bad reason" }, { st:add("", "a@example.com", "a\0b") })
    assert.is_nil(st:check("", string.rep("a", core.ADDRESS_MAX + 1)))
    assert.has_error(function() st:add(nil, "a@example.com", "r") end)
    assert.has_error(function() st:add("", "a@example.com", "r", -1) end)
    assert.equal(0, st:count())
    assert.equal(HEADER, (st:flush() and H.read(path)))
    st:close()
  end)

  it("writes one checksummed line per change, buffered until flush()", function()
    local st = assert(core.open(path))
    st:add("t", "A@B.example", "invalid-recipient", 1700000000)
    st:remove("t", "a@b.example", 1700000001)
    assert.equal(HEADER, H.read(path))
    assert.is_true(st:pending() > 0)
    assert.is_true(st:flush())
    assert.equal(0, st:pending())
    local lines = {}
    for l in H.read(path):gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.equal(3, #lines)
    assert.matches("^A\tt\ta@b%.example\tinvalid%-recipient\t1700000000\t%x%x%x%x%x%x%x%x$", lines[2])
    assert.matches("^R\tt\ta@b%.example\t1700000001\t%x%x%x%x%x%x%x%x$", lines[3])
    assert.same({ "A", "t", "a@b.example", "invalid-recipient", 1700000000 }, { core.parse(lines[2]) })
    assert.same({ "R", "t", "a@b.example", nil, 1700000001 }, { core.parse(lines[3]) })
    assert.equal(lines[2] .. "\n", core.format("A", "t", "a@b.example", "invalid-recipient", 1700000000))
    st:close()
  end)

  it("parse() names what is wrong with a line", function()
    local good = core.format("A", "t", "a@b.example", "r", 1)
    assert.same({ nil, "checksum mismatch" }, { core.parse(good:gsub("a@b", "c@b")) })
    assert.same({ nil, "bad checksum field" }, { core.parse(good:gsub("%x+\n$", "xyz\n")) })
    assert.same({ nil, "wrong number of fields" }, { core.parse("A\tt\ta@b\t1\t00000000") })
    assert.same({ nil, "not a record" }, { core.parse("X\tt") })
    assert.same({ nil, "line too long" }, { core.parse("A\t" .. string.rep("x", 2000)) })
  end)

  it("reopens with every entry, its reason and time", function()
    local st = assert(core.open(path))
    for i = 1, 500 do assert.is_true(st:add("t" .. (i % 3), "user" .. i .. "@example.com", "r" .. (i % 7), 1700000000 + i)) end
    for i = 1, 500, 5 do assert.is_true(st:remove("t" .. (i % 3), "user" .. i .. "@example.com")) end
    assert.is_true(st:close())
    assert.is_true(st:close(), "close() twice")
    local ok, err = pcall(st.check, st, "t1", "user1@example.com")
    assert.is_false(ok)
    assert.matches("store is closed", err)
    local st2, rep = assert(core.open(path))
    assert.equal(400, rep.live)
    assert.equal(600, rep.records)
    assert.equal(0, rep.corrupt)
    assert.is_nil(rep.torn)
    for i = 1, 500 do
      local t, reason = st2:check("t" .. (i % 3), "USER" .. i .. "@example.com")
      if i % 5 == 1 then
        assert.is_nil(t)
      else
        assert.equal(1700000000 + i, t)
        assert.equal("r" .. (i % 7), reason)
      end
    end
    local dead, live = st2:garbage()
    assert.equal(200, dead)
    assert.equal(400, live)
    st2:close()
    collectgarbage()
  end)

  it("refuses a second writer of the same file", function()
    local st = assert(core.open(path))
    local other, err, code = core.open(path)
    assert.is_nil(other)
    assert.matches("^locked: ", err)
    assert.equal("EWOULDBLOCK", code)
    st:close()
    assert.truthy(core.open(path)):close()
  end)

  it("cuts a torn tail (an incomplete last line) and writes after it cleanly", function()
    local st = assert(core.open(path))
    st:add("t", "kept@example.com", "r", 1700000000)
    st:close()
    local good = size(path)
    append(path, core.format("A", "t", "torn@example.com", "r", 1700000001):sub(1, 25))
    local st2, rep = assert(core.open(path))
    assert.equal(good, rep.torn)
    assert.equal("incomplete line", rep.torn_why)
    assert.equal(1, rep.torn_lines)
    assert.equal(0, rep.corrupt)
    assert.equal(good, size(path), "truncated")
    assert.truthy(st2:check("t", "kept@example.com"))
    assert.is_nil(st2:check("t", "torn@example.com"))
    st2:add("t", "after@example.com", "r")
    st2:close()
    local st3, rep3 = assert(core.open(path))
    assert.is_nil(rep3.torn)
    assert.equal(2, rep3.live)
    st3:close()
  end)

  it("cuts a last line whose checksum does not match", function()
    local st = assert(core.open(path))
    st:add("t", "kept@example.com", "r", 1700000000)
    st:close()
    local good = size(path)
    append(path, (core.format("A", "t", "bad@example.com", "r", 1700000001):gsub("bad@", "bat@")))
    local st2, rep = assert(core.open(path))
    assert.equal(good, rep.torn)
    assert.equal("checksum mismatch", rep.torn_why)
    assert.equal(good, size(path))
    assert.is_nil(st2:check("t", "bat@example.com"))
    st2:close()
  end)

  it("skips and reports a damaged line in the middle, keeping the lines around it", function()
    local st = assert(core.open(path))
    st:add("t", "one@example.com", "r", 1700000000)
    st:add("t", "two@example.com", "r", 1700000001)
    st:add("t", "three@example.com", "r", 1700000002)
    st:close()
    local text = H.read(path)
    local off = text:find("two@", 1, true)
    local line_start = text:sub(1, off):match(".*()\n") -- offset (1-based) after the LF before it
    H.write(path, text:sub(1, off - 1) .. "TWO@" .. text:sub(off + 4))
    local st2, rep = assert(core.open(path))
    assert.equal(1, rep.corrupt)
    assert.equal(line_start, rep.bad[1].off)
    assert.equal("checksum mismatch", rep.bad[1].why)
    assert.is_nil(rep.torn)
    assert.equal(#text, size(path), "nothing cut")
    assert.truthy(st2:check("t", "one@example.com"))
    assert.is_nil(st2:check("t", "two@example.com"))
    assert.truthy(st2:check("t", "three@example.com"))
    -- listings pass over it too
    local l = listing(st2)
    assert.same({ ["t|one@example.com"] = "r@1700000000", ["t|three@example.com"] = "r@1700000002" }, l)
    st2:close()
  end)

  it("reads a damaged stretch before good lines as corrupt, and one damaged last line as torn", function()
    local st = assert(core.open(path))
    st:add("t", "a@example.com", "r", 1)
    st:close()
    append(path, "garbage\n\0\0\0\n" .. core.format("A", "t", "b@example.com", "r", 2) .. "\0\0\0\0xx")
    local before = size(path)
    local st2, rep = assert(core.open(path))
    assert.equal(2, rep.corrupt)
    assert.equal(1, rep.torn_lines)
    assert.equal(before - 6, size(path))
    assert.equal(2, rep.live)
    st2:close()
  end)

  it("never cuts several damaged lines at the end: they are kept, skipped and reported", function()
    local st = assert(core.open(path))
    st:add("t", "a@example.com", "r", 1)
    st:close()
    -- what a crash cannot leave: many lines of text that are not ours
    local junk = {}
    for i = 1, 50 do junk[i] = "someone" .. i .. "@example.org,unsubscribed" end
    append(path, table.concat(junk, "\n") .. "\nlast line without its end")
    local text = H.read(path)
    local st2, rep = assert(core.open(path))
    assert.is_nil(rep.torn)
    assert.equal(51, rep.corrupt)
    assert.is_true(rep.unterminated)
    assert.equal(text .. "\n", H.read(path), "nothing cut; the last line ended")
    assert.truthy(st2:check("t", "a@example.com"))
    st2:add("t", "after@example.com", "r", 3)
    st2:close()
    local st3, rep3 = assert(core.open(path))
    assert.equal(51, rep3.corrupt)
    assert.is_nil(rep3.unterminated)
    assert.truthy(st3:check("t", "after@example.com"))
    st3:close()
  end)

  it("refuses a file it did not write, and leaves it as it is", function()
    local csv = "email,reason\nsomeone@example.org,unsubscribed\n"
    H.write(path, csv)
    local st, err, code = core.open(path)
    assert.is_nil(st)
    assert.equal("not a suppression log (its first line is not \"# moonpost suppression log 1\"); left as it is", err)
    assert.equal("EFTYPE", code)
    assert.equal(csv, H.read(path))
    -- a header cut short when the file was made: started over
    H.write(path, "# moonpost supp")
    local st2, rep = assert(core.open(path))
    assert.equal(0, rep.live)
    st2:add("t", "a@example.com", "r", 1)
    st2:close()
    assert.truthy(assert(core.open(path)):check("t", "a@example.com"))
  end)

  it("lists each live entry once, from the file, per tenant or all", function()
    local st = assert(core.open(path))
    st:add("a", "x@example.com", "r1", 100)
    st:add("b", "x@example.com", "r2", 101)
    st:add("a", "gone@example.com", "r1", 102)
    st:remove("a", "gone@example.com", 103)
    -- removed and added again in the same second with the same reason:
    -- two identical A lines, one entry
    st:add("a", "again@example.com", "r1", 104)
    st:remove("a", "again@example.com", 104)
    st:add("a", "again@example.com", "r1", 104)
    -- and with another reason
    st:add("a", "other@example.com", "r1", 105)
    st:remove("a", "other@example.com", 105)
    st:add("a", "other@example.com", "r3", 105)
    local all, n = listing(st)
    assert.equal(4, n)
    assert.same({ ["a|x@example.com"] = "r1@100", ["b|x@example.com"] = "r2@101",
      ["a|again@example.com"] = "r1@104", ["a|other@example.com"] = "r3@105" }, all)
    local only_b = listing(st, "b")
    assert.same({ ["b|x@example.com"] = "r2@101" }, only_b)
    st:close()
  end)

  it("compaction keeps exactly the live set, with changes made while it runs", function()
    local st = assert(core.open(path))
    local expect = {}
    local function add(t, a, r, time)
      if st:add(t, a, r, time) then expect[t .. "|" .. a] = r .. "@" .. time end
    end
    local function remove(t, a)
      if st:remove(t, a) then expect[t .. "|" .. a] = nil end
    end
    for i = 1, 3000 do add("t" .. (i % 4), "u" .. i .. "@example.com", "r" .. (i % 5), 1000 + i) end
    for i = 1, 3000, 3 do remove("t" .. (i % 4), "u" .. i .. "@example.com") end
    for i = 1, 300, 3 do add("t" .. (i % 4), "u" .. i .. "@example.com", "back", 9000 + i) end
    local before = size(path) + st:pending()
    local step = 0
    compact(st, path, function()
      step = step + 1
      for i = 1, 50 do
        add("new", "n" .. step .. "-" .. i .. "@example.com", "during", 20000 + i)
        remove("t" .. ((i * 7) % 4), "u" .. (i * 7) .. "@example.com")
      end
    end)
    assert.is_nil(H.ls(dir)[2], "the .compact file is gone")
    local got, n = listing(st)
    assert.same(expect, got)
    local want = 0
    for _ in pairs(expect) do want = want + 1 end
    assert.equal(want, n)
    assert.equal(want, st:count())
    st:add("after", "a@example.com", "r", 1)
    expect["after|a@example.com"] = "r@1"
    st:close()
    assert.is_true(size(path) < before)
    local st2, rep = assert(core.open(path))
    -- the live entries once, the changes made during the compaction as
    -- they were written (two rounds of 50 adds and up to 50 removes), one more
    assert.is_true(rep.records <= want + 2 * 100 + 1, rep.records)
    assert.equal(0, rep.corrupt)
    assert.is_nil(rep.torn)
    assert.same(expect, (listing(st2)))
    assert.equal(want + 1, rep.live)
    st2:close()
  end)

  it("compact_abort() leaves the log as it was and removes the copy", function()
    local st = assert(core.open(path))
    for i = 1, 100 do st:add("t", "u" .. i .. "@example.com", "r", i) end
    for i = 1, 100, 2 do st:remove("t", "u" .. i .. "@example.com") end
    assert(st:flush())
    local text = H.read(path)
    local E = assert(st:compact_begin(path .. ".compact"))
    assert(st:compact_step(0, E))
    assert.is_true(st:compact_abort(path .. ".compact"))
    assert.same({ "suppress" }, H.ls(dir))
    assert.equal(text, H.read(path))
    assert.equal(50, (listing(st)) and st:count())
    st:close()
  end)

  it("holds 100000 entries in at most 32 octets each", function()
    local st = assert(core.open(path))
    for i = 1, 100000 do st:add("tenant", "user" .. i .. "@example.com", "bulk", 1700000000) end
    local s = st:stats()
    assert.equal(100000, s.live)
    assert.is_true(s.memory / s.live <= 32, "octets per entry: " .. s.memory / s.live)
    st:close()
  end)
end)
