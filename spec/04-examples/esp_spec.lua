-- examples/esp.lua, launched as a user would, with two tenants (acme and
-- globex) submitting over STARTTLS + AUTH LOGIN from Python's smtplib, the
-- aiosmtpd sink as the outside world, DKIM keys published by nsd and
-- checked by python3-dkim. Isolation is the point: what one tenant does
-- (bounces, speed, backlog) never changes what the other gets.
local H = require "helpers"
local cjson = require "cjson"
local sched = require "moonpost.runtime.sched"


local function keygen(dir, domain, selector)
  local code, out, err = H.exec(H.root .. "/scripts/dkim-keygen",
    { "--type", "ed25519", "--domain", domain, "--selector", selector, "--dir", dir }, { timeout = 60 })
  assert(code == 0, "dkim-keygen: " .. out .. err)
  return out
end

local PASSWORDS = { acme = { "acme-app", "acme-demo-password" }, globex = { "globex-app", "globex-demo-password" } }

-- submit(port, tenant, count, from, rcpt) -> list of per-message reply codes
local function submit(port, tenant, count, from, rcpt)
  local u = PASSWORDS[tenant]
  local code, out, err = H.exec(H.python, { H.root .. "/spec/tools/submit.py", tostring(port), u[1], u[2],
    tostring(count), from, rcpt }, { timeout = 120 })
  assert(code == 0, "submit.py: " .. out .. err)
  return cjson.decode(out)
end

-- run fns at once, each in its own task; wait for all
local function together(fns)
  local results, left = {}, #fns
  for i, fn in ipairs(fns) do
    sched.spawn(function()
      local ok, r = pcall(fn)
      results[i] = ok and r or { error = r }
      left = left - 1
    end)
  end
  H.wait_for(function() return left == 0 end, 150)
  for _, r in ipairs(results) do
    if r.error then error(r.error, 0) end
  end
  return results
end

local arrivals = H.arrivals

local function count_codes(list, field, code)
  local n = 0
  for _, e in ipairs(list) do if e[field] == code then n = n + 1 end end
  return n
end

