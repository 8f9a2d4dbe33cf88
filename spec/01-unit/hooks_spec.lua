local hooks = require "moonpost.runtime.hooks"

describe("moonpost.runtime.hooks bus", function()
  it("run() calls the chain in registration order; nil continues, a verdict ends it", function()
    local bus = hooks.new({ ev = true })
    local calls = {}
    bus:on("ev", function(x) calls[#calls + 1] = "a" .. x end)
    bus:on("ev", function(x)
      calls[#calls + 1] = "b" .. x
      if x == 2 then return hooks.reject(550, "5.1.1", "no") end
    end)
    bus:on("ev", function(x) calls[#calls + 1] = "c" .. x end)
    assert.is_nil(bus:run("ev", 1))
    local v = bus:run("ev", 2)
    assert.same({ "a1", "b1", "c1", "a2", "b2" }, calls)
    assert.equal("reject", v.kind)
    assert.equal(550, v.code)
  end)

  it("on() refuses unknown events and non-functions", function()
    local bus = hooks.new({ ev = true })
    assert.has_error(function() bus:on("nope", function() end) end, "on(): unknown event 'nope'")
    assert.has_error(function() bus:on("ev", "str") end)
    assert.has_error(function() bus:on(42, function() end) end)
  end)

  it("run() raises when a handler returns something that is not a verdict", function()
    local bus = hooks.new()
    bus:on("ev", function() return true end)
    local ok, err = pcall(bus.run, bus, "ev")
    assert.is_false(ok)
    assert.matches("returned true; return nil or a verdict", err)
    assert.matches("hooks_spec.lua:%d+", err)
  end)

  it("emit() runs every handler and logs errors instead of raising", function()
    local bus = hooks.new()
    local n = 0
    bus:on("ev", function() error("first fails") end)
    bus:on("ev", function() n = n + 1 end)
    bus:emit("ev")
    assert.equal(1, n)
  end)

  it("has() tells whether an event has handlers", function()
    local bus = hooks.new()
    assert.is_false(bus:has("ev"))
    bus:on("ev", function() end)
    assert.is_true(bus:has("ev"))
  end)
end)
