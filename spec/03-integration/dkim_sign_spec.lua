-- DKIM signing in the pipeline: messages relayed through Moonpost carry
-- signatures that Debian's python3-dkim verifies, with the public keys
-- served by nsd on loopback. Keys are made by scripts/dkim-keygen.
local H = require "helpers"

local SHORT = { connect = 3, greeting = 3, ehlo = 3, mail = 3, rcpt = 3, data = 3, block = 3, done = 3 }

local verify = H.dkim_verify

-- keygen(dir, type, domain, selector) -> the TXT record line for the zone
local function keygen(dir, ktype, domain, selector, bits)
  local args = { "--type", ktype, "--domain", domain, "--selector", selector, "--dir", dir }
  if bits then
    args[#args + 1] = "--bits"
    args[#args + 1] = tostring(bits)
  end
  local code, out, err = H.exec(H.root .. "/scripts/dkim-keygen", args, { timeout = 60 })
  assert(code == 0, "dkim-keygen: " .. out .. err)
  return out
end

-- The tags of the first DKIM-Signature field of a message, unfolded.
local function tags(data)
  local v = data:match("^DKIM%-Signature:(.-)\r\n[^ \t]")
  assert(v, "no DKIM-Signature at the top")
  v = v:gsub("\r\n[ \t]+", " ")
  local t = {}
  for k, val in v:gmatch("%s*(%w+)%s*=%s*([^;]*)") do t[k] = val:gsub("%s+$", "") end
  return t
end

local function zone(records)
  return "$ORIGIN dkim.test.\n$TTL 300\n@ IN SOA ns.dkim.test. hostmaster.dkim.test. 1 3600 600 86400 60\n"
    .. "@ IN NS ns.dkim.test.\nns IN A 127.0.0.1\n" .. table.concat(records, "\n") .. "\n"
end

describe("DKIM signing in the pipeline", function()
  local dir, keys, dnsd, records
  setup(function()
    dir = H.tmpdir("moonpost-dkim")
    keys = dir .. "/dkim"
    records = {}
    H.run(function()
      records[#records + 1] = keygen(keys, "rsa", "customer.dkim.test", "rsa1", 2048)
      records[#records + 1] = keygen(keys, "ed25519", "ed.dkim.test", "ed1")
      records[#records + 1] = keygen(keys, "ed25519", "esp.dkim.test", "esp1")
      records[#records + 1] = keygen(keys, "rsa", "parent.dkim.test", "p1", 1024)
      records[#records + 1] = keygen(keys, "ed25519", "xn--bcher-kva.dkim.test", "idn1")
      dnsd = H.dns_server({ ["dkim.test"] = zone(records) })
    end)
  end)
  teardown(function()
    H.run(function() dnsd.stop() end)
    H.rm_rf(dir)
  end)

  -- An MTA that signs with these options and relays to the sink.
  local function signer(sink_port, dkim_opts, new_opts)
    return H.start_mta({}, function(m)
      m:use(require("moonpost.dkim").sign(dkim_opts))
      m:use(require("moonpost.route").smtp({ relay = "127.0.0.1:" .. sink_port, timeouts = SHORT, tls = "none" }))
    end, new_opts or { spool = { dir = dir .. "/spool-" .. math.random(1e9), min_free = 0 },
      queue = { retry = { "1s" }, max_age = "1h" } })
  end

  local function relay_one(sink, port, from, body, n)
    local c = H.send(port, { from = "bounce@esp.dkim.test", to = "rcpt@remote.test",
      body = "From: Someone <" .. from .. ">\r\nTo: rcpt@remote.test\r\nSubject: signed\r\n"
        .. "Date: Mon, 30 Nov 2026 18:00:00 +0000\r\nMessage-ID: <" .. math.random(1e9) .. "@x>\r\n\r\n"
        .. (body or "Hello,\r\nthis is signed.\r\n") })
    assert.equal(250, c)
    assert.is_true(H.wait_for(function() return #sink.messages() >= (n or 1) end, 10))
    return sink.messages()[n or 1].data
  end

  local function with_sink(fn)
    H.run(function()
      local sink = H.sink()
      local ok, err = pcall(fn, sink)
      sink.stop()
      if not ok then error(err, 0) end
    end, 90)
  end

  it("signs with RSA-2048 (relaxed/relaxed) by the From domain", function()
    with_sink(function(sink)
      local mta, port = signer(sink.port, { keys = keys })
      local data = relay_one(sink, port, "a@customer.dkim.test")
      local t = tags(data)
      assert.equal("rsa-sha256", t.a)
      assert.equal("relaxed/relaxed", t.c)
      assert.equal("customer.dkim.test", t.d)
      assert.equal("rsa1", t.s)
      assert.same({ true }, verify(data, dnsd.port))
      -- a body changed after signing fails
      local changed = data:gsub("this is signed", "this is forged")
      assert.same({ false }, verify(changed, dnsd.port))
      H.stop_mta(mta)
    end)
  end)

  it("signs with Ed25519 (RFC 8463)", function()
    with_sink(function(sink)
      local mta, port = signer(sink.port, { keys = keys })
      local data = relay_one(sink, port, "b@ed.dkim.test")
      assert.equal("ed25519-sha256", tags(data).a)
      assert.same({ true }, verify(data, dnsd.port))
      assert.same({ false }, verify((data:gsub("this is signed", "this was changed")), dnsd.port))
      H.stop_mta(mta)
    end)
  end)

  it("signs mail from an internationalized domain with its key, in A-labels (RFC 8616)", function()
    with_sink(function(sink)
      -- the key is found whether the From field writes the domain in U-labels or A-labels
      local mta, port = signer(sink.port, { keys = keys })
      for i, from in ipairs({ "b@BÜCHER.dkim.test", "c@xn--bcher-kva.dkim.test" }) do
        local data = relay_one(sink, port, from, nil, i)
        local t = tags(data)
        assert.equal("xn--bcher-kva.dkim.test", t.d, from)
        assert.equal("idn1", t.s, from)
        assert.same({ true }, verify(data, dnsd.port))
      end
      H.stop_mta(mta)
      -- a key table may name the domain in U-labels too
      mta, port = signer(sink.port, { keys = { ["bücher.dkim.test"] = { idn1 = keys .. "/xn--bcher-kva.dkim.test/idn1.pem" } },
        also = { domain = "Bücher.dkim.test", selector = "idn1" } })
      local data = relay_one(sink, port, "d@bücher.dkim.test", nil, 3)
      assert.equal("xn--bcher-kva.dkim.test", tags(data).d)
      assert.same({ true }, verify(data, dnsd.port))
      local n = 0
      for _ in data:gmatch("DKIM%-Signature:") do n = n + 1 end
      assert.equal(1, n, "the also signature is the From domain's own: signed once")
      H.stop_mta(mta)
    end)
  end)

  it("adds the ESP's signature to the customer's: two signatures, both verify", function()
    with_sink(function(sink)
      local mta, port = signer(sink.port, { keys = keys, also = { domain = "esp.dkim.test", selector = "esp1" } })
      local data = relay_one(sink, port, "a@customer.dkim.test")
      local _, n = data:gsub("DKIM%-Signature:", "")
      assert.equal(2, n)
      assert.truthy(data:find("d=customer.dkim.test", 1, true))
      assert.truthy(data:find("d=esp.dkim.test", 1, true))
      assert.same({ true, true }, verify(data, dnsd.port))
      assert.same({ false, false }, verify((data:gsub("this is signed", "this is forged")), dnsd.port))
      -- Moonpost's own verifier, with the keys looked up through its resolver
      local resolver = assert(require("moonpost.runtime.dns").new({ servers = dnsd.address }))
      local rdkim = require "moonpost.runtime.dkim"
      local r = assert(rdkim.verify(data, resolver))
      assert.equal(2, #r)
      assert.equal("pass", r[1].result)
      assert.equal("pass", r[2].result)
      r = assert(rdkim.verify((data:gsub("this is signed", "this is forged")), resolver))
      assert.equal("fail", r[1].result)
      resolver:close()
      H.stop_mta(mta)
    end)
  end)

  it("signs with simple/simple when asked, and oversigns From", function()
    with_sink(function(sink)
      local mta, port = signer(sink.port, { keys = keys, canon = "simple/simple" })
      local data = relay_one(sink, port, "a@customer.dkim.test")
      assert.equal("simple/simple", tags(data).c)
      assert.same({ true }, verify(data, dnsd.port))
      -- relaxed would forgive this; simple does not
      assert.same({ false }, verify((data:gsub("this is signed%.", "this is signed. ")), dnsd.port))
      -- a second From added in transit breaks the signature (From is oversigned)
      local h = data:match("^(.-\r\n)\r\n")
      local added = h .. "From: attacker@evil.test\r\n" .. data:sub(#h + 1)
      assert.same({ false }, verify(added, dnsd.port))
      H.stop_mta(mta)
    end)
  end)

  it("uses the closest parent domain's key, the fallback, or a select() function", function()
    with_sink(function(sink)
      local chosen = {}
      local mta, port = signer(sink.port, { keys = keys, fallback = { domain = "esp.dkim.test", selector = "esp1" },
        select = function(txn, _, from)
          chosen[#chosen + 1] = from
          if txn.sender.address == "custom@esp.dkim.test" then
            return { { domain = "ed.dkim.test", selector = "ed1" } }
          end
          return nil -- the default choice
        end })
      local data = relay_one(sink, port, "a@news.parent.dkim.test", nil, 1)
      assert.equal("parent.dkim.test", tags(data).d)
      assert.equal("p1", tags(data).s)
      assert.same({ true }, verify(data, dnsd.port))
      data = relay_one(sink, port, "a@unknown.example", nil, 2)
      assert.equal("esp.dkim.test", tags(data).d)
      assert.equal("esp1", tags(data).s)
      assert.same({ true }, verify(data, dnsd.port))
      assert.same({ "news.parent.dkim.test", "unknown.example" }, chosen)
      H.stop_mta(mta)
    end)
  end)

  it("stores the signature with the message: a restart without the signer still delivers it signed", function()
    H.run(function()
      local sdir = dir .. "/spool-restart"
      -- first: sign and spool, with no transport (the message stays queued)
      local m1, p1 = H.start_mta({}, function(m)
        m:use(require("moonpost.dkim").sign({ keys = keys }))
      end, { spool = { dir = sdir, min_free = 0 }, queue = { retry = { "1h" }, max_age = "1d" } })
      assert.equal(250, (H.send(p1, { to = "x@remote.test",
        body = "From: a@customer.dkim.test\r\nSubject: kept\r\n\r\nbody\r\n" })))
      H.stop_mta(m1)
      local sink = H.sink()
      local m2 = H.start_mta({}, function(m)
        m:use(require("moonpost.route").smtp({ relay = "127.0.0.1:" .. sink.port, timeouts = SHORT }))
      end, { spool = { dir = sdir, min_free = 0 }, queue = { retry = { "1s" }, max_age = "1d" } })
      local ok = H.wait_for(function() return #sink.messages() == 1 end, 10)
      local data = ok and sink.messages()[1].data
      H.stop_mta(m2)
      sink.stop()
      assert.is_true(ok)
      assert.equal("customer.dkim.test", tags(data).d)
      assert.same({ true }, verify(data, dnsd.port), data)
    end)
  end)

  it("answers 451 4.3.0 when a message cannot be signed, or sends it unsigned when told to", function()
    H.run(function()
      local mta, port = H.start_mta({}, function(m)
        m:use(require("moonpost.dkim").sign({ keys = keys,
          select = function() return { { domain = "customer.dkim.test", selector = "gone" } } end }))
      end)
      local c, e = H.send(port, { body = "From: a@customer.dkim.test\r\n\r\nx\r\n" })
      assert.equal(451, c)
      assert.equal("4.3.0", e)
      assert.truthy(H.log("DKIM signing failed: no key for customer.dkim.test selector gone") ~= "")
      H.stop_mta(mta)
      local got
      mta, port = H.start_mta({}, function(m)
        m:use(require("moonpost.dkim").sign({ keys = keys, on_error = "unsigned",
          select = function() return { { domain = "customer.dkim.test", selector = "gone" } } end }))
        m:on("smtp_server_message_received", function(_, msg) got = msg end)
      end)
      assert.equal(250, (H.send(port, { body = "From: a@customer.dkim.test\r\n\r\nx\r\n" })))
      H.stop_mta(mta)
      assert.truthy(got)
    end)
  end)

  it("reports bad keys at load with the file name, and reloads keys on mta:reload()", function()
    local dkim = require "moonpost.dkim"
    local bad = dir .. "/bad"
    os.execute("mkdir -p " .. bad .. "/broken.test")
    H.write(bad .. "/broken.test/s1.pem", "-----BEGIN PRIVATE KEY-----\nnot base64!\n-----END PRIVATE KEY-----\n")
    local ok, err = pcall(dkim.sign, { keys = bad })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("dkim.sign: field 'keys': " .. bad .. "/broken.test/s1.pem", 1, true), err)
    ok, err = pcall(dkim.sign, { keys = dir .. "/nonexistent" })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("cannot read the directory", 1, true), err)
    ok, err = pcall(dkim.sign, { keys = keys, also = { domain = "esp.dkim.test", selector = "nope" } })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("no key for esp.dkim.test selector nope", 1, true), err)
    -- a selector named for a domain must have its key there
    ok, err = pcall(dkim.sign, { keys = keys, selectors = { ["customer.dkim.test"] = "rsa9" } })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("dkim.sign: field 'selectors.customer.dkim.test': no key for "
      .. "customer.dkim.test selector rsa9", 1, true), err)
    ok, err = pcall(dkim.sign, { keys = keys, selectors = { ["nokeys.dkim.test"] = "s1" } })
    assert.is_false(ok)
    assert.truthy(tostring(err):find("no key for nokeys.dkim.test selector s1", 1, true), err)
    ok, err = pcall(dkim.sign, { keys = keys, selectors = { ["customer.dkim.test"] = "rsa1" } })
    assert.is_true(ok, err)

    H.run(function()
      local kdir = dir .. "/reload"
      os.execute("mkdir -p " .. kdir .. "/customer.dkim.test && cp " .. keys .. "/customer.dkim.test/rsa1.pem "
        .. kdir .. "/customer.dkim.test/")
      local got = {}
      local mta, port = H.start_mta({}, function(m)
        m:use(dkim.sign({ keys = kdir }))
        m:on("smtp_server_message_received", function() end)
        m:add_message_step(function(_, msg) got[#got + 1] = msg:tostring() end)
      end)
      assert.equal(250, (H.send(port, { body = "From: a@ed.dkim.test\r\n\r\nx\r\n" })))
      assert.is_nil(got[1]:find("DKIM-Signature", 1, true))
      os.execute("mkdir -p " .. kdir .. "/ed.dkim.test && cp " .. keys .. "/ed.dkim.test/ed1.pem "
        .. kdir .. "/ed.dkim.test/")
      assert.is_true(mta:reload())
      assert.equal(250, (H.send(port, { body = "From: a@ed.dkim.test\r\n\r\nx\r\n" })))
      assert.equal("ed25519-sha256", tags(got[2]).a)
      -- a bad key on reload keeps the old set
      H.write(kdir .. "/ed.dkim.test/bad.pem", "garbage\n")
      local rok, rerr = mta:reload()
      assert.is_nil(rok)
      assert.truthy(tostring(rerr):find("bad.pem", 1, true))
      assert.equal(250, (H.send(port, { body = "From: a@ed.dkim.test\r\n\r\nx\r\n" })))
      assert.equal("ed25519-sha256", tags(got[3]).a)
      H.stop_mta(mta)
    end)
  end)
end)

describe("moonpost.dkim.from_domain", function()
  local from_domain = require("moonpost.dkim").from_domain
  it("finds the first mailbox's domain through display names, comments and folding", function()
    assert.equal("example.com", from_domain("From: a@Example.COM\r\n"))
    assert.equal("example.com", from_domain("Subject: x\r\nfrom: \"Doe, John @ home\" <j@example.com>\r\n"))
    assert.equal("example.org", from_domain("From: (comment @ evil.test) Jane\r\n <jane@example.org>\r\nTo: x@y\r\n"))
    assert.equal("a.example", from_domain("From: x@a.example, y@b.example\r\n"))
    assert.is_nil(from_domain("Subject: no from\r\n"))
    assert.is_nil(from_domain("From: undisclosed\r\n"))
    assert.is_nil(from_domain("X-From: a@example.com\r\n"))
    -- behind a Received field that says "from", and past a continuation line
    assert.equal("b.example", from_domain("Received: from client.test (client.test [127.0.0.1])\r\n"
      .. "\tby mx.test (Moonpost) with ESMTP id 1\r\n\tfrom: x@evil.test; Mon, 30 Nov 2026 18:00:00 +0000\r\n"
      .. "Subject: s\r\n From: y@evil.test\r\nfROM : a@B.example.\r\n"))
    assert.equal("b.example", from_domain("From: a@b.example \r\n"))
    assert.equal("b.example", from_domain("From: x <a@b.example.>\r\n"))
    assert.equal("b.example", from_domain("From: <a@b.example\r\n"))
    assert.equal("c.example", from_domain("From: \"a@b\" <x@y@c.example>\r\n"))
    assert.is_nil(from_domain("From: a@b c\r\n"))
    assert.is_nil(from_domain("From: a@\r\n"))
    assert.is_nil(from_domain("From: a@-b.example\r\n"))
    -- an internationalized domain, by its A-labels
    assert.equal("xn--bcher-kva.example", from_domain("From: a@BÜCHER.example\r\n"))
    assert.equal("xn--bcher-kva.example", from_domain("From: a@xn--bcher-kva.example\r\n"))
    assert.is_nil(from_domain("From: a@b\255.example\r\n"))
  end)
end)