describe("examples/esp.lua", function()
  local dir, dnsd

  setup(function()
    dir = H.tmpdir("moonpost-esp")
    H.run(function()
      local records = {
        keygen(dir .. "/dkim", "acme.esp.test", "s1"),
        keygen(dir .. "/dkim", "globex.esp.test", "s1"),
        keygen(dir .. "/dkim", "mail.esp.test", "esp1"),
      }
      dnsd = H.dns_server({ ["esp.test"] = "$ORIGIN esp.test.\n$TTL 300\n"
        .. "@ IN SOA ns.esp.test. hostmaster.esp.test. 1 3600 600 86400 60\n@ IN NS ns.esp.test.\n"
        .. "ns IN A 127.0.0.1\n" .. table.concat(records, "\n") .. "\n" })
    end)
    -- the example's tenants file, with limits small enough to reach in a test
    H.write(dir .. "/tenants.lua", [[
return {
  esp = { domain = "mail.esp.test", selector = "esp1" },
  tenants = {
    acme = { domains = { "acme.esp.test" }, sources = { { source = "127.0.0.2", helo = "o1.acme.esp.test" } },
             max_queued = 40, max_connections = 10, max_messages = "1000/s", send_rate = "20/s" },
    globex = { domains = { "globex.esp.test" }, sources = { { source = "127.0.0.3", helo = "o1.globex.esp.test" } },
               max_queued = 10000, max_connections = 10, max_messages = "1000/s" },
  },
}
]])
  end)

  teardown(function()
    H.run(function() dnsd.stop() end)
    H.rm_rf(dir)
  end)

  it("keeps two tenants apart: suppression, keys, addresses, speed and quota", function()
    local certs = H.certs()
    H.run(function()
      local sink = H.sink({})
      local proc = H.launch(H.root .. "/examples/esp.lua", {
        MOONPOST_SPOOL = dir .. "/spool",
        MOONPOST_RELAY = "127.0.0.1:" .. sink.port,
        MOONPOST_TLS_CERT = certs .. "/mx.pem",
        MOONPOST_TLS_KEY = certs .. "/mx.key",
        MOONPOST_DKIM_DIR = dir .. "/dkim",
        MOONPOST_TENANTS = dir .. "/tenants.lua",
        MOONPOST_SUPPRESS = dir .. "/suppress",
      })
      local ok, err = pcall(function()
        local port = proc.port

        -- 1. suppression: acme's hard bounce suppresses the address for acme only
        local r = submit(port, "acme", 1, "news@acme.esp.test", "r550-gone@dest.test")
        assert.equal(250, r[1].data)
        assert.is_true(H.wait_for(function() return proc.log():find("(invalid-recipient, hard)", 1, true) end, 15))
        r = submit(port, "acme", 1, "news@acme.esp.test", "r550-gone@dest.test")
        assert.equal(550, r[1].rcpt)
        assert.matches("suppression list", r[1].reply)
        r = submit(port, "globex", 1, "hi@globex.esp.test", "r550-gone@dest.test")
        assert.equal(250, r[1].rcpt)

        -- 2. each tenant's mail leaves from its own address and HELO, signed
        -- with its own domain; a tenant cannot sign as another
        submit(port, "acme", 1, "news@acme.esp.test", "a-own@dest.test")
        submit(port, "globex", 1, "hi@globex.esp.test", "g-own@dest.test")
        submit(port, "globex", 1, "spoof@acme.esp.test", "g-spoof@dest.test")
        H.wait_for(function() return #arrivals(sink, "^[ag]%-[os]") >= 3 end, 15)
        local function check(rcpt, peer, helo, d)
          local a = arrivals(sink, "^" .. rcpt:gsub("%-", "%%-") .. "@")
          assert.equal(1, #a, rcpt)
          assert.equal(peer, a[1].peer)
          assert.equal(helo, a[1].helo)
          assert.equal(d, a[1].data:match("DKIM%-Signature:.-d=([%w%.%-]+)"), rcpt)
          assert.same({ true }, H.dkim_verify(a[1].data, dnsd.port), rcpt .. ": python3-dkim says it does not verify")
        end
        check("a-own", "127.0.0.2", "o1.acme.esp.test", "acme.esp.test")
        check("g-own", "127.0.0.3", "o1.globex.esp.test", "globex.esp.test")
        check("g-spoof", "127.0.0.3", "o1.globex.esp.test", "mail.esp.test")

        -- 3. acme over its sending rate (20/s) is slowed; globex is not
        local res = together({
          function() return submit(port, "acme", 30, "news@acme.esp.test", "a-rate{i}@dest.test") end,
          function() return submit(port, "globex", 30, "hi@globex.esp.test", "g-rate{i}@dest.test") end,
        })
        assert.equal(30, count_codes(res[1], "data", 250))
        assert.equal(30, count_codes(res[2], "data", 250))
        H.wait_for(function() return #arrivals(sink, "^a%-rate") >= 30 end, 30)
        local a, g = arrivals(sink, "^a%-rate"), arrivals(sink, "^g%-rate")
        assert.equal(30, #a)
        assert.equal(30, #g)
        local arate = 29 / (a[30].t - a[1].t)
        local gspan = g[30].t - g[1].t
        local grate = 29 / math.max(gspan, 0.001)
        print(string.format("\n    acme (send_rate 20/s): %.1f msg/s; globex (no limit): %.1f msg/s, done in %.2f s",
          arate, grate, gspan))
        assert.is_true(arate <= 22, "acme's rate " .. arate)
        assert.is_true(grate >= 3 * arate, "globex's rate " .. grate .. " against acme's " .. arate)
        -- globex finished while acme was still being held back
        assert.is_true(g[30].t < a[30].t - 0.5)

        -- 4. acme's queue quota (40 queued) refuses acme only
        res = together({
          function() return submit(port, "acme", 80, "news@acme.esp.test", "a-quota{i}@dest.test") end,
          function() return submit(port, "globex", 80, "hi@globex.esp.test", "g-quota{i}@dest.test") end,
        })
        local refused = count_codes(res[1], "mail", 452)
        print(string.format("    quota: acme %d of 80 refused with 452 at MAIL, globex %d", refused,
          count_codes(res[2], "mail", 452)))
        assert.is_true(refused > 0, "acme was never refused")
        for _, e in ipairs(res[1]) do
          if e.mail == 452 then assert.matches("4%.3%.1", e.reply) end
        end
        assert.equal(80, count_codes(res[2], "data", 250))
      end)
      proc.stop()
      sink.stop()
      if not ok then error(tostring(err) .. "\n" .. proc.log():sub(-3000), 0) end
    end, 240)
  end)
end)
