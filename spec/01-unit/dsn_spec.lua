-- runtime/dsn.lua: what a DSN writes into its fields. ENVID and ORCPT come
-- from the sender; their xtext is decoded into header fields, so nothing
-- in them may start a field of its own.
local dsn = require "moonpost.runtime.dsn"

-- the lines of the message/delivery-status part
local function report_lines(text)
  local part = text:match("Content%-Type: message/delivery%-status\r\n\r\n(.-)\r\n\r\n%-%-")
  local out = {}
  for line in (part .. "\r\n"):gmatch("(.-)\r\n") do out[#out + 1] = line end
  return out
end

local function build(envid, orcpt)
  return dsn.build({ hostname = "mta.test", action = "failed",
    env = { from = "s@x.test", envid = envid, t = 0 },
    body = "Subject: hi\r\n\r\nhello\r\n",
    recipients = { { address = "r@y.test", orcpt = orcpt, code = 550, enhanced = "5.1.1", text = "no" } } })
end

describe("moonpost.runtime.dsn", function()
  it("build() decodes the xtext of ENVID and ORCPT", function()
    local lines = report_lines(build("QQ+2B314159+20x", "rfc822;bob+2Bx@example.org"))
    assert.equal("Original-Envelope-Id: QQ+314159 x", lines[2])
    assert.equal("Original-Recipient: rfc822;bob+x@example.org", lines[5])
  end)

  it("build() never writes a control character into a field: +0D+0A stays xtext, a raw one becomes ?", function()
    -- as a message stored before the SMTP server refused such values would have them
    local text = build("x+0D+0AX-Injected:+20yes", "rfc822;a+0D+0AAction:+20delivered")
    assert.falsy(text:find("\r\nX-Injected:", 1, true))
    local lines = report_lines(text)
    assert.equal("Original-Envelope-Id: x+0D+0AX-Injected: yes", lines[2])
    assert.equal("Original-Recipient: rfc822;a+0D+0AAction: delivered", lines[5])
    local actions = 0
    for _, l in ipairs(lines) do
      if l:match("^Action:") then actions = actions + 1 end
    end
    assert.equal(1, actions)
    lines = report_lines(build("raw\r\nX-Injected: yes", "rfc\n822;a@b.c"))
    assert.equal("Original-Envelope-Id: raw??X-Injected: yes", lines[2])
    assert.equal("Original-Recipient: rfc?822;a@b.c", lines[5])
  end)

  -- RFC 6533
  local function global_build(env, rcpt)
    return dsn.build({ hostname = "mta.test", action = "failed", env = env,
      body = "Subject: caf\195\169\r\n\r\nhello\r\n", recipients = { rcpt } })
  end

  local function part_types(text)
    local out = {}
    for t in text:gmatch("\r\nContent%-Type: ([%w/%-]+)") do out[#out + 1] = t end
    return out
  end

  it("build() makes an SMTPUTF8 message's DSN an internationalized one: global types, utf-8 addresses", function()
    local text = global_build({ from = "s@x.test", utf8 = true, t = 0 },
      { address = "j\195\182ran@y.test", orcpt = "utf-8;j\\x{F6}ran@y.test", code = 550, enhanced = "5.1.1", text = "no" })
    assert.same({ "multipart/report", "text/plain", "message/global-delivery-status", "message/global" },
      part_types(text))
    assert.truthy(text:find("report-type=delivery-status;", 1, true))
    assert.truthy(text:find("Content-Type: text/plain; charset=utf-8\r\n", 1, true))
    local st = text:match("Content%-Type: message/global%-delivery%-status\r\n\r\n(.-)\r\n\r\n%-%-")
    assert.truthy(st:find("\r\nOriginal-Recipient: utf-8;j\195\182ran@y.test\r\n", 1, true), st)
    assert.truthy(st:find("\r\nFinal-Recipient: utf-8; j\195\182ran@y.test\r\n", 1, true), st)
    -- the returned header section alone: message/global-headers
    text = dsn.build({ hostname = "mta.test", action = "failed", env = { from = "s@x.test", utf8 = true, ret = "HDRS" },
      body = "Subject: x\r\n\r\nhello\r\n", recipients = { { address = "r@y.test" } } })
    assert.same({ "multipart/report", "text/plain", "message/global-delivery-status", "message/global-headers" },
      part_types(text))
    -- an ASCII address keeps its rfc822 type
    assert.truthy(text:find("\r\nFinal-Recipient: rfc822; r@y.test\r\n", 1, true))
  end)

  it("build() writes a UTF-8 recipient as utf-8 even without SMTPUTF8, and keeps ASCII DSNs as they were", function()
    local text = global_build({ from = "s@x.test", t = 0 }, { address = "j\195\182ran@y.test" })
    assert.same({ "multipart/report", "text/plain", "message/global-delivery-status", "message/global" },
      part_types(text))
    -- plain ASCII: RFC 3464 types; a utf-8 ORCPT stays encoded (ASCII) there
    text = global_build({ from = "s@x.test", t = 0 }, { address = "r@y.test", orcpt = "utf-8;j\\x{F6}ran@y.test" })
    assert.same({ "multipart/report", "text/plain", "message/delivery-status", "message/rfc822" }, part_types(text))
    local lines = report_lines(text)
    assert.equal("Original-Recipient: utf-8;j\\x{F6}ran@y.test", lines[4])
  end)

  it("build() decodes only printable characters of a utf-8 ORCPT: \\x{0A} stays as written", function()
    local text = global_build({ from = "s@x.test", utf8 = true, t = 0 },
      { address = "r@y.test", orcpt = "utf-8;a\\x{0D}\\x{0A}Action:\\x{20}delivered@y.test" })
    assert.truthy(text:find("Original-Recipient: utf-8;a\\x{0D}\\x{0A}Action: delivered@y.test\r\n", 1, true))
    assert.falsy(text:find("\nAction: delivered", 1, true))
  end)

  it("xtext_decode() decodes printable US-ASCII only", function()
    assert.equal("a+b c~", dsn.xtext_decode("a+2Bb+20c+7E"))
    assert.equal("a+0Db+7F+C3+A9+09", dsn.xtext_decode("a+0Db+7F+C3+A9+09"))
  end)
end)
