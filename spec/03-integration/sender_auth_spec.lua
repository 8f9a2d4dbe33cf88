-- moonpost.sender_auth in the pipeline: SPF at MAIL FROM, DKIM and DMARC at the end
-- of data, over real SMTP sessions from several loopback addresses, with
-- the records served by nsd. Signatures are made by Debian's python3-dkim
-- (an independent signer), and the Authentication-Results field is read
-- back with Debian's python3-authres (an independent RFC 8601 parser).
local H = require "helpers"

local ZONE = [[
$ORIGIN auth.test.
$TTL 300
@ IN SOA ns.auth.test. hostmaster.auth.test. 1 3600 600 86400 60
@ IN NS ns.auth.test.
ns IN A 127.0.0.1
good IN TXT "v=spf1 ip4:127.0.0.5 -all"
_dmarc.good IN TXT "v=DMARC1; p=reject"
soft IN TXT "v=spf1 ip4:127.0.0.5 ~all"
lax IN TXT "v=spf1 ip4:127.0.0.5 -all"
_dmarc.lax IN TXT "v=DMARC1; p=quarantine"
helo IN TXT "v=spf1 ip4:127.0.0.5 -all"
broken IN TXT "v=spf1 ip4:127.0.0.5 frob -all"
; a record that depends on the local part: only a@verp.auth.test may send
verp IN TXT "v=spf1 exists:%%{l}.ok.auth.test -all"
a.ok IN A 127.0.0.2
%s
]]

-- another organizational domain, whose SPF lets 127.0.0.6 send: SPF passes
-- for it, but it is not aligned with any From domain under auth.test
local ELSEWHERE = [[
$ORIGIN elsewhere.test.
$TTL 300
@ IN SOA ns.auth.test. hostmaster.auth.test. 1 3600 600 86400 60
@ IN NS ns.auth.test.
@ IN TXT "v=spf1 ip4:127.0.0.6 -all"
]]

-- A-R fields as python3-authres parses them: for each field, its
-- authserv-id and its results { method, result, reason, properties "ptype.property" = value }
local AUTHRES = [==[
import sys, json, email, authres
msg = email.message_from_bytes(sys.stdin.buffer.read())
out = []
for v in msg.get_all("Authentication-Results") or []:
    h = authres.AuthenticationResultsHeader.parse("Authentication-Results: " + " ".join(v.split()))
    rs = []
    for r in h.results:
        props = {}
        for p in r.properties:
            props[p.type + "." + p.name] = p.value
        rs.append({"method": r.method, "result": r.result, "props": props})
    out.append({"id": h.authserv_id, "results": rs})
print(json.dumps(out))
]==]

local function authres(data)
  local code, out, err = H.exec(H.python, { "-c", AUTHRES }, { stdin = data, timeout = 30 })
  assert(code == 0, "python3-authres: " .. out .. err)
  return require("cjson").decode(out)
end

