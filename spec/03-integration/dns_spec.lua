-- DNS on c-ares against a real authoritative server (nsd on loopback, fed
-- from spec/fixtures/dns/test.zone), and MX routing of outbound mail.
local H = require "helpers"
local dns = require "moonpost.runtime.dns"
local sched = require "moonpost.runtime.sched"

local function with_dns(fn, timeout)
  H.run(function()
    local srv = H.dns_server()
    local ok, err = pcall(fn, srv)
    srv.stop()
    if not ok then error(err, 0) end
  end, timeout)
end

describe("moonpost.runtime.dns", function()
  it("answers every record type with its TTL", function()
    with_dns(function(srv)
      local r = assert(dns.new { servers = srv.address })
      local mx = assert(r:query("single.test", "MX"))
      assert.same({ { type = "MX", name = "single.test", ttl = 300, data = "mx1.test", pref = 10 } }, mx)
      assert.equal("127.0.0.2", assert(r:query("mx1.test", "A"))[1].data)
      assert.equal("::1", assert(r:query("v6host.test", "AAAA"))[1].data)
      local txt = assert(r:query("txt.test", "TXT"))
      local texts = {}
      for i, t in ipairs(txt) do texts[i] = t.data end
      table.sort(texts)
      assert.same({ "part one part two", "v=spf1 -all" }, texts)
      assert.equal("mx1.test", assert(r:query("2.0.0.127.in-addr.arpa.test", "PTR"))[1].data)
      local tlsa = assert(r:query("_25._tcp.mx1.test", "TLSA"))[1]
      assert.same({ 3, 1, 1 }, { tlsa.usage, tlsa.selector, tlsa.mtype })
      assert.equal("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", tlsa.data)
      -- names are case-insensitive, a trailing dot is fine
      assert.equal("mx1.test", assert(r:query("SINGLE.Test.", "mx"))[1].data)
      r:close()
    end)
  end)

  it("can be closed by the task its answer wakes", function()
    with_dns(function(srv)
      local before = #MOONPOST_LOG
      local r = assert(dns.new { servers = srv.address })
      assert.equal("127.0.0.2", assert(r:query("mx1.test", "A"))[1].data)
      -- the answer's callback resumed this task: it still runs below us
      r:close()
      sched.sleep(0.05)
      for i = before + 1, #MOONPOST_LOG do
        assert.falsy(MOONPOST_LOG[i]:find("dns: ", 1, true), MOONPOST_LOG[i])
      end
    end)
  end)

  it("looks an internationalized name up by its A-labels, in any case or form", function()
    with_dns(function(srv)
      local r = assert(dns.new { servers = srv.address })
      for _, name in ipairs({ "bücher.test", "BÜCHER.test", "xn--bcher-kva.test" }) do
        local mx, err = r:query(name, "MX")
        assert.is_table(mx, name .. ": " .. tostring(err))
        assert.equal("mx1.test", mx[1].data, name)
      end
      -- not a valid IDNA2008 name: it cannot exist
      assert.same({ nil, "nxdomain" }, { r:query("\255\254.test", "A") })
      r:close()
      assert.equal("xn--bcher-kva.example", dns.to_ascii("BÜCHER.example"))
      assert.equal("mx.test", dns.to_ascii("MX.Test"))
      assert.is_nil(dns.to_ascii("a\255.test"))
    end)
  end)

  it("answers a name that cannot be encoded at once, as one that does not exist", function()
    with_dns(function(srv)
      local r = assert(dns.new { servers = srv.address })
      local bad = { "a..test", string.rep("x", 64) .. ".test", string.rep("abcdefg.", 32) .. "test" }
      for _ = 1, 2 do -- twice: the first answer must not be cached as a wait
        for _, name in ipairs(bad) do
          assert.same({ nil, "nxdomain" }, { r:query(name, "TXT") }, name)
        end
      end
      assert.is_nil(next(r.inflight))
      -- and the resolver still works
      assert.equal("mx1.test", assert(r:query("single.test", "MX"))[1].data)
      r:close()
    end)
  end)

  it("tells NXDOMAIN from NODATA, and caches answers and negative answers", function()
    with_dns(function(srv)
      local r = assert(dns.new { servers = srv.address })
      assert.same({ nil, "nxdomain" }, { r:query("nope.test", "MX") })
      assert.same({ nil, "nodata" }, { r:query("nomx.test", "MX") })
      local misses = r.stats.misses
      assert.same({ nil, "nxdomain" }, { r:query("nope.test", "MX") })
      assert.same({ nil, "nodata" }, { r:query("nomx.test", "MX") })
      assert.truthy(r:query("single.test", "MX"))
      assert.truthy(r:query("single.test", "MX"))
      assert.equal(misses + 1, r.stats.misses)
      r:close()
    end)
  end)

  it("respects a record's TTL", function()
    with_dns(function(srv)
      local r = assert(dns.new { servers = srv.address })
      assert.truthy(r:query("shortttl.test", "MX"))
      local misses = r.stats.misses
      assert.truthy(r:query("shortttl.test", "MX"))
      assert.equal(misses, r.stats.misses)
      sched.sleep(1.2)
      assert.truthy(r:query("shortttl.test", "MX"))
      assert.equal(misses + 1, r.stats.misses)
      r:close()
    end)
  end)

  it("keeps an answer that came through an alias no longer than the alias' TTL", function()
    with_dns(function(srv)
      local r = assert(dns.new { servers = srv.address })
      -- shortalias.test 1 CNAME mx1.test; mx1.test 300 A 127.0.0.2 (and no MX)
      local a = assert(r:query("shortalias.test", "A"))
      assert.same({ "mx1.test", "127.0.0.2", 300 }, { a[1].name, a[1].data, a[1].ttl })
      assert.same({ nil, "nodata" }, { r:query("shortalias.test", "MX") })
      local sent = r.stats.sent
      assert.truthy(r:query("shortalias.test", "A"))
      assert.equal(sent, r.stats.sent) -- cached while the alias lasts
      sched.sleep(1.2)
      -- the alias has expired: it may point elsewhere now, so both are asked again
      assert.truthy(r:query("shortalias.test", "A"))
      assert.same({ nil, "nodata" }, { r:query("shortalias.test", "MX") })
      assert.equal(sent + 2, r.stats.sent)
      r:close()
    end)
  end)

  it("sends identical queries in flight once", function()
    with_dns(function(srv)
      local r = assert(dns.new { servers = srv.address })
      local got = 0
      for _ = 1, 10 do
        sched.spawn(function()
          assert(r:query("tie.test", "MX"))
          got = got + 1
        end)
      end
      assert.is_true(H.wait_for(function() return got == 10 end, 5))
      assert.equal(10, r.stats.misses)
      assert.equal(1, r.stats.sent)
      r:close()
    end)
  end)

  it("times out when the server does not answer, and reports it", function()
    H.run(function()
      local port = H.free_port() -- nothing there
      local r = assert(dns.new { servers = "127.0.0.1:" .. port, timeout = 0.3, tries = 1 })
      local recs, err = r:query("single.test", "MX")
      assert.is_nil(recs)
      assert.truthy(err == "timeout" or err == "connrefused" or err == "error" or err == "refused", err)
      r:close()
    end)
  end)

  it("mx_hosts() follows RFC 5321 5.1 and RFC 7505", function()
    with_dns(function(srv)
      local r = assert(dns.new { servers = srv.address })
      -- preference order, every MX with its addresses
      local hosts = assert(r:mx_hosts("backup.test"))
      assert.same({ "down.test", "mx2.test" }, { hosts[1].name, hosts[2].name })
      assert.same({ "127.0.0.3" }, hosts[2].addrs)
      -- random order within a preference: both orders show up
      local seen = {}
      for _ = 1, 40 do seen[assert(r:mx_hosts("tie.test"))[1].name] = true end
      assert.is_true(seen["mx1.test"] and seen["mx2.test"])
      -- no MX: the domain itself
      hosts = assert(r:mx_hosts("nomx.test"))
      assert.same({ "nomx.test", true, { "127.0.0.2" } }, { hosts[1].name, hosts[1].implicit, hosts[1].addrs })
      -- null MX and a domain that does not exist: permanent
      local none, why, permanent = r:mx_hosts("nullmx.test")
      assert.is_nil(none)
      assert.matches("^5%.1%.10 ", why)
      assert.is_true(permanent)
      none, why, permanent = r:mx_hosts("nope.test")
      assert.is_nil(none)
      assert.matches("^5%.1%.2 ", why)
      assert.is_true(permanent)
      -- address order
      assert.same({ "::1", "127.0.0.2" }, assert(r:mx_hosts("dualmx.test"))[1].addrs)
      assert.same({ "127.0.0.2", "::1" }, assert(r:mx_hosts("dualmx.test", { order = "ipv4" }))[1].addrs)
      assert.same({ "127.0.0.2" }, assert(r:mx_hosts("dualmx.test", { order = "ipv4-only" }))[1].addrs)
      r:close()
    end)
  end)

  it("mx_hosts() takes an address literal as its own host, and skips an MX that names an address", function()
    with_dns(function(srv)
      local r = assert(dns.new { servers = srv.address })
      -- RFC 5321 5.1: no DNS for a domain literal (c-ares was asked for "[127.0.0.2]" and failed)
      assert.same({ { name = "[127.0.0.2]", pref = 0, addrs = { "127.0.0.2" }, literal = true } },
        r:mx_hosts("[127.0.0.2]"))
      assert.same({ { name = "[IPv6:::1]", pref = 0, addrs = { "::1" }, literal = true } },
        r:mx_hosts("[IPv6:::1]"))
      assert.same({ "2001:db8::7" }, assert(r:mx_hosts("[ipv6:2001:db8::7]", { order = "ipv6-only" }))[1].addrs)
      local none, why, permanent = r:mx_hosts("[IPv6:::1]", { order = "ipv4-only" })
      assert.is_nil(none)
      assert.equal("5.4.4 [IPv6:::1] is an IPv6 address, and the order is ipv4-only", why)
      assert.is_true(permanent)
      none, why, permanent = r:mx_hosts("[x-tag:abc]")
      assert.is_nil(none)
      assert.equal("5.1.2 [x-tag:abc] is not an IPv4 or IPv6 address literal (RFC 5321 4.1.3)", why)
      assert.is_true(permanent)
      -- "MX 10 127.0.0.2.": no host; was a temporary failure, retried until max_age
      none, why, permanent = r:mx_hosts("mxip.test")
      assert.is_nil(none)
      assert.equal("5.4.4 the MX of mxip.test is an IP address, not a host name (RFC 5321 5.1)", why)
      assert.is_true(permanent)
      local hosts = assert(r:mx_hosts("mxipplus.test"))
      assert.same({ { "mx2.test", { "127.0.0.3" } } }, { { hosts[1].name, hosts[1].addrs } })
      r:close()
    end)
  end)

  it("mx_hosts() is temporary when DNS fails", function()
    H.run(function()
      local r = assert(dns.new { servers = "127.0.0.1:" .. H.free_port(), timeout = 0.3, tries = 1 })
      local none, why, permanent = r:mx_hosts("single.test")
      assert.is_nil(none)
      assert.matches("^4%.4%.3 ", why)
      assert.is_false(permanent)
      r:close()
    end)
  end)
end)

