local smtp = require "moonpost.core.smtp"

describe("moonpost.core.smtp parse_path", function()
  local good = {
    -- arg, kind, address, domain
    { "FROM:<user@example.com>", "mail", "user@example.com", "example.com" },
    { "from:<User.Name+tag@sub.example.co.uk>", "mail", "User.Name+tag@sub.example.co.uk", "sub.example.co.uk" },
    { "FROM: <spaces@after.colon>", "mail", "spaces@after.colon", "after.colon" },
    { "FROM:bare@no.brackets", "mail", "bare@no.brackets", "no.brackets" },
    { "FROM:<>", "mail", "", "" },
    { 'TO:<"quoted local"@example.com>', "rcpt", '"quoted local"@example.com', "example.com" },
    { 'TO:<"a\\"b\\\\c"@example.com>', "rcpt", '"a\\"b\\\\c"@example.com', "example.com" },
    { "TO:<a@[192.0.2.1]>", "rcpt", "a@[192.0.2.1]", "[192.0.2.1]" },
    { "TO:<a@[IPv6:2001:db8::1]>", "rcpt", "a@[IPv6:2001:db8::1]", "[IPv6:2001:db8::1]" },
    { "TO:<@relay.one,@relay.two:user@final.example>", "rcpt", "user@final.example", "final.example" },
    { "TO:<Postmaster>", "rcpt", "Postmaster", "" },
    { "TO:<!#$%&'*+-/=?^_`{|}~@x-y.example>", "rcpt", "!#$%&'*+-/=?^_`{|}~@x-y.example", "x-y.example" },
    { "TO:<δοκιμή@παράδειγμα.δοκιμή>", "rcpt", "δοκιμή@παράδειγμα.δοκιμή", "παράδειγμα.δοκιμή" },
    { "TO:<用户@例子.广告>", "rcpt", "用户@例子.广告", "例子.广告" },
    { "TO:<a@123.example>", "rcpt", "a@123.example", "123.example" },
  }
  for _, c in ipairs(good) do
    it("accepts " .. c[1], function()
      local p, code, enh, text = smtp.parse_path(c[1], c[2])
      assert.is_table(p, tostring(code) .. " " .. tostring(enh) .. " " .. tostring(text))
      assert.equal(c[3], p.address)
      assert.equal(c[4], p.domain)
    end)
  end

  it("marks null path, postmaster, literal, route and UTF-8", function()
    assert.is_true(smtp.parse_path("FROM:<>", "mail").null)
    assert.is_true(smtp.parse_path("TO:<postmaster>", "rcpt").postmaster)
    assert.is_true(smtp.parse_path("TO:<a@[10.0.0.1]>", "rcpt").literal)
    assert.is_true(smtp.parse_path("TO:<@r.x:a@b.c>", "rcpt").route)
    assert.is_true(smtp.parse_path("TO:<ü@b.c>", "rcpt").utf8)
    assert.is_nil(smtp.parse_path("TO:<u@b.c>", "rcpt").utf8)
    assert.equal("a", smtp.parse_path("TO:<a@b.c>", "rcpt")["local"])
  end)

  local bad = {
    -- arg, kind, code, enhanced
    { "<a@b.c>", "mail", 501, "5.5.2" },
    { "TO:<a@b.c>", "mail", 501, "5.5.2" },
    { "FROM:<a@b.c", "mail", 553, "5.1.7" },
    { "FROM:<a..b@c.d>", "mail", 553, "5.1.7" },
    { "FROM:<.a@c.d>", "mail", 553, "5.1.7" },
    { "FROM:<a.@c.d>", "mail", 553, "5.1.7" },
    { "FROM:<a b@c.d>", "mail", 553, "5.1.7" },
    { "TO:<>", "rcpt", 553, "5.1.3" },
    { "TO:<user>", "rcpt", 553, "5.1.3" },
    { "TO:<a@-b.c>", "rcpt", 553, "5.1.3" },
    { "TO:<a@b-.c>", "rcpt", 553, "5.1.3" },
    { "TO:<a@b..c>", "rcpt", 553, "5.1.3" },
    { "TO:<a@b.c.>", "rcpt", 553, "5.1.3" },
    { "TO:<a@b_c.d>", "rcpt", 553, "5.1.3" },
    { "TO:<a@[300.1.1.1]>", "rcpt", 553, "5.1.3" },
    { "TO:<a@[1.2.3]>", "rcpt", 553, "5.1.3" },
    { "TO:<a@[IPv6:zz::1]>", "rcpt", 553, "5.1.3" },
    { 'TO:<"unterminated@b.c>', "rcpt", 553, "5.1.3" },
    { "TO:<a@b.c>junk", "rcpt", 553, "5.1.3" },
    { "TO:<\xff@b.c>", "rcpt", 553, "5.1.3" },
    { "TO:<\xc3\x28@b.c>", "rcpt", 553, "5.1.3" },
    { "TO:<\xed\xa0\x80@b.c>", "rcpt", 553, "5.1.3" },      -- UTF-16 surrogate
    { "TO:<\xc0\xaf@b.c>", "rcpt", 553, "5.1.3" },          -- overlong
    { "TO:<a@" .. string.rep("a", 64) .. ".c>", "rcpt", 553, "5.1.3" }, -- label > 63
    { "TO:<" .. string.rep("a", 250) .. "@bc.de>", "rcpt", 553, "5.1.3" }, -- path > 256
    { "TO:<a@b.c> =x", "rcpt", 501, "5.5.4" },
    { "TO:<a@b.c> NOTIFY=", "rcpt", 501, "5.5.4" },
    { "TO:<a@b.c> A=b=c", "rcpt", 501, "5.5.4" },
    { "TO:<a@b.c> NOTIFY=NEVER notify=SUCCESS", "rcpt", 501, "5.5.4" },
  }
  for _, c in ipairs(bad) do
    it(string.format("rejects %q with %d %s", c[1], c[3], c[4]), function()
      local p, code, enh, text = smtp.parse_path(c[1], c[2])
      assert.is_nil(p)
      assert.equal(c[3], code)
      assert.equal(c[4], enh)
      assert.is_string(text)
    end)
  end

  it("returns parameters with upper-cased keys; flags are true", function()
    local p = smtp.parse_path("FROM:<a@b.c> size=1000 Body=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ+2Bx", "mail")
    assert.same({ SIZE = "1000", BODY = "8BITMIME", SMTPUTF8 = true, RET = "HDRS", ENVID = "QQ+2Bx" },
      p.params)
  end)

  it("raises on a bad kind", function()
    assert.has_error(function() smtp.parse_path("FROM:<>", "expn") end)
  end)
end)

