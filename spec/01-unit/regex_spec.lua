-- moonpost.runtime.regex: the small regex engine behind { regex = ... } rules.
local regex = require "moonpost.runtime.regex"

describe("moonpost.runtime.regex", function()
  -- { pattern, subject, start, end (nil: no match) [, opts] }
  local cases = {
    { "abc", "xxabcxx", 3, 5 },
    { "abc", "ab", nil },
    { "a.c", "abc", 1, 3 },
    { "^abc", "xabc", nil },
    { "^abc", "abcd", 1, 3 },
    { "abc$", "abcabc", 4, 6 },
    { "a|bc|d", "xxbcx", 3, 4 },
    { "(?:ab)+", "abababx", 1, 6 },
    { "(ab)+c", "ababc", 1, 5 },
    { "a*", "bbb", 1, 0 },
    { "ba*", "baaa", 1, 4 },
    { "ba*?", "baaa", 1, 1 },
    { "ba+?", "baaa", 1, 2 },
    { "a{2}", "aaaa", 1, 2 },
    { "a{2,}", "aaaa", 1, 4 },
    { "a{1,3}b", "aaaab", 2, 5 },
    { "a{,3}", "a{,3}", 1, 5 },              -- not a valid repeat: literal braces
    { "x{2,3}?", "xxx", 1, 2 },
    { "colou?r", "color", 1, 5 },
    { "[abc]+", "xxcabz", 3, 5 },
    { "[^abc]+", "abcxyz", 4, 6 },
    { "[a-c]+", "zzbcaz", 3, 5 },
    { "[\\d.]+", "v4.16.55x", 2, 8 },
    { "[]a]+", "x]a]y", 2, 4 },
    { "[a-]+", "x-a-y", 2, 4 },
    { "\\d+\\.\\d+\\.\\d+", "status 5.7.26 x", 8, 13 },
    { "\\w+", "  hello_1 ", 3, 9 },
    { "\\W+", "ab, cd", 3, 4 },
    { "\\s+", "a \t b", 2, 4 },
    { "\\S+", "  ab  ", 3, 4 },
    { "\\D+", "12ab34", 3, 4 },
    { "\\bcat\\b", "concat cat", 8, 10 },
    { "\\Bcat", "concat cat", 4, 6 },
    { "a\\.b", "axb a.b", 5, 7 },
    { "\\(x\\)", "f(x)", 2, 4 },
    { "^5\\d\\d .*(user|mailbox) (unknown|not found)", "550 5.1.1 <a@b>: User unknown in table", 1, 29, { icase = true } },
    { "USER UNKNOWN", "user unknown", 1, 12, { icase = true } },
    { "[A-Z]+", "abc", 1, 3, { icase = true } },
    { "[A-Z]+", "abc", nil },
    { "(a|ab)(c|bcd)(d*)", "abcd", 1, 4 },   -- backtracking into an alternative
    { "(a*)*b", "aaab", 1, 4 },              -- a repeat whose body can be empty
    { "(a*)+$", "aaa", 1, 3 },
    { ".*spamhaus", "blocked using zen.spamhaus.org", 1, 26 },
    { "a.*b.*c", "a b c", 1, 5 },
    { "", "abc", 1, 0 },
    { "x?", "", 1, 0 },
  }
  for _, c in ipairs(cases) do
    it(string.format("find() %q in %q", c[1], c[2]), function()
      local re, err = regex.compile(c[1], c[5])
      assert.is_truthy(re, err)
      local s, e = re:find(c[2])
      assert.equal(c[3], s)
      assert.equal(c[4], e)
    end)
  end

  it("test() says whether it matches", function()
    local re = regex.compile("\\[TSS0\\d\\]")
    assert.is_true(re:test("421 4.7.0 [TSS04] Messages from x temporarily deferred"))
    assert.is_false(re:test("421 4.7.0 Messages temporarily deferred"))
  end)

  local errors = {
    { "(ab", "missing ) at position 4" },
    { "ab)", "unmatched ) at position 3" },
    { "*a", "nothing to repeat at position 1" },
    { "a|?", "nothing to repeat at position 3" },
    { "^*", "nothing to repeat at position 2" },
    { "[ab", "missing ] at position 4" },
    { "[b-a]", "range out of order at position 4" },
    { "ab\\", "trailing backslash at position 4" },
    { "(a)\\1", "backreferences are not supported at position 5" },
    { "(?=a)", "only (?:...) groups are supported at position 2" },
    { "\\q", "unknown escape \\q at position 2" },
    { "[[:alpha:]]", "POSIX classes like [:alpha:] are not supported (use \\w, \\d, \\s) at position 2" },
    { "a{3,2}", "bad repeat {n,m} at position 2" },
    { "a{2000}", "repeat count over 1000 at position 2" },
  }
  for _, c in ipairs(errors) do
    it(string.format("compile() %q -> nil, %q", c[1], c[2]), function()
      local re, err = regex.compile(c[1])
      assert.is_nil(re)
      assert.equal(c[2], err)
    end)
  end

  it("compile() of a non-string is nil, err", function()
    assert.same({ nil, "expected a string" }, { regex.compile(42) })
  end)

  it("find() stops a catastrophic pattern at its step budget", function()
    local re = regex.compile("(a|aa)+$", { budget = 20000 })
    local t0 = os.clock()
    local s, err = re:find(string.rep("a", 60) .. "b")
    assert.is_nil(s)
    assert.equal("too complex", err)
    assert.is_true(os.clock() - t0 < 1, "took " .. (os.clock() - t0) .. " s")
    -- and a plain search still works afterwards
    assert.equal(3, (re:find("xxaa")))
  end)

  it("find() runs single-character repeats over long subjects without deep recursion", function()
    local re = regex.compile("^x.*y$", { budget = 1e7 })
    local long = "x" .. string.rep("z", 200000) .. "y"
    assert.same({ 1, #long }, { re:find(long) })
  end)
end)
