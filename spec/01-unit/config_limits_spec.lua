-- Whole numbers in options (sizes, counts, lengths) must be exact: above
-- 2^53 a Lua number is not, and the C parser refuses such a limit when a
-- connection comes in, which made every session of the listener fail with a
-- traceback in the log while `moonpost check` had said ok.
local config = require "moonpost.runtime.config"

describe("config: numbers above 2^53", function()
  local SCHEMA = {
    size = { type = "size" },
    count = { type = "posint" },
    zero_ok = { type = "nonneg" },
  }

  local function err_of(opts)
    local ok, err = pcall(config.check, "blk", opts, SCHEMA)
    assert.is_false(ok)
    return err
  end

  it("size() refuses a size that is not an exact whole number", function()
    assert.equal(2 ^ 53, config.size(2 ^ 53))
    assert.is_nil(config.size(2 ^ 53 + 2))
    assert.is_nil(config.size(1e300))
    assert.is_nil(config.size("10000000G"))
  end)

  it("check() refuses them, naming the field", function()
    assert.matches("blk: field 'size': ", err_of({ size = 1e300 }), nil, true)
    assert.matches("blk: field 'size': ", err_of({ size = "9999999999G" }), nil, true)
    assert.matches("blk: field 'count': ", err_of({ count = 2 ^ 60 }), nil, true)
    assert.matches("blk: field 'zero_ok': ", err_of({ zero_ok = 1e300 }), nil, true)
  end)

  it("accept.smtp refuses a max_message_size, max_line_length or max_command_length the listener cannot use",
    function()
      local accept = require "moonpost.accept"
      for _, o in ipairs({ { max_message_size = 1e300 }, { max_message_size = "10000000G" },
        { max_line_length = 1e300 }, { max_command_length = 2 ^ 60 } }) do
        local field = next(o)
        local ok, err = pcall(accept.smtp, o)
        assert.is_false(ok, field)
        assert.matches("accept.smtp: field '" .. field .. "': ", err, nil, true)
      end
    end)
end)