describe("MX routing", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-mx") end)
  after_each(function() H.rm_rf(dir) end)

  -- sinks on 127.0.0.2 and 127.0.0.3 (the fixture's mx1 and mx2) and ::1,
  -- all on one port, an MTA routing by MX to that port
  local function setup(srv, route_opts)
    local port = H.free_port()
    local sinks = {
      mx1 = H.sink({ "--host", "127.0.0.2", "--port", tostring(port) }),
      mx2 = H.sink({ "--host", "127.0.0.3", "--port", tostring(port) }),
      v6 = H.sink({ "--host", "::1", "--port", tostring(port) }),
    }
    local ro = { mx_port = port, timeouts = { connect = 2, greeting = 2 }, idle_timeout = "1s",
      routes = { ["sender.test"] = "127.0.0.2:" .. port } }
    for k, v in pairs(route_opts or {}) do ro[k] = v end
    local mta, inport = H.start_mta({}, function(m)
      m:use(require("moonpost.route").smtp(ro))
    end, { spool = { dir = dir .. "/spool", min_free = 0 }, dns = srv.address, queue = { retry = { "1s" } } })
    return mta, inport, sinks
  end

  local function stop_all(mta, sinks)
    H.stop_mta(mta)
    for _, s in pairs(sinks) do s.stop() end
  end

  local function count(sink, rcpt)
    local n = 0
    for _, m in ipairs(sink.messages()) do
      for _, r in ipairs(m.rcpts) do if r == rcpt then n = n + 1 end end
    end
    return n
  end

  it("delivers to the MX, to the next MX when the first does not answer, and to the domain without MX", function()
    with_dns(function(srv)
      local mta, port, sinks = setup(srv)
      assert.equal(250, (H.send(port, { to = { "a@single.test" } })))
      assert.equal(250, (H.send(port, { to = { "b@backup.test" } })))
      assert.equal(250, (H.send(port, { to = { "c@nomx.test" } })))
      assert.equal(250, (H.send(port, { to = { "d@v6only.test" } })))
      assert.is_true(H.wait_for(function()
        return count(sinks.mx1, "a@single.test") == 1 and count(sinks.mx2, "b@backup.test") == 1
          and count(sinks.mx1, "c@nomx.test") == 1 and count(sinks.v6, "d@v6only.test") == 1
      end, 20))
      stop_all(mta, sinks)
    end, 60)
  end)

  it("delivers to the MX of an internationalized domain (SMTPUTF8)", function()
    with_dns(function(srv)
      local mta, port, sinks = setup(srv)
      local p = H.connect(port)
      p:script([[
        S: 220
        C: EHLO x
        S: 250
        C: MAIL FROM:<a@sender.test> SMTPUTF8
        S: 250
        C: RCPT TO:<anna@bücher.test>
        S: 250
        C: DATA
        S: 354
      ]])
      p:send("Subject: idn\r\n\r\nhello\r\n.\r\n")
      p:expect(250)
      p:close()
      assert.is_true(H.wait_for(function() return count(sinks.mx1, "anna@bücher.test") == 1 end, 20))
      stop_all(mta, sinks)
    end, 60)
  end)

  it("names the implicit MX by the domain's DNS name, so however a recipient writes the domain it is one site",
    function()
      with_dns(function(srv)
        local r = assert(dns.new { servers = srv.address })
        assert.equal("nomx.test", assert(r:mx_hosts("NoMX.Test"))[1].name)
        assert.equal("xn--nmx-sna.test", assert(r:mx_hosts("nömx.test"))[1].name)
        r:close()
        local mta, port, sinks = setup(srv)
        assert.equal(250, (H.send(port, { to = { "a@nomx.test" } })))
        assert.equal(250, (H.send(port, { to = { "b@NOMX.TEST" } })))
        assert.is_true(H.wait_for(function()
          return count(sinks.mx1, "a@nomx.test") == 1 and count(sinks.mx1, "b@NOMX.TEST") == 1
        end, 20))
        local route
        for _, b in ipairs(mta.blocks) do if b.name == "route.smtp" then route = b end end
        local sites = {}
        for key in pairs(route.pools) do
          if key:find("^mx:") then sites[#sites + 1] = key end
        end
        assert.same({ "mx:nomx.test:" .. route.opts.mx_port }, sites)
        stop_all(mta, sinks)
      end, 60)
    end)

  it("spreads deliveries over MX hosts of the same preference", function()
    with_dns(function(srv)
      local mta, port, sinks = setup(srv, { max_messages_per_connection = 1 })
      for i = 1, 16 do assert.equal(250, (H.send(port, { to = { "t" .. i .. "@tie.test" } }))) end
      assert.is_true(H.wait_for(function() return #sinks.mx1.messages() + #sinks.mx2.messages() == 16 end, 20))
      assert.is_true(#sinks.mx1.messages() > 0 and #sinks.mx2.messages() > 0,
        #sinks.mx1.messages() .. " / " .. #sinks.mx2.messages())
      stop_all(mta, sinks)
    end, 60)
  end)

  it("bounces mail for a null MX (5.1.10) and a domain that does not exist (5.1.2) at once", function()
    with_dns(function(srv)
      local mta, port, sinks = setup(srv)
      assert.equal(250, (H.send(port, { from = "origin@sender.test", to = { "x@nullmx.test", "y@nope.test" } })))
      assert.is_true(H.wait_for(function() return count(sinks.mx1, "origin@sender.test") >= 1 end, 20))
      local statuses = {}
      for _, m in ipairs(sinks.mx1.messages()) do
        for s in m.data:gmatch("\r\nStatus: (%S+)") do statuses[#statuses + 1] = s end
      end
      table.sort(statuses)
      assert.same({ "5.1.10", "5.1.2" }, statuses)
      -- one attempt for the message (both bounced at once) and one for its DSN
      assert.equal(2, mta.queue.stats.attempts)
      stop_all(mta, sinks)
    end, 60)
  end)

  it("delivers to a domain literal's address, IPv4 or IPv6, on mx_port, and bounces an MX naming an address at once",
    function()
      with_dns(function(srv)
        local mta, port, sinks = setup(srv)
        assert.equal(250, (H.send(port, { to = { "lit4@[127.0.0.2]" } })))
        assert.equal(250, (H.send(port, { to = { "lit6@[IPv6:::1]" } })))
        assert.equal(250, (H.send(port, { from = "origin@sender.test", to = { "x@mxip.test" } })))
        -- before: "4.4.3 MX lookup for [127.0.0.2] failed: error", deferred until max_age
        assert.is_true(H.wait_for(function()
          return count(sinks.mx1, "lit4@[127.0.0.2]") == 1 and count(sinks.v6, "lit6@[IPv6:::1]") == 1
            and count(sinks.mx1, "origin@sender.test") == 1
        end, 20), H.log("lit") .. H.log("mxip"))
        assert.equal("", H.log("MX lookup for ["))
        local dsn
        for _, m in ipairs(sinks.mx1.messages()) do
          if m.rcpts[1] == "origin@sender.test" then dsn = H.parse_dsn(m.data) end
        end
        assert.equal("5.4.4", dsn.recipients[1]["Status"])
        assert.equal("smtp; 550 5.4.4 the MX of mxip.test is an IP address, not a host name (RFC 5321 5.1)",
          dsn.recipients[1]["Diagnostic-Code"])
        -- the literal's site is its address, as for a route to it
        local route
        for _, b in ipairs(mta.blocks) do if b.name == "route.smtp" then route = b end end
        local mxport = route.opts.mx_port
        assert.truthy(route.pools["[127.0.0.2]:" .. mxport])
        assert.truthy(route.pools["[::1]:" .. mxport])
        stop_all(mta, sinks)
      end, 60)
    end)

  it("defers when DNS fails, and delivers once it answers", function()
    H.run(function()
      local port = H.free_port()
      local sink = H.sink({ "--host", "127.0.0.2", "--port", tostring(port) })
      -- a resolver with no server yet: the MX lookup fails for now
      local dnsport = H.free_port()
      local mta, inport = H.start_mta({}, function(m)
        m:use(require("moonpost.route").smtp { mx_port = port })
      end, { spool = { dir = dir .. "/spool", min_free = 0 }, dns = { servers = "127.0.0.1:" .. dnsport,
        timeout = 0.3, tries = 1 }, queue = { retry = { "1s" } } })
      assert.equal(250, (H.send(inport, { to = { "late@single.test" } })))
      assert.is_true(H.wait_for(function() return H.log("MX lookup for single.test failed") ~= "" end, 10))
      assert.equal(0, #sink.messages())
      H.stop_mta(mta)
      sink.stop()
    end, 60)
  end)
end)
