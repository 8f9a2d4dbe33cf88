-- runtime/shape.lua's gates, driven with made-up times: what a slow rule
-- does to a gate that has rates of its own.
local shape = require "moonpost.runtime.shape"
local uv = require "luv"

-- how many deliveries the gate admits at one a second for `secs` seconds
local function admitted(g, t0, secs)
  local n = 0
  for k = 0, secs - 1 do
    local t = t0 + k
    if g:may(t) then
      g:take(t)
      g.inflight = g.inflight - 1
      n = n + 1
    end
  end
  return n
end

describe("runtime/shape gates", function()
  it("a slow rule lowers a gate's rate, never raises it above the gate's own", function()
    local sh = shape.new({})
    local t0 = uv.now() / 1000
    -- 6 a minute: one every 10 s
    local g = sh:gate("ready:a", { rates = { { n = 6, per = 60 } } })
    sh:apply(g, { action = "slow", rate = { n = 1, per = 1 }, duration = 3600 }, { status = "deferred", code = 451 },
      "451 slow down")
    local n = admitted(g, t0, 30)
    assert.is_true(n <= 4, n .. " admitted in 30 s under a 6/m limit")
    assert.is_true(n >= 3)
    -- and a slow rate below the gate's own holds
    local h = sh:gate("ready:b", { rates = { { n = 10, per = 1 } } })
    sh:apply(h, { action = "slow", rate = { n = 1, per = 5 }, duration = 3600 }, { status = "deferred", code = 451 },
      "451 slow down")
    local m = admitted(h, t0, 30)
    assert.is_true(m <= 7 and m >= 5, m .. " admitted in 30 s at 1/5s")
  end)
end)
