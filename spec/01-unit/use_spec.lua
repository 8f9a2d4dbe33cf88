-- mta:use(block): a block has `on`, `attach` or both (docs/api.md#mtauseblock).
-- A module given in place of a block (mta:use(require("moonpost.accept")),
-- the constructor call forgotten) was taken without a word, and served
-- nothing; a malformed `on` or `attach` failed inside modules/init.lua with
-- a Lua error that named neither the policy's line nor the field.
local moonpost = require "moonpost"

describe("mta:use()", function()
  local function err_of(block)
    local mta = moonpost.new { spool = false }
    local ok, err = pcall(function()
      mta:use(block) -- this line
    end)
    assert.is_false(ok)
    local line = debug.getinfo(1, "l").currentline - 3
    assert.matches("use_spec.lua:" .. line .. ": use(): ", err, nil, true)
    return err
  end

  it("refuses a table that is neither: a module in place of its block", function()
    local err = err_of(require("moonpost.accept"))
    assert.matches("'on'", err, nil, true)
    assert.matches("'attach'", err, nil, true)
  end)

  it("refuses an 'on' that is not a table, and a handler that is not a function", function()
    assert.matches("field 'on'", err_of({ on = 5 }), nil, true)
    assert.matches("field 'on.smtp_server_rcpt_to'", err_of({ on = { smtp_server_rcpt_to = 5 } }), nil, true)
    assert.matches("field 'on.smtp_server_rcpt_to' item 2",
      err_of({ on = { smtp_server_rcpt_to = { function() end, "x" } } }), nil, true)
  end)

  it("refuses an 'attach' that is not a function", function()
    assert.matches("field 'attach'", err_of({ attach = 5 }), nil, true)
  end)

  it("takes the blocks it documents", function()
    local mta = moonpost.new { spool = false }
    mta:use({ on = { smtp_server_rcpt_to = function() end } })
    mta:use({ on = { smtp_server_rcpt_to = { function() end, function() end } } })
    mta:use({ attach = function() end })
  end)
end)
