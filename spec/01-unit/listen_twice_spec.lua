-- The same address twice among the listeners (in one accept.smtp, in two,
-- or for SMTP and HTTP) passed `moonpost check`; `moonpost run` then failed
-- with EADDRINUSE at start, without the policy's line.
local moonpost = require "moonpost"
local accept = require "moonpost.accept"

describe("listeners on the same address", function()
  local function err_of(fn)
    local ok, err = pcall(fn)
    assert.is_false(ok)
    return err
  end

  it("are refused within one accept.smtp block", function()
    local err = err_of(function()
      local mta = moonpost.new { spool = false }
      mta:use(accept.smtp { listen = { "127.0.0.1:2999", "127.0.0.1:2999" } })
    end)
    assert.matches("listen_twice_spec.lua:%d+: accept.smtp: field 'listen': 127.0.0.1:2999", err)
  end)

  it("are refused across accept.smtp blocks, and between SMTP and HTTP", function()
    local err = err_of(function()
      local mta = moonpost.new { spool = false }
      mta:use(accept.smtp { listen = ":2999" })
      mta:use(accept.smtp { listen = "0.0.0.0:2999" })
    end)
    assert.matches("accept.smtp: field 'listen': 0.0.0.0:2999", err, nil, true)
    err = err_of(function()
      local mta = moonpost.new { spool = false, http = "127.0.0.1:2999" }
      mta:use(accept.smtp { listen = "127.0.0.1:2999" })
    end)
    assert.matches("accept.smtp: field 'listen': 127.0.0.1:2999", err, nil, true)
  end)

  it("port 0 (any free port) may be given more than once, and other addresses are fine", function()
    local mta = moonpost.new { spool = false, http = "127.0.0.1:0" }
    mta:use(accept.smtp { listen = { "127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:2999", "127.0.0.2:2999" } })
    mta:use(accept.smtp { listen = { "[::1]:2999" } })
  end)
end)