describe("moonpost.core.smtp check_param", function()
  local cases = {
    { "SIZE", "12345", true }, { "SIZE", "12a", false }, { "SIZE", true, false },
    { "SIZE", string.rep("9", 21), false },
    { "BODY", "7BIT", true }, { "BODY", "8bitmime", true }, { "BODY", "9BIT", false },
    { "SMTPUTF8", true, true }, { "SMTPUTF8", "x", false },
    { "RET", "FULL", true }, { "RET", "hdrs", true }, { "RET", "ALL", false },
    { "ENVID", "abc+2B", true }, { "ENVID", "a+2b", false }, { "ENVID", string.rep("x", 101), false },
    { "NOTIFY", "NEVER", true }, { "NOTIFY", "SUCCESS,FAILURE,DELAY", true },
    { "NOTIFY", "NEVER,SUCCESS", false }, { "NOTIFY", "SUCCESS,SUCCESS", false },
    { "NOTIFY", "sometimes", false },
    { "ORCPT", "rfc822;a+40b.c", true }, { "ORCPT", "rfc822", false }, { "ORCPT", ";a@b", false },
    { "ORCPT", "utf-8;\xc3\xbc@b.c", true }, { "ORCPT", "rfc822;a+4", false },
    -- RFC 3461 4.2, 4.4: printable US-ASCII once decoded; a line break would
    -- end the DSN field that quotes the value and start another
    { "ENVID", "x+0D+0AX-Injected:+20yes", false }, { "ENVID", "x+00", false }, { "ENVID", "x+1F", false },
    { "ENVID", "x+7F", false }, { "ENVID", "x+09y", false }, { "ENVID", "a+20b+7E+3D", true },
    { "ORCPT", "rfc822;a+0D+0AAction:+20delivered", false }, { "ORCPT", "rfc822;a+0A@b.c", false },
    { "ORCPT", "rfc822;a+7F@b.c", false }, { "ORCPT", "rfc822;a+20b+2B@c.d", true },
    -- RFC 6533 \x{HEXPOINT}: 2 to 6 hex digits of a printable Unicode scalar value
    { "ORCPT", "utf-8;j\\x{F6}@b.c", true }, { "ORCPT", "utf-8;\\x{1F600}@b.c", true },
    { "ORCPT", "utf-8;j\\x{f6}@b.c", true }, { "ORCPT", "utf-8;a\\x{zz}@b", false },
    { "ORCPT", "utf-8;a\\x{}@b", false }, { "ORCPT", "utf-8;a\\x{F6@b", false }, { "ORCPT", "utf-8;a\\xF6@b", false },
    { "ORCPT", "utf-8;a\\x{0A}@b", false }, { "ORCPT", "utf-8;a\\x{9B}@b", false },
    { "ORCPT", "utf-8;a\\x{D800}@b", false }, { "ORCPT", "utf-8;a\\x{110000}@b", false },
    { "ORCPT", "utf-8;a\\x{0000041}@b", false }, { "ORCPT", "utf-8;a\\", false },
    { "AUTH", "<>", true }, { "AUTH", "user+40example.com", true },
    { "XUNKNOWN", "anything", true },
  }
  for _, c in ipairs(cases) do
    it(string.format("%s=%s is %s", c[1], tostring(c[2]), c[3] and "valid" or "invalid"), function()
      local ok, why = smtp.check_param(c[1], c[2])
      if c[3] then
        assert.is_true(ok, why)
      else
        assert.is_nil(ok)
        assert.is_string(why)
      end
    end)
  end
end)

