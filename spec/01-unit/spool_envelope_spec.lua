-- The spool's envelope encoder (runtime/spool.lua encode_envelope): the two
-- integers by hand, the rest by lua-cjson. Whatever it writes, lua-cjson
-- must read back as the same table.
local spool = require "moonpost.runtime.spool"
local cjson = require "cjson"

local function roundtrip(e)
  local s = spool.encode_envelope(e)
  assert.same(e, cjson.decode(s))
  return s
end

describe("spool envelope encoding", function()
  it("writes a plain envelope that lua-cjson reads back as it was", function()
    local s = roundtrip { v = 1, from = "a@b.test", rcpt = { { a = "c@d.test" } }, t = 1764547200 }
    assert.matches('"t":1764547200', s, nil, true)
    -- integers are written whole: lua-cjson's %.14g would round this one
    roundtrip { v = 1, from = "a@b.test", rcpt = {}, t = 4503599627370497 }
    roundtrip { v = 1, t = 2 }
  end)

  it("keeps every field: DSN parameters, tenant, pool, RET, ENVID, BODY, SMTPUTF8, client, the DSN mark", function()
    roundtrip {
      v = 1, from = "", t = 0,
      rcpt = { { a = "x@y.test", n = "SUCCESS,FAILURE", o = "rfc822;x@y.test" }, { a = "z@y.test" },
        { a = "w@y.test", o = "utf-8;w\\x2Bv@y.test" } },
      tenant = "acme", pool = "warm", ret = "HDRS", envid = "QQ314159", body = "8BITMIME", utf8 = true,
      ip = "2001:db8::1", helo = "[192.0.2.1]", dsn = true,
    }
  end)

  it("escapes quotes, backslashes, control characters and NUL; passes UTF-8 through", function()
    local odd = { '"quoted local"@x.test', "back\\slash@x.test", "tab\there@x.test", "nul\0@x.test",
      "del\127@x.test", "jos\195\169@b\195\188cher.test", "\1\31@x.test" }
    for _, a in ipairs(odd) do
      roundtrip { v = 1, from = a, rcpt = { { a = a, n = a, o = a } }, t = 5, helo = a, envid = a }
    end
  end)

  it("leaves a fractional time, a table field and an unknown field to lua-cjson", function()
    assert.equal(cjson.encode { v = 1, t = 1.5, from = "a@b.test" }, spool.encode_envelope { v = 1, t = 1.5, from = "a@b.test" })
    roundtrip { v = 1, from = "a@b.test", rcpt = {}, t = 1.5 }
    roundtrip { v = 1, from = "a@b.test", rcpt = { { a = "c@d.test" } }, t = 1, pool = { name = "p" } }
    roundtrip { v = 1, from = "a@b.test", rcpt = { { a = "c@d.test" } }, t = 1, extra = "kept" }
  end)

  it("leaves the table as it was", function()
    local e = { v = 1, from = "a@b.test", rcpt = { { a = "c@d.test" } }, t = 7 }
    spool.encode_envelope(e)
    assert.same({ v = 1, from = "a@b.test", rcpt = { { a = "c@d.test" } }, t = 7 }, e)
  end)
end)