-- the result of method in the first A-R field (and that result's properties)
local function result_of(fields, method)
  for _, r in ipairs(fields[1].results) do
    if r.method == method then return r.result, r.props end
  end
  return nil
end

-- DKIM-sign data with python3-dkim (key file, domain, selector)
local SIGN = [==[
import sys, dkim
key = open(sys.argv[1], "rb").read()
msg = sys.stdin.buffer.read()
sig = dkim.sign(msg, sys.argv[3].encode(), sys.argv[2].encode(), key, include_headers=[b"from", b"to", b"subject"],
    length=len(sys.argv) > 4)
sys.stdout.buffer.write(sig + msg)
]==]

local function sign(data, keyfile, domain, selector, with_length)
  local code, out, err = H.exec(H.python, { "-c", SIGN, keyfile, domain, selector, with_length and "l" or nil },
    { stdin = data, timeout = 30 })
  assert(code == 0, "python3-dkim sign: " .. out .. err)
  return out
end

local function message(from, extra)
  if from:find("^[^<,%s]+$") then from = "Sender <" .. from .. ">" end
  return (extra or "") .. "From: " .. from .. "\r\nTo: rcpt@mx.test\r\nSubject: auth\r\n"
    .. "Message-ID: <" .. math.random(1e9) .. "@auth.test>\r\n\r\nHello.\r\n"
end

-- One session from address bind: EHLO helo, MAIL FROM sender, one RCPT,
-- DATA. -> { code, enhanced, text, at = "mail" | "rcpt" | "data" | "end" }
local function session(port, bind, o)
  local p = assert(H.connect(port, "127.0.0.1", 10, bind))
  p:expect(220)
  p:cmd("EHLO " .. (o.helo or "client.auth.test"))
  p:expect(250)
  local function step(line, want, at)
    p:cmd(line)
    local c, e, t = p:reply()
    if c ~= want then return { code = c, enhanced = e, text = t, at = at } end
  end
  local r = step("MAIL FROM:<" .. o.from .. ">", 250, "mail") or step("RCPT TO:<rcpt@mx.test>", 250, "rcpt")
    or step("DATA", 354, "data")
  if not r then
    p:send((o.data:gsub("\r\n%.", "\r\n..")) .. ".\r\n")
    local c, e, t = p:reply()
    r = { code = c, enhanced = e, text = t, at = "end" }
  end
  p:cmd("QUIT")
  p:close()
  return r
end

describe("moonpost.sender_auth", function()
  local dir, dnsd, key
  setup(function()
    dir = H.tmpdir("moonpost-auth")
    H.run(function()
      local code, out, err = H.exec(H.root .. "/scripts/dkim-keygen", { "--type", "rsa", "--bits", "1024",
        "--domain", "good.auth.test", "--selector", "s1", "--dir", dir .. "/dkim" }, { timeout = 60 })
      assert(code == 0, out .. err)
      key = dir .. "/dkim/good.auth.test/s1.pem"
      -- a zone nsd cannot load: it answers SERVFAIL for the names in it
      dnsd = H.dns_server({ ["auth.test"] = ZONE:format(out), ["dead.auth.test."] = "this is no zone file\n",
        ["elsewhere.test."] = ELSEWHERE })
    end)
  end)
  teardown(function()
    H.run(function() dnsd.stop() end)
    H.rm_rf(dir)
  end)

  -- An MTA with the block (opts) that keeps each accepted message's text.
  -- An inbound MX: mail for mx.test from anyone; 127.0.0.7 may relay (the
  -- default networks would make every loopback client a relay client).
  local MX = { local_domains = { "mx.test" }, relay = { networks = { "127.0.0.7/32" } } }
  local function with_mta(opts, fn)
    H.run(function()
      local got = {}
      local mta, port = H.start_mta(MX, function(m)
        m:use(require("moonpost.sender_auth").check(opts))
        m:on("smtp_server_message_received", function(txn, msg)
          got[#got + 1] = { data = msg:tostring(), results = txn.auth_results }
        end)
      end, { dns = { servers = dnsd.address, timeout = 1, tries = 1 } })
      local ok, err = pcall(fn, port, got, mta)
      H.stop_mta(mta)
      if not ok then error(err, 0) end
    end)
  end

  it("records SPF, DKIM and DMARC passes in an Authentication-Results field", function()
    with_mta({}, function(port, got, mta)
      local r = session(port, "127.0.0.5", { from = "bounce@good.auth.test",
        data = sign(message("a@good.auth.test"), key, "good.auth.test", "s1") })
      assert.same({ 250, "end" }, { r.code, r.at })
      local f = authres(got[1].data)
      assert.equal(1, #f)
      assert.equal("mx.test", f[1].id)
      local spf, sp = result_of(f, "spf")
      assert.equal("pass", spf)
      assert.equal("bounce@good.auth.test", sp["smtp.mailfrom"])
      local dk, dp = result_of(f, "dkim")
      assert.equal("pass", dk)
      assert.equal("good.auth.test", dp["header.d"])
      assert.equal("s1", dp["header.s"])
      local dm, mp = result_of(f, "dmarc")
      assert.equal("pass", dm)
      assert.equal("good.auth.test", mp["header.from"])
      -- the field is on top, above the Received header
      assert.truthy(got[1].data:find("^Authentication%-Results: mx%.test;"))
      assert.equal("pass", got[1].results.dmarc.result)
      local text = require("moonpost.metrics").render(mta)
      for _, m in ipairs({ "spf", "dkim", "dmarc" }) do
        assert.truthy(text:find('sender_auth_results_total{method="' .. m .. '",result="pass"} 1', 1, true), m)
      end
    end)
  end)

  it("refuses at MAIL FROM what SPF fails, with spf_fail = reject (RFC 7372 codes)", function()
    with_mta({ spf_fail = "reject" }, function(port, got)
      local r = session(port, "127.0.0.6", { from = "bounce@good.auth.test", data = message("a@good.auth.test") })
      assert.same({ 550, "5.7.23", "mail" }, { r.code, r.enhanced, r.at })
      -- a softfail is let through unless spf_softfail says otherwise
      r = session(port, "127.0.0.6", { from = "bounce@soft.auth.test", data = message("a@soft.auth.test") })
      assert.same({ 250, "end" }, { r.code, r.at })
      assert.equal("softfail", result_of(authres(got[1].data), "spf"))
    end)
  end)

  it("refuses a permerror or defers a temperror only when told to", function()
    with_mta({ spf_permerror = "reject", spf_temperror = "tempfail" }, function(port)
      local r = session(port, "127.0.0.5", { from = "a@broken.auth.test", data = message("a@broken.auth.test") })
      assert.same({ 550, "5.7.24", "mail" }, { r.code, r.enhanced, r.at })
      r = session(port, "127.0.0.5", { from = "a@x.dead.auth.test", data = message("a@x.dead.auth.test") })
      assert.same({ 451, "4.7.24", "mail" }, { r.code, r.enhanced, r.at })
    end)
    with_mta({}, function(port, got)
      local r = session(port, "127.0.0.5", { from = "a@broken.auth.test", data = message("a@broken.auth.test") })
      assert.same({ 250, "end" }, { r.code, r.at })
      assert.equal("permerror", result_of(authres(got[1].data), "spf"))
    end)
  end)

  it("applies the From domain's DMARC policy with dmarc = enforce", function()
    with_mta({ dmarc = "enforce" }, function(port, got)
      -- SPF fails, no signature: p=reject
      local r = session(port, "127.0.0.6", { from = "bounce@good.auth.test", data = message("a@good.auth.test") })
      assert.same({ 550, "5.7.1", "end" }, { r.code, r.enhanced, r.at })
      assert.truthy(r.text:find("good.auth.test", 1, true))
      -- SPF passes for another domain (not aligned); the aligned signature passes: DMARC pass
      r = session(port, "127.0.0.6", { from = "bounce@elsewhere.test",
        data = sign(message("a@good.auth.test"), key, "good.auth.test", "s1") })
      assert.same({ 250, "end" }, { r.code, r.at })
      local f = authres(got[#got].data)
      assert.equal("pass", result_of(f, "spf"))
      assert.equal("pass", result_of(f, "dmarc"))
      -- the same with the body changed after signing: DKIM fails, so does DMARC
      local signed = sign(message("a@good.auth.test"), key, "good.auth.test", "s1")
      r = session(port, "127.0.0.6", { from = "bounce@elsewhere.test", data = signed:gsub("Hello", "Jello") })
      assert.same({ 550, "5.7.1", "end" }, { r.code, r.enhanced, r.at })
      -- p=quarantine is accepted and marked, unless dmarc_quarantine = reject
      local n = #got
      r = session(port, "127.0.0.6", { from = "bounce@elsewhere.test", data = message("a@lax.auth.test") })
      assert.same({ 250, "end" }, { r.code, r.at })
      assert.equal(n + 1, #got)
      assert.equal("fail", result_of(authres(got[#got].data), "dmarc"))
      assert.equal("quarantine", got[#got].results.dmarc.disposition)
    end)
    with_mta({ dmarc = "enforce", dmarc_quarantine = "reject" }, function(port)
      local r = session(port, "127.0.0.6", { from = "bounce@elsewhere.test", data = message("a@lax.auth.test") })
      assert.same({ 550, "5.7.1", "end" }, { r.code, r.enhanced, r.at })
    end)
  end)

  it("only records a DMARC failure with dmarc = check", function()
    with_mta({}, function(port, got)
      local r = session(port, "127.0.0.6", { from = "bounce@good.auth.test", data = message("a@good.auth.test") })
      assert.same({ 250, "end" }, { r.code, r.at })
      local f = authres(got[1].data)
      assert.equal("fail", result_of(f, "spf"))
      assert.equal("none", result_of(f, "dkim"))
      assert.equal("fail", result_of(f, "dmarc"))
      assert.equal("reject", got[1].results.dmarc.disposition)
    end)
  end)

  it("checks the HELO name for the null sender", function()
    with_mta({}, function(port, got)
      local r = session(port, "127.0.0.5", { from = "", helo = "helo.auth.test", data = message("a@helo.auth.test") })
      assert.same({ 250, "end" }, { r.code, r.at })
      local spf, props = result_of(authres(got[1].data), "spf")
      assert.equal("pass", spf)
      assert.equal("helo.auth.test", props["smtp.helo"])
    end)
  end)

  it("checks the HELO identity as well, once per session, and refuses its fail only when told to", function()
    -- helo.auth.test lets only 127.0.0.5 send; elsewhere.test lets 127.0.0.6
    local function helo_results(f)
      local out = {}
      for _, r in ipairs(f[1].results) do
        if r.method == "spf" then out[#out + 1] = r.result .. " " .. (r.props["smtp.helo"] or r.props["smtp.mailfrom"]) end
      end
      return out
    end
    with_mta({}, function(port, got, mta)
      for _ = 1, 2 do
        local r = session(port, "127.0.0.6", { from = "bounce@elsewhere.test", helo = "helo.auth.test",
          data = message("a@elsewhere.test") })
        assert.same({ 250, "end" }, { r.code, r.at })
      end
      assert.same({ "pass bounce@elsewhere.test", "fail helo.auth.test" }, helo_results(authres(got[1].data)))
      assert.equal("fail", got[2].results.spf_helo.result)
      assert.equal("pass", got[2].results.spf.result)
      local text = require("moonpost.metrics").render(mta)
      assert.truthy(text:find('sender_auth_results_total{method="spf_helo",result="fail"} 2', 1, true))
    end)
    with_mta({ spf_helo_fail = "reject" }, function(port)
      -- for the null sender the HELO identity is the one MAIL FROM checks
      local r0 = session(port, "127.0.0.6", { from = "", helo = "helo.auth.test", data = message("a@elsewhere.test") })
      assert.same({ 550, "5.7.23", "mail" }, { r0.code, r0.enhanced, r0.at })
      local r = session(port, "127.0.0.6", { from = "bounce@elsewhere.test", helo = "helo.auth.test",
        data = message("a@elsewhere.test") })
      assert.same({ 550, "5.7.23", "mail" }, { r.code, r.enhanced, r.at })
      assert.truthy(r.text:find("HELO", 1, true))
      r = session(port, "127.0.0.5", { from = "bounce@elsewhere.test", helo = "helo.auth.test",
        data = message("a@elsewhere.test") })
      -- from .5 the HELO passes; the MAIL FROM's fail is accepted (spf_fail)
      assert.same({ 250, "end" }, { r.code, r.at })
    end)
    with_mta({ spf_helo = false }, function(port, got)
      local r = session(port, "127.0.0.6", { from = "bounce@elsewhere.test", helo = "helo.auth.test",
        data = message("a@elsewhere.test") })
      assert.same({ 250, "end" }, { r.code, r.at })
      assert.same({ "pass bounce@elsewhere.test" }, helo_results(authres(got[1].data)))
      assert.is_nil(got[1].results.spf_helo)
    end)
  end)

  it("removes forged fields that claim its authserv-id, keeps the others", function()
    with_mta({}, function(port, got)
      local forged = "Authentication-Results: MX.test; dmarc=pass header.from=good.auth.test\r\n"
        .. "Authentication-Results: upstream.example; spf=pass smtp.mailfrom=x@upstream.example\r\n"
      local r = session(port, "127.0.0.6", { from = "bounce@good.auth.test", data = message("a@good.auth.test", forged) })
      assert.same({ 250, "end" }, { r.code, r.at })
      local f = authres(got[1].data)
      assert.equal(2, #f)
      assert.equal("mx.test", f[1].id)
      assert.equal("fail", result_of(f, "dmarc"))
      assert.equal("upstream.example", f[2].id)
    end)
  end)

  it("leaves the mail of relay clients alone unless check_relay is set", function()
    with_mta({ spf_fail = "reject", dmarc = "enforce" }, function(port, got)
      local r = session(port, "127.0.0.7", { from = "bounce@good.auth.test", data = message("a@good.auth.test") })
      assert.same({ 250, "end" }, { r.code, r.at })
      assert.falsy(got[1].data:find("Authentication-Results", 1, true))
      assert.is_true(got[1].results.skipped)
    end)
    with_mta({ spf_fail = "reject", check_relay = true }, function(port)
      local r = session(port, "127.0.0.7", { from = "bounce@good.auth.test", data = message("a@good.auth.test") })
      assert.same({ 550, "5.7.23", "mail" }, { r.code, r.enhanced, r.at })
    end)
  end)

  it("finds the authserv-id of a forged field behind comments and quotes, and always removes it", function()
    local forged = "Authentication-Results: (checked) mx.test; dmarc=pass header.from=good.auth.test\r\n"
      .. 'Authentication-Results: "MX.test" (x); spf=pass smtp.mailfrom=a@good.auth.test\r\n'
      .. "Authentication-Results: (mx.test) upstream.example; spf=pass smtp.mailfrom=x@upstream.example\r\n"
    local function ids(data)
      local out = {}
      for _, f in ipairs(authres(data)) do out[#out + 1] = f.id end
      return out
    end
    with_mta({}, function(port, got)
      local r = session(port, "127.0.0.6", { from = "bounce@good.auth.test", data = message("a@good.auth.test", forged) })
      assert.same({ 250, "end" }, { r.code, r.at })
      assert.same({ "mx.test", "upstream.example" }, ids(got[1].data))
      assert.equal("fail", result_of(authres(got[1].data), "dmarc"))
    end)
    -- without a field of its own, and for a relay client it does not check
    with_mta({ header = false }, function(port, got)
      local r = session(port, "127.0.0.6", { from = "bounce@good.auth.test", data = message("a@good.auth.test", forged) })
      assert.same({ 250, "end" }, { r.code, r.at })
      r = session(port, "127.0.0.7", { from = "bounce@good.auth.test", data = message("a@good.auth.test", forged) })
      assert.same({ 250, "end" }, { r.code, r.at })
      assert.is_true(got[2].results.skipped)
      for i = 1, 2 do assert.same({ "upstream.example" }, ids(got[i].data)) end
    end)
  end)

  it("keeps the field printable and its lines short whatever the reasons say", function()
    local sa = require("moonpost.sender_auth")
    -- quotes first: escaping doubles them, the bound must hold after it
    local long = ('"'):rep(400) .. ("\200\1x(y)\\"):rep(300)
    local field = sa.ar_field("mx.test", {
      spf = { result = "permerror", reason = long, via = "helo", domain = "h" .. long },
      dkim = { { result = "fail", reason = long, domain = long, selector = long, header_b = "abc" } },
      dmarc = { result = "permerror", reason = long, domain = long },
    })
    assert.falsy(field:find("[^\32-\126\r\n\t]"))
    for line in field:gmatch("[^\n]*") do assert.is_true(#line <= 998, #line) end
    local f
    H.run(function() f = authres(field .. "From: a@b.test\r\n\r\nx\r\n") end)
    assert.equal("mx.test", f[1].id)
    assert.same({ "spf", "dkim", "dmarc" }, { f[1].results[1].method, f[1].results[2].method, f[1].results[3].method })
  end)

  it("checks each From domain and applies the strictest policy", function()
    with_mta({ dmarc = "enforce" }, function(port, got)
      -- SPF passes for elsewhere.test (no DMARC record); good.auth.test says
      -- p=reject and nothing aligned with it passed: refused whichever
      -- way the second author is written
      for _, from in ipairs({ "a@elsewhere.test, b@good.auth.test", "<b@good.auth.test> <a@elsewhere.test>" }) do
        local r = session(port, "127.0.0.6", { from = "bounce@elsewhere.test", data = message(from) })
        assert.same({ 550, "5.7.1", "end" }, { r.code, r.enhanced, r.at }, from)
        assert.truthy(r.text:find("good.auth.test", 1, true))
      end
      -- two From fields likewise
      local r = session(port, "127.0.0.6", { from = "bounce@elsewhere.test",
        data = message("a@elsewhere.test", "From: b@good.auth.test\r\n") })
      assert.same({ 550, "5.7.1", "end" }, { r.code, r.enhanced, r.at })
      -- authors of domains without a DMARC record: nothing to apply
      r = session(port, "127.0.0.6", { from = "bounce@elsewhere.test", data = message("a@elsewhere.test, c@elsewhere.test") })
      assert.same({ 250, "end" }, { r.code, r.at })
      assert.equal("none", got[#got].results.dmarc.result)
      -- past 8 author domains nothing is evaluated: refused under enforce,
      -- or else they would be a way around the policy
      local many = {}
      for i = 1, 9 do many[i] = "a@d" .. i .. ".elsewhere.test" end
      many[10] = "b@good.auth.test"
      r = session(port, "127.0.0.6", { from = "bounce@elsewhere.test", data = message(table.concat(many, ", ")) })
      assert.same({ 550, "5.7.1", "end" }, { r.code, r.enhanced, r.at })
      assert.truthy(r.text:find("too many author domains", 1, true))
      -- an author whose domain cannot be read (a stray byte a reader may
      -- not see), alone or beside another author, or no From at all
      for _, from in ipairs({ "a@good.auth.test\1", "a@good.auth.test\194\160, x@elsewhere.test" }) do
        r = session(port, "127.0.0.6", { from = "bounce@elsewhere.test", data = message(from) })
        assert.same({ 550, "5.7.1", "end" }, { r.code, r.enhanced, r.at }, from)
        assert.truthy(r.text:find("Cannot check the DMARC policy", 1, true))
      end
      r = session(port, "127.0.0.6", { from = "bounce@elsewhere.test",
        data = "To: rcpt@mx.test\r\nSubject: no From\r\n\r\nHello.\r\n" })
      assert.same({ 550, "5.7.1", "end" }, { r.code, r.enhanced, r.at })
      assert.truthy(r.text:find("no From header", 1, true))
    end)
  end)

  it("defers with 451 4.4.3 when the DMARC record cannot be looked up, if told to", function()
    with_mta({ dmarc = "enforce", dmarc_temperror = "tempfail" }, function(port)
      local r = session(port, "127.0.0.6", { from = "bounce@elsewhere.test", data = message("a@x.dead.auth.test") })
      assert.same({ 451, "4.4.3", "end" }, { r.code, r.enhanced, r.at })
    end)
  end)

  it("gives DMARC no pass from a signature whose l= leaves body content unsigned", function()
    local signed, appended
    with_mta({ dmarc = "enforce" }, function(port, got)
      signed = sign(message("a@good.auth.test"), key, "good.auth.test", "s1", true)
      appended = signed .. "Appended after signing.\r\n"
      -- l= covering the whole body: a pass
      local r = session(port, "127.0.0.6", { from = "bounce@elsewhere.test", data = signed })
      assert.same({ 250, "end" }, { r.code, r.at })
      assert.equal("pass", got[1].results.dkim[1].result)
      r = session(port, "127.0.0.6", { from = "bounce@elsewhere.test", data = appended })
      assert.same({ 550, "5.7.1", "end" }, { r.code, r.enhanced, r.at })
    end)
    with_mta({ dmarc = "enforce", dkim_body_length = "accept" }, function(port, got)
      local r = session(port, "127.0.0.6", { from = "bounce@elsewhere.test", data = appended })
      assert.same({ 250, "end" }, { r.code, r.at })
      assert.equal("pass", got[1].results.dmarc.result)
    end)
  end)

  it("bounds the SPF checks of one session and answers repeats from the first", function()
    -- transactions of one session: MAIL FROM each sender, then RSET
    local function senders(port, list)
      local p = assert(H.connect(port, "127.0.0.1", 10, "127.0.0.6"))
      p:expect(220)
      p:cmd("EHLO client.auth.test")
      p:expect(250)
      local out = {}
      for _, from in ipairs(list) do
        p:cmd("MAIL FROM:<" .. from .. ">")
        local c, e = p:reply()
        out[#out + 1] = c .. " " .. tostring(e)
        p:cmd("RSET")
        p:expect(250)
      end
      p:cmd("QUIT")
      p:close()
      return out
    end
    with_mta({ spf_fail = "reject", spf_session_limit = 3, spf_helo = false }, function(port, _, mta)
      -- the same failing sender many times: one check, the same answer
      local same = {}
      for i = 1, 6 do same[i] = "bounce@good.auth.test" end
      local out = senders(port, same)
      for i = 1, 6 do assert.equal("550 5.7.23", out[i]) end
      local text = require("moonpost.metrics").render(mta)
      assert.truthy(text:find('sender_auth_results_total{method="spf",result="fail"} 6', 1, true))
      -- new domains (without SPF records): three checks, then deferred
      out = senders(port, { "a@n1.auth.test", "a@n2.auth.test", "a@n3.auth.test", "a@n4.auth.test" })
      assert.same({ "250 2.1.0", "250 2.1.0", "250 2.1.0", "451 4.7.24" }, out)
      -- VERP: a new local part per message is the same domain's result
      local verp = {}
      for i = 1, 12 do verp[i] = "bounce+" .. i .. "@elsewhere.test" end
      out = senders(port, verp)
      for i = 1, 12 do assert.equal("250 2.1.0", out[i], verp[i]) end
      -- unless the record looks at the local part
      out = senders(port, { "a@verp.auth.test", "b@verp.auth.test", "a@verp.auth.test" })
      assert.same({ "250 2.1.0", "550 5.7.23", "250 2.1.0" }, out)
    end)
    -- nothing enforced: the check past the limit is a temperror, the mail goes on
    with_mta({ spf_session_limit = 1, spf_helo = false }, function(port, got)
      local p = assert(H.connect(port, "127.0.0.1", 10, "127.0.0.6"))
      p:expect(220)
      p:cmd("EHLO client.auth.test")
      p:expect(250)
      for _, from in ipairs({ "a@elsewhere.test", "a@n1.auth.test" }) do
        p:cmd("MAIL FROM:<" .. from .. ">")
        p:expect(250)
        p:cmd("RCPT TO:<rcpt@mx.test>")
        p:expect(250)
        p:cmd("DATA")
        p:expect(354)
        p:send(message("x@elsewhere.test") .. ".\r\n")
        p:expect(250)
      end
      p:cmd("QUIT")
      p:close()
      assert.equal("pass", got[1].results.spf.result)
      assert.equal("temperror", got[2].results.spf.result)
    end)
  end)

  it("names the field of a bad option", function()
    local ok, err = pcall(require("moonpost.sender_auth").check, { dmarc = "strict" })
    assert.is_false(ok)
    assert.truthy(err:find("sender_auth.check: field 'dmarc'", 1, true))
    ok, err = pcall(require("moonpost.sender_auth").check, { authserv_id = "a b" })
    assert.is_false(ok)
    assert.truthy(err:find("authserv_id", 1, true))
  end)
end)