describe("moonpost.core.smtp reply_parser", function()
  it("parses single and multi-line replies with enhanced codes", function()
    local r = smtp.reply_parser()
    r:push("220 mx.example ESMTP\r\n250-mx.example\r\n250-SIZE 1000\r\n250 PIPELINING\r\n")
    assert.same({ 220, false, "mx.example ESMTP", 1 }, { r:next() })
    assert.same({ 250, false, "mx.example\nSIZE 1000\nPIPELINING", 3 }, { r:next() })
    assert.same({}, { r:next() })
    r:push("550-5.1.1 The email account that you tried to reach does not exist.\r\n"
      .. "550 5.1.1 Please try double-checking.\r\n")
    assert.same({ 550, "5.1.1", "The email account that you tried to reach does not exist.\n"
      .. "Please try double-checking.", 2 }, { r:next() })
    r:close()
  end)

  it("handles a reply split at every byte", function()
    local input = "451-4.7.1 Greylisted\r\n451 4.7.1 try later\r\n250 2.0.0 ok\r\n"
    for size = 1, #input do
      local r = smtp.reply_parser()
      local got = {}
      for i = 1, #input, size do
        r:push(input:sub(i, i + size - 1))
        while true do
          local c, e, t = r:next()
          if not c then break end
          got[#got + 1] = { c, e, t }
        end
      end
      assert.same({ { 451, "4.7.1", "Greylisted\ntry later" }, { 250, "2.0.0", "ok" } }, got)
      r:close()
    end
  end)

  it("ignores an enhanced code whose class differs from the reply's", function()
    local r = smtp.reply_parser()
    r:push("250 5.1.1 odd\r\n421\r\n")
    assert.same({ 250, false, "5.1.1 odd", 1 }, { r:next() })
    assert.same({ 421, false, "", 1 }, { r:next() })
  end)

  local malformed = {
    "abc\r\n", "25\r\n", "650 x\r\n", "250x\r\n", "250-a\r\n251 b\r\n", "199 x\r\n",
  }
  for _, m in ipairs(malformed) do
    it(string.format("reports a protocol error for %q", m), function()
      local r = smtp.reply_parser()
      r:push(m)
      local c, err = r:next()
      if c == nil and err == nil then c, err = r:next() end
      assert.is_nil(c)
      assert.matches("^protocol: ", err)
    end)
  end

  it("reports an over-long reply line", function()
    local r = smtp.reply_parser()
    r:push("250 " .. string.rep("x", 5000))
    local c, err = r:next()
    assert.is_nil(c)
    assert.equal("protocol: reply line too long", err)
  end)
end)

describe("moonpost.core.smtp dotstuff", function()
  it("doubles leading dots, normalises line ends and terminates", function()
    assert.equal("..a\r\nb\r\n..\r\n.\r\n", smtp.dotstuff(".a\r\nb\n."))
    assert.equal("x\r\ny\r\n.\r\n", smtp.dotstuff("x\ry\r\n"))
    assert.equal(".\r\n", smtp.dotstuff(""))
  end)

  it("round-trips through the DATA parser", function()
    local samples = { "a\r\n.b\r\n..\r\n.\r\nend\r\n", ".\r\n", "no newline at end", "\r\n\r\n" }
    for _, s in ipairs(samples) do
      local p = smtp.parser()
      p:push("DATA\r\n")
      p:next()
      p:begin_data()
      p:push(smtp.dotstuff(s))
      assert.equal("data", (p:next()))
      local m = p:take()
      local expect = s:gsub("\r?\n", "\r\n")
      if expect:sub(-2) ~= "\r\n" and expect ~= "" then expect = expect .. "\r\n" end
      assert.equal(expect, m:tostring())
      p:close()
    end
  end)
end)

describe("moonpost.core.smtp has_8bit", function()
  it("finds an octet above 127 anywhere, in a string or a message", function()
    assert.is_false(smtp.has_8bit(""))
    assert.is_false(smtp.has_8bit(string.rep("plain ascii ", 100)))
    for pos = 1, 20 do
      local s = string.rep("a", pos - 1) .. "\200" .. string.rep("b", 20 - pos)
      assert.is_true(smtp.has_8bit(s), "at " .. pos)
    end
    assert.is_true(smtp.has_8bit(smtp.message("caf\195\169")))
    assert.has_error(function() smtp.has_8bit(42) end)
  end)
end)

describe("moonpost.core.smtp has_ctl", function()
  it("finds a control character other than tab, or DEL, anywhere in a string", function()
    assert.is_false(smtp.has_ctl(""))
    assert.is_false(smtp.has_ctl("a tab\tstays, and so does caf\195\169 and \255"))
    for c = 0, 255 do
      local ctl = (c < 32 and c ~= 9) or c == 127
      for _, s in ipairs { string.char(c), "ab" .. string.char(c), string.char(c) .. "cd", "x" .. string.char(c) .. "y" } do
        assert.equal(ctl, smtp.has_ctl(s), "octet " .. c .. " in " .. string.format("%q", s))
      end
    end
    assert.has_error(function() smtp.has_ctl(nil) end)
  end)
end)

describe("moonpost.core.smtp utf8_valid / xtext_valid", function()
  it("checks UTF-8 and xtext", function()
    assert.is_true(smtp.utf8_valid("héllo ✓ 𝄞"))
    assert.is_false(smtp.utf8_valid("\xc3"))
    assert.is_false(smtp.utf8_valid("\xf4\x90\x80\x80"))
    assert.is_true(smtp.xtext_valid("a+2Bb"))
    assert.is_false(smtp.xtext_valid("a b"))
    assert.is_false(smtp.xtext_valid("a+"))
    assert.is_false(smtp.xtext_valid("a=b"))
  end)
end)
