-- log.utf8_clean: what the JSON log lines and the event log write for bytes
-- that are not well-formed UTF-8 (RFC 3629).
local log = require "moonpost.runtime.log"

describe("log.utf8_clean", function()
  local R = "\239\191\189" -- U+FFFD
  it("keeps ASCII and well-formed UTF-8 as they are", function()
    for _, s in ipairs({ "", "plain", "caf\195\169", "\226\130\172", "\240\159\152\128" }) do
      assert.equal(s, log.utf8_clean(s))
    end
  end)
  it("replaces stray, overlong, surrogate and out-of-range sequences byte by byte", function()
    assert.equal("a" .. R .. "b", log.utf8_clean("a\255b"))
    assert.equal(R .. R, log.utf8_clean("\192\175"))              -- overlong "/"
    assert.equal(R .. R .. R, log.utf8_clean("\237\160\128"))      -- a UTF-16 surrogate
    assert.equal(R .. R .. R .. R, log.utf8_clean("\244\144\128\128")) -- past U+10FFFF
    assert.equal("x" .. R .. R, log.utf8_clean("x\226\130"))       -- cut short
  end)
end)
