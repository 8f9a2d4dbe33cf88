-- Outbound TLS policies (none, opportunistic, required, verify, implicit)
-- against real peers on loopback: a second Moonpost with STARTTLS and the
-- aiosmtpd sink (spec/tools/sink.py) with and without TLS.
local H = require "helpers"
local cjson = require "cjson"

local SHORT = { connect = 3, greeting = 3, ehlo = 3, mail = 3, rcpt = 3, data = 3, block = 3, done = 3 }

-- A sending MTA: spool, and route.smtp with these options; it records each
-- delivery event.
local function sender(dir, route_opts)
  local events = { delivered = {}, deferred = {}, bounced = {} }
  local ro = { idle_timeout = "2s", timeouts = SHORT }
  for k, v in pairs(route_opts) do ro[k] = v end
  local mta, port = H.start_mta({}, function(m)
    m:use(require("moonpost.route").smtp(ro))
    for _, kind in ipairs({ "delivered", "deferred", "bounced" }) do
      m:on("delivery_" .. kind, function(_, rcpt, res)
        table.insert(events[kind], { rcpt = rcpt.address, res = res })
      end)
    end
  end, { spool = { dir = dir .. "/spool", min_free = 0 }, queue = { retry = { "30s" }, max_age = "1h" } })
  return mta, port, events
end

