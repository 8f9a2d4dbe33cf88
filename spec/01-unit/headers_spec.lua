-- runtime/headers.lua find(): the fields of one name in a header section,
-- unfolded and trimmed, with the octets each spans (for msg:remove).
local headers = require "moonpost.runtime.headers"

describe("moonpost.runtime.headers find", function()
  local head = "Received: from a\r\n\tby b; x-tenant: not a field\r\n"
    .. "X-Tenant:  acme \r\n"
    .. "X-Tenant-Id: 7\r\n"
    .. "x-TENANT :globex\r\n folded on\r\n\tand on\r\n"
    .. "X-Tenant:\r\n"
    .. "Subject: s\r\n\r\nX-Tenant: body, not header\r\n"

  it("finds every field of the name, in order, whatever its case, and no other", function()
    local f = headers.find(head, "x-tenant")
    assert.equal(3, #f)
    assert.same({ "acme", "globex folded on\tand on", "" }, { f[1].value, f[2].value, f[3].value })
  end)

  it("gives the octets of each field with its continuation lines and line ends", function()
    local f = headers.find(head, "x-tenant")
    assert.equal("X-Tenant:  acme \r\n", head:sub(f[1].first, f[1].last))
    assert.equal("x-TENANT :globex\r\n folded on\r\n\tand on\r\n", head:sub(f[2].first, f[2].last))
    assert.equal("X-Tenant:\r\n", head:sub(f[3].first, f[3].last))
  end)

  it("finds nothing for a name only in a continuation line, a longer name, or the body", function()
    assert.same({}, headers.find(head, "by b; x-tenant"))
    assert.equal(1, #headers.find(head, "x-tenant-id"))
    assert.same({}, headers.find(head, "x-tenan"))
    assert.same({}, headers.find("Subject: s\r\n\r\nFrom: a@b\r\n", "from"))
    assert.same({}, headers.find("", "from"))
    assert.equal("x", headers.find("From: x", "from")[1].value) -- no final line end
  end)

  -- A sender writes a field of many short continuation lines: unfolding
  -- it must cost in proportion to its size. Appending line by line made a
  -- new copy of the value so far per line: here some 100 MB allocated for
  -- a 40 kB field (and minutes of one core at a few MB). Counted with the
  -- collector stopped, so what is allocated is what is counted.
  it("unfolds a field of many continuation lines in one pass", function()
    local n = 10000
    local field = "From: a@b.example\r\n" .. (" x\r\n"):rep(n)
    local big = "Subject: s\r\n" .. field .. "To: c@d.example\r\n\r\n"
    collectgarbage("collect")
    collectgarbage("stop")
    local before = collectgarbage("count")
    local f = headers.find(big, "from")
    local used = (collectgarbage("count") - before) * 1024
    collectgarbage("restart")
    assert.equal(1, #f)
    assert.equal("a@b.example" .. (" x"):rep(n), f[1].value)
    assert.equal(field, big:sub(f[1].first, f[1].last))
    assert.is_true(used < 20 * #big, ("%d octets allocated for a header of %d"):format(used, #big))
  end)
end)

describe("moonpost.runtime.headers tokens", function()
  it("splits a structured value into atoms, quoted strings, literals and specials, without comments", function()
    assert.same({ "q", 'MX "1"', "w", "mx", ".", false, "w", "test", ";", false, "l", "[1.2.3.4]" },
      headers.tokens(' (a (nested) comment) "MX \\"1\\"" mx.test (c); [1.2.3.4]'))
    -- an unclosed quote or comment runs to the end
    assert.same({ "q", "open" }, headers.tokens('"open'))
    assert.same({ "w", "a" }, headers.tokens("a (open"))
  end)
end)
