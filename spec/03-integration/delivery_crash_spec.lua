-- Nothing acknowledged is lost across delivery: sessions inject messages
-- into a relaying server that is SIGKILLed at random moments while it
-- delivers to the sink; after the last restart every acknowledged message
-- reaches the sink at least once. Duplicates (deliveries in flight at a
-- kill) are counted and reported.
local H = require "helpers"

local TOTAL = tonumber(os.getenv("CRASH_RELAY_MESSAGES") or "") or 5000

describe("delivery under SIGKILL", function()
  it("delivers every acknowledged message at least once through kills while delivering", function()
    local dir = H.tmpdir("moonpost-relaycrash")
    H.run(function()
      local sink = H.sink()
      local env = { MOONPOST_SPOOL = dir .. "/spool", MOONPOST_RELAY = "127.0.0.1:" .. sink.port }
      local policy = H.root .. "/spec/fixtures/policies/crash_relay.lua"
      local port = H.free_port()
      local srv = H.launch(policy, env, { port = port })
      local inj = H.inject({ port = port, sessions = 30, total = TOTAL,
        rcpt = function(_, tok) return tok .. "@dest.test" end })
      math.randomseed(os.time())
      local kills = 0
      for _ = 1, 5 do
        require("moonpost.runtime.sched").sleep(0.2 + math.random() * 0.6)
        if inj.nacked >= TOTAL then break end
        srv.kill()
        kills = kills + 1
        srv = H.launch(policy, env, { port = port })
      end
      assert.is_true(H.wait_for(function() return inj.running == 0 end, 300), "injection did not finish")
      -- and once more while the queue is still delivering what was acknowledged
      if #sink.messages() < inj.nacked then
        srv.kill()
        kills = kills + 1
        srv = H.launch(policy, env, { port = port })
      end
      local function delivered()
        local seen = {}
        for _, m in ipairs(sink.messages()) do
          local tok = m.rcpts[1]:match("^(.-)@")
          seen[tok] = (seen[tok] or 0) + 1
        end
        return seen
      end
      local complete = H.wait_for(function()
        local seen = delivered()
        for tok in pairs(inj.acked) do if not seen[tok] then return false end end
        return true
      end, 180)
      srv.stop()
      local seen = delivered()
      sink.stop()
      local lost, dups = {}, 0
      for tok in pairs(inj.acked) do if not seen[tok] then lost[#lost + 1] = tok end end
      for _, n in pairs(seen) do if n > 1 then dups = dups + n - 1 end end
      local in_flight = kills * 50 -- the queue's concurrency per kill
      print(string.format("\ndelivery crash spec: %d acknowledged (%d sent), %d kills, %d lost, "
        .. "%d duplicate deliveries", inj.nacked, inj.sent, kills, #lost, dups))
      assert.is_true(complete)
      assert.same({}, lost)
      assert.is_true(dups <= in_flight, dups .. " duplicates")
    end, 600)
    H.rm_rf(dir)
  end)
end)

-- A message to several domains is delivered one domain after the other. What
-- an early domain delivered must be on record before a later one is tried:
-- a server stopped or killed while a later domain's next hop keeps it
-- waiting must not deliver the early domain again after its restart.
describe("delivery to several domains under SIGKILL and SIGTERM", function()
  -- Returns once the server has answered EHLO on a new connection: its loop
  -- has turned since anything it started before (the state records of a
  -- turn are written at its end).
  local function loop_turned(port)
    local p = assert(H.connect(port))
    assert.equal(220, (p:reply()))
    p:cmd("EHLO probe.test")
    assert.equal(250, (p:reply()))
    p:close()
  end

  for _, how in ipairs({ "SIGKILL", "SIGTERM" }) do
    it("does not deliver an earlier domain again after a " .. how .. " while a later one waits", function()
      local dir = H.tmpdir("moonpost-multidomain")
      H.run_killing(function()
        -- b.test's next hop: takes connections and never greets
        local conns = {}
        local hole, hport = H.listen(function(c) conns[#conns + 1] = c end)
        local env = { MOONPOST_SPOOL = dir .. "/spool", MOONPOST_MAILDIR = dir .. "/mail",
          MOONPOST_RELAY = "127.0.0.1:" .. hport }
        local policy = H.root .. "/spec/fixtures/policies/multidomain.lua"
        local srv = H.launch(policy, env)
        local ok, err = pcall(function()
          assert.equal(250, (H.send(srv.port, { to = { "x@a.test", "y@b.test" } })))
          -- a.test is stored first, then b.test's delivery waits for a greeting
          assert.is_true(H.wait_for(function() return #conns == 1 end, 10), "b.test was not tried")
          assert.equal(1, #H.ls(dir .. "/mail/x/new"))
          loop_turned(srv.port)
          if how == "SIGKILL" then srv.kill() else srv.stop() end
          srv = H.launch(policy, env)
          -- the restarted server tries what is left; a.test would come first
          assert.is_true(H.wait_for(function() return #conns == 2 end, 10), "b.test was not tried again")
          assert.equal(1, #H.ls(dir .. "/mail/x/new"), "x@a.test was delivered again after the restart")
          srv.kill()
        end)
        for _, c in ipairs(conns) do c:close() end
        hole:close()
        if not ok then error(err, 0) end
      end, 60)
      H.rm_rf(dir)
    end)
  end
end)
