-- The resolver against a server that answers what the spec chooses
-- (spec/tools/hostile_dns.py, H.hostile_dns): truncated answers, answers
-- with another ID, malformed ones, and records for names nobody asked for.
local H = require "helpers"
local dns = require "moonpost.runtime.dns"

local function with_hostile(script, fn)
  H.run(function()
    local srv = H.hostile_dns(script)
    local r = assert(dns.new { servers = srv.address, timeout = 0.5, tries = 2 })
    local ok, err = pcall(fn, r, srv)
    r:close()
    srv.stop()
    if not ok then error(err, 0) end
  end, 60)
end

local function protos(srv, name)
  local out = {}
  for _, q in ipairs(srv.queries()) do
    if q.name == name then out[#out + 1] = q.proto end
  end
  return out
end

describe("moonpost.runtime.dns against a hostile server", function()
  it("asks again over TCP when the UDP answer is truncated", function()
    with_hostile({ ["tc.test A"] = { tc = true, answer = { "tc.test. 300 IN A 127.0.0.5" } } }, function(r, srv)
      local recs = assert(r:query("tc.test", "A"))
      assert.same({ "127.0.0.5" }, { recs[1].data })
      assert.same({ "udp", "tcp" }, protos(srv, "tc.test"))
    end)
  end)

  it("ignores an answer with another ID", function()
    with_hostile({ ["wid.test A"] = { wrong_id = true, bogus = { "wid.test. 300 IN A 192.0.2.66" },
      answer = { "wid.test. 300 IN A 127.0.0.5" } } }, function(r)
      local recs = assert(r:query("wid.test", "A"))
      assert.same({ "127.0.0.5" }, { recs[1].data })
    end)
  end)

  it("takes a malformed answer (a compression loop) as a temporary failure", function()
    -- header after the ID, the question loop.test MX, then an MX whose
    -- owner and target are pointers to themselves
    local q = "046c6f6f70" .. "0474657374" .. "00" .. "000f0001"
    local raw = "81800001000100000000" .. q .. "c01b000f00010000012c0004000ac01b"
    with_hostile({ ["loop.test MX"] = { raw_hex = raw } }, function(r)
      local none, err = r:query("loop.test", "MX")
      assert.is_nil(none)
      assert.equal("error", err)
      local hosts, why, permanent = r:mx_hosts("loop.test")
      assert.is_nil(hosts)
      assert.matches("^4%.4%.3 ", why)
      assert.is_false(permanent)
    end)
  end)

  it("names a SERVFAIL and a REFUSED from the one server as such: temporary, not 'error'", function()
    with_hostile({ ["sf.test MX"] = { rcode = "SERVFAIL" }, ["rf.test MX"] = { rcode = "REFUSED" } }, function(r)
      local none, err = r:query("sf.test", "MX")
      assert.is_nil(none)
      assert.equal("servfail", err)
      none, err = r:query("rf.test", "MX")
      assert.is_nil(none)
      assert.equal("refused", err)
      local hosts, why, permanent = r:mx_hosts("sf.test")
      assert.is_nil(hosts)
      assert.equal("4.4.3 MX lookup for sf.test failed: servfail", why)
      assert.is_false(permanent)
    end)
  end)

  it("with two servers, asks the second when the first answers SERVFAIL", function()
    H.run(function()
      local bad = H.hostile_dns({ ["two.test A"] = { rcode = "SERVFAIL" } })
      local good = H.hostile_dns({ ["two.test A"] = { answer = { "two.test. 300 IN A 127.0.0.9" } } })
      local r = assert(dns.new { servers = bad.address .. "," .. good.address, timeout = 0.5, tries = 2 })
      local recs, err = r:query("two.test", "A")
      r:close()
      bad.stop()
      good.stop()
      assert(recs, err)
      assert.same({ "127.0.0.9" }, { recs[1].data })
    end, 60)
  end)

  it("takes only the records of the name asked for, or of the aliases it leads to", function()
    with_hostile({
      -- records for another name than the question's
      ["other.test MX"] = { answer = { "evil.test. 300 IN MX 10 mx.evil.test." } },
      ["mx.evil.test A"] = { answer = { "mx.evil.test. 300 IN A 127.0.0.66" } },
      ["other.test A"] = { answer = { "other.test. 300 IN A 127.0.0.5", "evil.test. 300 IN A 127.0.0.66" } },
      -- an alias, then the records of its target: those are the name's
      ["alias.test MX"] = { answer = { "alias.test. 300 IN CNAME real.test.", "real.test. 300 IN MX 10 mx.real.test.",
        "evil.test. 300 IN MX 5 mx.evil.test." } },
      ["mx.real.test A"] = { answer = { "mx.real.test. 300 IN A 127.0.0.7" } },
      -- names in another letter case are the same names
      ["case.test MX"] = { answer = { "CASE.Test. 300 IN CNAME Real2.TEST.", "real2.test. 300 IN MX 10 mx.real.test." } },
    }, function(r)
      local cmx = assert(r:query("case.test", "MX"))
      assert.equal(1, #cmx)
      assert.equal("mx.real.test", cmx[1].data)
      assert.same({ nil, "nodata" }, { r:query("other.test", "MX") })
      local a = assert(r:query("other.test", "A"))
      assert.same({ { "other.test", "127.0.0.5" } }, { { a[1].name, a[1].data } }, #a .. " records")
      -- no MX (of its own): the domain itself, not the host named for evil.test
      local hosts = assert(r:mx_hosts("other.test", { order = "ipv4-only" }))
      assert.same({ { "other.test", { "127.0.0.5" } } }, { { hosts[1].name, hosts[1].addrs } })
      local mx = assert(r:query("alias.test", "MX"))
      assert.same({ { "real.test", "mx.real.test" } }, { { mx[1].name, mx[1].data } }, #mx .. " records")
      hosts = assert(r:mx_hosts("alias.test", { order = "ipv4-only" }))
      assert.same({ "mx.real.test" }, { hosts[1].name, hosts[2] and hosts[2].name })
    end)
  end)

  it("looks up the addresses of a domain's MX hosts all at once", function()
    with_hostile({
      ["many.test MX"] = { answer = { "many.test. 300 IN MX 10 a.many.test.", "many.test. 300 IN MX 20 b.many.test.",
        "many.test. 300 IN MX 30 c.many.test." } },
      -- two hosts whose addresses never come (the server says nothing)
      ["a.many.test A"] = { drop = true },
      ["b.many.test A"] = { drop = true },
      ["c.many.test A"] = { answer = { "c.many.test. 300 IN A 127.0.0.9" } },
    }, function(r, srv)
      local hosts = assert(r:mx_hosts("many.test", { order = "ipv4-only" }))
      assert.equal(1, #hosts)
      assert.equal("c.many.test", hosts[1].name)
      assert.same({ "127.0.0.9" }, hosts[1].addrs)
      -- c.many.test was asked before a.many.test's lookup gave up (its
      -- second try): one after another, it came after both had timed out
      local c_at, a_tries, a_second = nil, 0, nil
      for k, q in ipairs(srv.queries()) do
        if q.name == "c.many.test" and not c_at then c_at = k end
        if q.name == "a.many.test" then
          a_tries = a_tries + 1
          if a_tries == 2 then a_second = k end
        end
      end
      assert.is_true(c_at < a_second, "c.many.test was asked only after a.many.test had been tried twice")
      assert.equal(2, a_tries)
    end)
  end)
end)
