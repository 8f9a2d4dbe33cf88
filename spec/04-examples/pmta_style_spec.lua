-- examples/pmta-style.lua, launched as a user would (scripts/moonpost run),
-- relaying to the aiosmtpd sink: virtual MTAs picked by X-Virtual-MTA,
-- per-domain max-smtp-out / max-msg-rate equivalents and a backoff rule
-- from a shaping file, all measured at the sink.
local H = require "helpers"

local arrivals = H.arrivals

describe("examples/pmta-style.lua", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-pmta") end)
  after_each(function() H.rm_rf(dir) end)

  it("routes by virtual MTA and shapes per domain as its shaping file says", function()
    H.write(dir .. "/shaping.lua", [[
return {
  default = { max_connections = 20 },
  destinations = {
    -- max-smtp-out 2, max-msg-per-connection 5, max-msg-rate 20/s
    isp = { domains = { "isp.test" }, max_connections = 2, max_messages_per_connection = 5, rate = "20/s" },
    -- backoff: a [TSS04] deferral suspends the domain for 2 s
    picky = { domains = { "picky.test" }, rules = { { match = "%[TSS04%]", action = "suspend", duration = "2s" } } },
  },
}
]])
    H.run(function()
      local sink = H.sink({})
      local proc = H.launch(H.root .. "/examples/pmta-style.lua", {
        MOONPOST_SPOOL = dir .. "/spool",
        MOONPOST_RELAY = "127.0.0.1:" .. sink.port,
        MOONPOST_SHAPING = dir .. "/shaping.lua",
        MOONPOST_VMTAS = "vmta1=127.0.0.2/vmta1.pmta.test,vmta2=127.0.0.3/vmta2.pmta.test",
      })
      local ok, err = pcall(function()
        -- 1. X-Virtual-MTA picks the source; the header does not leave
        local body = "X-Virtual-MTA: vmta2\r\nSubject: picked\r\n\r\nhello\r\n"
        assert.equal(250, H.send(proc.port, { to = "one@pick.test", body = body }))
        assert.equal(550, H.send(proc.port, { to = "two@pick.test",
          body = "X-Virtual-MTA: vmta7\r\nSubject: unknown\r\n\r\nhello\r\n" }))
        H.wait_for(function() return #sink.messages() >= 1 end, 15)
        local a = arrivals(sink)
        assert.equal(1, #a)
        assert.equal("127.0.0.3", a[1].peer)
        assert.equal("vmta2.pmta.test", a[1].helo)
        assert.is_nil(a[1].data:find("X-Virtual-MTA", 1, true))

        -- 2. isp.test: 2 connections at most, 20 msg/s, 5 per connection
        local st = H.inject({ port = proc.port, sessions = 6, total = 60, body = "shaped\r\n",
          rcpt = function(seq) return "u" .. seq .. "@isp.test" end })
        H.wait_for(function() return st.running == 0 end, 30)
        local n = st.nacked
        H.wait_for(function() return #sink.messages() >= n + 1 end, 30)
        local isp = {}
        for _, x in ipairs(arrivals(sink)) do
          if x.rcpt:match("@isp%.test$") then isp[#isp + 1] = x end
        end
        assert.equal(n, #isp)
        -- limits hold per virtual MTA and domain, as in PowerMTA: each
        -- source sends at most 20/s over at most 2 connections
        local by_src = {}
        for _, x in ipairs(isp) do
          local l = by_src[x.peer] or {}
          by_src[x.peer] = l
          l[#l + 1] = x.t
        end
        local nsrc = 0
        for src, times in pairs(by_src) do
          nsrc = nsrc + 1
          local rate = (#times - 1) / (times[#times] - times[1])
          print(string.format("\n    isp.test from %s: %d messages, %.1f msg/s (limit 20/s)", src, #times, rate))
          assert.is_true(rate <= 22, src .. ": rate " .. rate)
          if #times >= 20 then assert.is_true(rate >= 14, src .. ": rate " .. rate) end
        end
        assert.equal(2, nsrc) -- both virtual MTAs of pool1 took part
        -- concurrent connections per source, replayed from the sink's record
        -- (the connections that carried isp.test mail: another domain's
        -- connections are another ready queue)
        local isp_conn = {}
        for _, m in ipairs(sink.messages()) do
          if m.rcpts[1]:match("@isp%.test$") then isp_conn[m.conn] = true end
        end
        local peer_of, open, peak = {}, {}, {}
        local evs = {}
        for _, ev in ipairs(sink.events()) do
          if (ev.ev == "connect" or ev.ev == "close") and isp_conn[ev.conn] then evs[#evs + 1] = ev end
        end
        for _, ev in ipairs(evs) do
          if ev.ev == "connect" then
            peer_of[ev.conn] = ev.peer
            open[ev.peer] = (open[ev.peer] or 0) + 1
            if open[ev.peer] > (peak[ev.peer] or 0) then peak[ev.peer] = open[ev.peer] end
          elseif peer_of[ev.conn] then
            open[peer_of[ev.conn]] = open[peer_of[ev.conn]] - 1
          end
        end
        for src, p in pairs(peak) do
          if src ~= "127.0.0.1" then assert.is_true(p <= 2, src .. ": peak connections " .. p) end
        end
        -- max-msg-per-connection 5
        local per_conn = {}
        for _, m in ipairs(sink.messages()) do
          if m.rcpts[1]:match("@isp%.test$") then per_conn[m.conn] = (per_conn[m.conn] or 0) + 1 end
        end
        for c, k in pairs(per_conn) do assert.is_true(k <= 5, "connection " .. c .. ": " .. k .. " messages") end

        -- 3. backoff: the [TSS04] reply suspends picky.test from vmta1 for
        -- 2 s; vmta2's queue for the same domain goes on meanwhile
        local function via(v) return "X-Virtual-MTA: " .. v .. "\r\nSubject: backoff\r\n\r\nhello\r\n" end
        local before = #sink.messages()
        assert.equal(250, H.send(proc.port, { to = "throttle1-a@picky.test", body = via("vmta1") }))
        H.wait_for(function() return #sink.events("throttled") >= 1 end, 10)
        local fired = sink.events("throttled")[1].t
        for i = 1, 3 do
          assert.equal(250, H.send(proc.port, { to = "held" .. i .. "@picky.test", body = via("vmta1") }))
          assert.equal(250, H.send(proc.port, { to = "free" .. i .. "@picky.test", body = via("vmta2") }))
        end
        -- (the throttled message itself waits for its retry, 5 minutes in this example)
        H.wait_for(function() return #sink.messages() >= before + 6 end, 15)
        local held, free = 0, 0
        for _, x in ipairs(arrivals(sink)) do
          if x.rcpt:match("^held%d@picky%.test$") then
            held = held + 1
            assert.equal("127.0.0.2", x.peer)
            assert.is_true(x.t >= fired + 1.9, string.format("held: %.2f s after the rule fired", x.t - fired))
          elseif x.rcpt:match("^free%d@picky%.test$") then
            free = free + 1
            assert.equal("127.0.0.3", x.peer)
            assert.is_true(x.t < fired + 1.9, string.format("free: %.2f s after the rule fired", x.t - fired))
          end
        end
        assert.equal(3, held)
        assert.equal(3, free)
        assert.matches("suspended for 2s", proc.log())
      end)
      proc.stop()
      sink.stop()
      if not ok then error(tostring(err) .. "\n" .. proc.log(), 0) end
    end, 120)
  end)
end)