-- A receiving Moonpost with STARTTLS, recording what arrives.
local function receiver(tls)
  local got = {}
  local mta, port = H.start_mta({ tls = tls }, function(m)
    m:on("smtp_server_message_received", function(txn, msg)
      got[#got + 1] = { txn = txn, text = msg:tostring(), tls = txn.conn.tls_info }
    end)
  end)
  return mta, port, got
end

local function with_sink(args, fn)
  local sink = H.sink(args)
  local ok, err = pcall(fn, sink)
  sink.stop()
  if not ok then error(err, 0) end
end

describe("outbound TLS", function()
  local dir, d
  before_each(function()
    dir = H.tmpdir("moonpost-tlsout")
    d = H.certs()
  end)
  after_each(function() H.rm_rf(dir) end)

  it("delivers over TLS 1.3 to a second Moonpost, verifying its certificate", function()
    H.run(function()
      local rmta, rport, got = receiver({ cert = d .. "/mx.pem", key = d .. "/mx.key" })
      local smta, sport, ev = sender(dir, { relay = { "127.0.0.1:" .. rport,
        tls = { policy = "verify", ca_file = d .. "/ca.pem", name = "mx.test.example" } } })
      assert.equal(250, (H.send(sport, { to = "a@remote.test", body = "Subject: t\r\n\r\nsecret\r\n" })))
      assert.is_true(H.wait_for(function() return #got == 1 end, 10))
      assert.equal("TLSv1.3", got[1].tls.version)
      assert.truthy(got[1].text:find("secret", 1, true))
      assert.is_true(H.wait_for(function() return #ev.delivered == 1 end, 5))
      assert.equal("TLSv1.3", ev.delivered[1].res.tls)
      assert.truthy(H.log(":" .. rport .. ": TLS TLSv1.3 "):find("verified", 1, true))
      H.stop_mta(smta)
      H.stop_mta(rmta)
    end)
  end)

  it("delivers over TLS to an aiosmtpd STARTTLS sink (opportunistic, the default)", function()
    H.run(function()
      with_sink({ "--tls", d .. "/self.pem", d .. "/self.key" }, function(sink)
        local smta, sport = sender(dir, { relay = "127.0.0.1:" .. sink.port })
        assert.equal(250, (H.send(sport, { to = "a@remote.test" })))
        assert.is_true(H.wait_for(function() return #sink.messages() == 1 end, 10))
        assert.equal("TLSv1.3", sink.messages()[1].tls)
        H.stop_mta(smta)
      end)
    end)
  end)

  it("with 'required' and a plaintext-only peer defers the message and sends nothing in clear", function()
    H.run(function()
      with_sink(nil, function(sink)
        local smta, sport, ev = sender(dir, { relay = "127.0.0.1:" .. sink.port, tls = "required" })
        assert.equal(250, (H.send(sport, { to = "a@remote.test" })))
        assert.is_true(H.wait_for(function() return #ev.deferred == 1 end, 10))
        local res = ev.deferred[1].res
        assert.equal("4.7.4", res.enhanced)
        assert.truthy(res.text:find("TLS is required, but [127.0.0.1]:" .. sink.port
          .. " does not offer STARTTLS", 1, true), res.text)
        assert.equal(0, #sink.events("message"))
        assert.equal(0, #ev.delivered)
        -- still queued, for a later attempt
        local q = smta:queues()
        local depth = 0
        for _, e in pairs(q) do depth = depth + (e.depth or 0) end
        assert.equal(1, depth)
        H.stop_mta(smta)
      end)
    end)
  end)

  it("with 'verify' and a self-signed peer defers, and the log names the verification error", function()
    H.run(function()
      local rmta, rport, got = receiver({ cert = d .. "/self.pem", key = d .. "/self.key" })
      local smta, sport, ev = sender(dir, { relay = { "127.0.0.1:" .. rport,
        tls = { policy = "verify", ca_file = d .. "/ca.pem" } } })
      assert.equal(250, (H.send(sport, { to = "a@remote.test" })))
      assert.is_true(H.wait_for(function() return #ev.deferred == 1 end, 10))
      local res = ev.deferred[1].res
      assert.equal("4.7.5", res.enhanced)
      assert.truthy(res.text:find("certificate verify failed: self%-signed certificate"), res.text)
      local _, n = H.log("TLS handshake failed (policy verify): certificate verify failed: self-signed certificate")
        :gsub("\n", "")
      assert.equal(1, n)
      assert.equal(0, #got)
      H.stop_mta(smta)
      H.stop_mta(rmta)
    end)
  end)

  it("with 'verify' refuses a certificate for another name", function()
    H.run(function()
      local rmta, rport, got = receiver({ cert = d .. "/other.pem", key = d .. "/other.key" })
      local smta, sport, ev = sender(dir, { relay = { "127.0.0.1:" .. rport,
        tls = { policy = "verify", ca_file = d .. "/ca.pem", name = "mx.test.example" } } })
      assert.equal(250, (H.send(sport, { to = "a@remote.test" })))
      assert.is_true(H.wait_for(function() return #ev.deferred == 1 end, 10))
      assert.truthy(ev.deferred[1].res.text:find("hostname mismatch", 1, true), ev.deferred[1].res.text)
      assert.equal(0, #got)
      H.stop_mta(smta)
      H.stop_mta(rmta)
    end)
  end)

  it("with 'opportunistic' and a failing handshake delivers in plaintext on a new connection", function()
    H.run(function()
      with_sink({ "--bad-tls" }, function(sink)
        local smta, sport, ev = sender(dir, { relay = "127.0.0.1:" .. sink.port })
        assert.equal(250, (H.send(sport, { to = "a@remote.test" })))
        assert.is_true(H.wait_for(function() return #sink.messages() == 1 end, 10))
        assert.equal(cjson.null, sink.messages()[1].tls)
        -- the handshake failed on the first connection; the message went on a second
        assert.equal(1, #sink.events("bad_tls"))
        -- (aiosmtpd's controller makes a connection of its own at start: count EHLOs)
        assert.equal(2, #sink.events("ehlo"))
        assert.are_not.equal(sink.events("bad_tls")[1].conn, sink.messages()[1].conn)
        assert.truthy(H.log("TLS handshake failed ("):find("retrying in plaintext", 1, true))
        assert.equal(1, #ev.delivered)
        -- the destination is remembered: the next message goes in plaintext at once
        assert.equal(250, (H.send(sport, { to = "b@remote.test" })))
        assert.is_true(H.wait_for(function() return #sink.messages() == 2 end, 10))
        assert.equal(1, #sink.events("bad_tls"))
        H.stop_mta(smta)
      end)
    end)
  end)

  it("with 'opportunistic' and a TLS version mismatch falls back to plaintext with a second Moonpost", function()
    H.run(function()
      local rmta, rport, got = receiver({ cert = d .. "/mx.pem", key = d .. "/mx.key", min_version = "1.3" })
      local smta, sport = sender(dir, { relay = { "127.0.0.1:" .. rport,
        tls = { policy = "opportunistic", max_version = "1.2" } } })
      assert.equal(250, (H.send(sport, { to = "a@remote.test" })))
      assert.is_true(H.wait_for(function() return #got == 1 end, 10))
      assert.is_nil(got[1].tls)
      H.stop_mta(smta)
      H.stop_mta(rmta)
    end)
  end)

  it("with 'none' never starts TLS", function()
    H.run(function()
      local rmta, rport, got = receiver({ cert = d .. "/mx.pem", key = d .. "/mx.key" })
      local smta, sport = sender(dir, { relay = "127.0.0.1:" .. rport, tls = "none" })
      assert.equal(250, (H.send(sport, { to = "a@remote.test" })))
      assert.is_true(H.wait_for(function() return #got == 1 end, 10))
      assert.is_nil(got[1].tls)
      H.stop_mta(smta)
      H.stop_mta(rmta)
    end)
  end)

  it("speaks implicit TLS to a relay port, and per-domain policies override the block's", function()
    H.run(function()
      local rmta, rport, got = receiver({ cert = d .. "/mx.pem", key = d .. "/mx.key", implicit = true })
      local pmta, pport, pgot = receiver({ cert = d .. "/mx.pem", key = d .. "/mx.key" })
      local smta, sport = sender(dir, {
        routes = {
          ["implicit.test"] = { "127.0.0.1:" .. rport, tls = { policy = "verify", implicit = true,
            ca_file = d .. "/ca.pem", name = "mx.test.example" } },
          ["plain.test"] = "127.0.0.1:" .. pport,
        },
        tls_policies = { ["plain.test"] = "none" },
      })
      assert.equal(250, (H.send(sport, { to = "a@implicit.test" })))
      assert.equal(250, (H.send(sport, { to = "b@plain.test" })))
      assert.is_true(H.wait_for(function() return #got == 1 and #pgot == 1 end, 10))
      assert.equal("TLSv1.3", got[1].tls.version)
      assert.is_nil(pgot[1].tls)
      H.stop_mta(smta)
      H.stop_mta(rmta)
      H.stop_mta(pmta)
    end)
  end)

  it("presents a client certificate when configured", function()
    H.run(function()
      local rmta, rport, got = receiver({ cert = d .. "/mx.pem", key = d .. "/mx.key" })
      local smta, sport = sender(dir, { relay = { "127.0.0.1:" .. rport, tls = { policy = "required",
        cert = d .. "/client.pem", key = d .. "/client.key" } } })
      assert.equal(250, (H.send(sport, { to = "a@remote.test" })))
      assert.is_true(H.wait_for(function() return #got == 1 end, 10))
      assert.equal("TLSv1.3", got[1].tls.version)
      H.stop_mta(smta)
      H.stop_mta(rmta)
    end)
  end)

  it("reports bad TLS options at load with the field", function()
    local route = require "moonpost.route"
    local ok, err = pcall(route.smtp, { relay = "127.0.0.1:25", tls = "sometimes" })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("route.smtp: field 'tls': field 'policy': expected one of", 1, true), err)
    ok, err = pcall(route.smtp, { relay = { "127.0.0.1:25", tls = { policy = "verify", ca_file = "/nonexistent.pem" } } })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("/nonexistent.pem: cannot load trust anchors", 1, true), err)
    ok, err = pcall(route.smtp, { relay = { "127.0.0.1:25", tlss = "verify" } })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("unknown field 'tlss'", 1, true), err)
  end)
end)
