local maildir = require "moonpost.maildir"

describe("moonpost.maildir folder_name", function()
  local cases = {
    { "someone", "someone" },
    { "Some.One", "some.one" },
    { '"quoted name"', "quoted name" },
    { '"a\\"b"', 'a"b' },
    { '"../../etc"', "_._.._etc" },
    { ".hidden", "_hidden" },
    { '"a/b"', "a_b" },
    { '"x\\\\y"', "x_y" },
    { '""', "_" },
    { "üser", "üser" },
  }
  for _, c in ipairs(cases) do
    it(string.format("maps %s to %s", c[1], c[2]), function()
      assert.equal(c[2], maildir.folder_name(c[1]))
    end)
  end

  it("never returns a name with a slash or starting with a dot", function()
    for _, s in ipairs({ "..", ".", "/", '"/"', '"..\\/.."', string.rep("a", 300) }) do
      local n = maildir.folder_name(s)
      assert.falsy(n:find("/", 1, true))
      assert.are_not.equal(".", n:sub(1, 1))
      assert.is_true(#n <= 200)
    end
  end)

  it("deliver() checks its options", function()
    assert.has_error(function() maildir.deliver({}) end, nil)
    assert.has_error(function() maildir.deliver({ root = "/x", fsnyc = false }) end)
  end)
end)
