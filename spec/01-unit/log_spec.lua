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

-- log.buffered, as `moonpost run` uses it: the workers of `workers = N`
-- write to their supervisor's one stderr pipe, so each block must be one
-- atomic write of whole lines (CI once saw a worker's line cut in two).
describe("log.buffered", function()
  local H = require "helpers"
  it("keeps every line whole when two processes write blocks to one pipe", function()
    local dir = H.tmpdir("moonpost-log")
    local script = dir .. "/writer.lua"
    H.write(script, string.format([[
dofile(%q .. "/runtime/devpath.lua").install(%q)
local log = require "moonpost.runtime.log"
log.buffered(60)
local tag = arg[1]
for i = 1, 4000 do log.info("%%s %%d %%s.", tag, i, string.rep(tag, 20 + i %% 150)) end
log.flush()
]], H.root, H.root))
    local out
    H.run(function()
      local code, _, err = H.exec("/bin/sh", { "-c",
        "luajit " .. script .. " a & luajit " .. script .. " b & wait" })
      assert.equal(0, code, err)
      out = err
    end, 60)
    local seen, bad = { a = 0, b = 0 }, {}
    for line in out:gmatch("[^\n]*\n") do
      local tag, i, body = line:match("^%S+ info  (%a) (%d+) (%a+)%.\n$")
      if tag and body == string.rep(tag, 20 + tonumber(i) % 150) then
        seen[tag] = seen[tag] + 1
      elseif #bad < 3 then
        bad[#bad + 1] = line:sub(1, 120)
      end
    end
    assert.same({}, bad)
    assert.same({ a = 4000, b = 4000 }, seen)
    H.rm_rf(dir)
  end)
end)

-- A client's bytes in a text log line (an AUTH user name, a TLS server name)
-- must not start a line of their own: that would forge a record.
describe("log text lines", function()
  it("escape control characters, so one record is one line", function()
    local lines = {}
    local old = log.set_sink(function(line) lines[#lines + 1] = line end)
    log.info("AUTH failed for user %s client=[%s]", "x\n2030-01-01T00:00:00.000Z info  FORGED\r\0\127", "192.0.2.1")
    log.log("info", { user = "a\nb \"q\"" }, "with fields")
    log.info("a tab\tstays")
    log.info("user %q failed", "x\ny")
    log.set_sink(old)
    assert.equal(4, #lines)
    for _, l in ipairs(lines) do assert.equal(1, select(2, l:gsub("\n", ""))) end
    local function ends(s, suffix) assert.equal(suffix, s:sub(-#suffix)) end
    ends(lines[1], "user x\\n2030-01-01T00:00:00.000Z info  FORGED\\r\\0\\127 client=[192.0.2.1]\n")
    ends(lines[2], ' user="a\\nb \\"q\\""\n')
    ends(lines[3], "a tab\tstays\n")
    ends(lines[4], 'user "x\\ny" failed\n')
  end)
end)
