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

  it("xtext_decode() decodes printable US-ASCII only", function()
    assert.equal("a+b c~", dsn.xtext_decode("a+2Bb+20c+7E"))
    assert.equal("a+0Db+7F+C3+A9+09", dsn.xtext_decode("a+0Db+7F+C3+A9+09"))
  end)
end)
