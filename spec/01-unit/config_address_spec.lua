-- Addresses are checked with the options (docs/accept.md#addresses,
-- docs/route.md): an IPv6 address that is not one, or an IPv4 address that
-- the system's parser refuses, passed `moonpost check` and failed only at
-- bind time (a listener: "Invalid IP address or port") or at every delivery
-- attempt (a relay or route).
local config = require "moonpost.runtime.config"

describe("config.parse_address", function()
  it("takes valid IPv6 and IPv4 addresses", function()
    assert.same({ "::1", 25 }, { config.parse_address("[::1]:25") })
    assert.same({ "::", 25 }, { config.parse_address("[::]:25") })
    assert.same({ "2001:db8::7", 587 }, { config.parse_address("[2001:db8::7]:587") })
    assert.same({ "::ffff:192.0.2.1", 25 }, { config.parse_address("[::ffff:192.0.2.1]:25") })
    assert.same({ "1:2:3:4:5:6:7:8", 25 }, { config.parse_address("[1:2:3:4:5:6:7:8]:25") })
    assert.same({ "0.0.0.0", 25 }, { config.parse_address("0.0.0.0:25") })
    assert.same({ "10.0.0.1", 25 }, { config.parse_address("10.0.0.1:25") })
  end)

  it("refuses an IPv6 address that is not one", function()
    for _, s in ipairs({ "[::1::2]:25", "[:::::]:25", "[12345::1]:25", "[1:2:3:4:5:6:7:8:9]:25", "[1:2:3]:25",
      "[::ffff:1.2.3.999]:25" }) do
      local host, why = config.parse_address(s)
      assert.is_nil(host, s)
      assert.matches("address", why, nil, true)
    end
  end)

  it("refuses an IPv4 part with a leading zero, as inet_pton does", function()
    assert.is_nil(config.parse_address("01.2.3.4:25"))
    assert.is_nil(config.parse_address("1.2.3.004:25"))
  end)

  it("accept.smtp and route.smtp refuse them at the policy's line", function()
    local ok, err = pcall(require("moonpost.accept").smtp, { listen = "[::1::2]:2525" })
    assert.is_false(ok)
    assert.matches("accept.smtp: field 'listen' item 1: ", err, nil, true)
    ok, err = pcall(require("moonpost.route").smtp, { relay = { "192.0.2.1:25", "[2001:db8::1::2]:25" } })
    assert.is_false(ok)
    assert.matches("route.smtp: field 'relay' item 2: ", err, nil, true)
  end)

  it("route.smtp refuses a next hop on port 0 (any port, to a listener)", function()
    local ok, err = pcall(require("moonpost.route").smtp, { relay = "192.0.2.1:0" })
    assert.is_false(ok)
    assert.matches("route.smtp: field 'relay' item 1: port 0 in \"192.0.2.1:0\"", err, nil, true)
    ok, err = pcall(require("moonpost.route").smtp, { routes = { ["example.org"] = "[2001:db8::1]:0" } })
    assert.is_false(ok)
    assert.matches("port 0", err, nil, true)
  end)
end)
