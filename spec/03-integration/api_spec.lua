-- The HTTP API (moonpost.admin, docs/http-api.md) over real sockets: an
-- in-process MTA with a spool and an HTTP listener relays to the aiosmtpd
-- sink (spec/tools/sink.py); what arrives there, and how Python's email
-- package reads it, is the evidence.
local H = require "helpers"
local http = require "moonpost.runtime.http"
local cjson = require "cjson"
local passwd = require "moonpost.runtime.passwd"

local TOKEN = "s3cret-token"
local TIMEOUTS = { connect = 2, greeting = 2, ehlo = 2, mail = 2, rcpt = 2, data = 2, block = 2, done = 2 }

-- An MTA relaying everything to the sink, with the API on a free port.
-- o: queue (options), tenants, setup(mta), spool (directory)
local function api_mta(dir, sink_port, o)
  o = o or {}
  local mta = H.start_mta({}, function(m, moonpost)
    m:use(require("moonpost.route").smtp({ relay = "127.0.0.1:" .. sink_port, idle_timeout = "1s",
      timeouts = TIMEOUTS }))
    if o.setup then o.setup(m, moonpost) end
  end, { http = "127.0.0.1:0", api_token = TOKEN, spool = { dir = o.spool or (dir .. "/spool"), min_free = 0 },
    queue = o.queue or { retry = { "1s" }, max_age = "1h" }, tenants = o.tenants })
  local port = mta:http_addresses()[1].port
  -- api(method, path, body) -> status, decoded body (or the text), headers
  local function api(method, path, body, headers)
    local h = { Authorization = "Bearer " .. TOKEN }
    for k, v in pairs(headers or {}) do h[k] = v end
    local s, b, rh = http.request("127.0.0.1", port, method, path, body, h, 30)
    assert(s, "request failed: " .. tostring(b))
    local ok, v = pcall(cjson.decode, b)
    return s, ok and v or b, rh
  end
  return mta, api, port
end

-- Python's email package on a message: the tree of content types, the
-- decoded subject and addresses, each leaf's text or base64 octets.
local PARSE = [==[
import email, json, sys, base64
from email import policy
msg = email.message_from_bytes(sys.stdin.buffer.read(), policy=policy.default)
def tree(p):
    if p.is_multipart():
        return [p.get_content_type()] + [tree(s) for s in p.iter_parts()]
    return p.get_content_type()
leaves = []
for p in msg.walk():
    if p.is_multipart():
        continue
    c = p.get_content()
    leaves.append({"type": p.get_content_type(), "filename": p.get_filename(),
                   "cte": p.get("Content-Transfer-Encoding"),
                   "text": c.replace("\r\n", "\n") if isinstance(c, str) else None,
                   "b64": base64.b64encode(c).decode() if isinstance(c, bytes) else None})
defects = [str(d) for p in msg.walk() for d in p.defects]
print(json.dumps({"tree": tree(msg), "subject": str(msg["subject"]), "from": str(msg["from"]), "to": str(msg["to"]),
                  "date": msg["date"] and str(msg["date"]), "message_id": msg["message-id"], "mime": msg["mime-version"],
                  "x_campaign": msg["x-campaign"], "leaves": leaves, "defects": defects}))
]==]

local function parse(data)
  local code, out, err = H.exec(H.python, { "-c", PARSE }, { stdin = data, timeout = 30 })
  assert(code == 0, "python: " .. err)
  return cjson.decode(out)
end

local dkim_verify = H.dkim_verify

local function to_sender(sink, sender)
  local n = 0
  for _, m in ipairs(sink.messages()) do
    if m.rcpts[1] == sender then n = n + 1 end
  end
  return n
end

local function arrived(sink, rcpt)
  for _, m in ipairs(sink.messages()) do
    for _, r in ipairs(m.rcpts) do
      if r == rcpt then return m end
    end
  end
end

describe("the HTTP API", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-api") end)
  after_each(function() H.rm_rf(dir) end)

  it("answers 401 without the token, 400 for bad JSON and bad fields with the reason", function()
    H.with_sink(function(sink)
      local mta, api, port = api_mta(dir, sink.port)
      local s, b = http.request("127.0.0.1", port, "GET", "/api/v1/queues")
      assert.equal(401, s)
      assert.matches("bearer token", b)
      s = http.request("127.0.0.1", port, "POST", "/api/v1/messages", { from = "a@b.test", to = "c@d.test" },
        { Authorization = "Bearer wrong" })
      assert.equal(401, s)
      local v
      s, v = api("POST", "/api/v1/messages", "{\"from\": ", { ["Content-Type"] = "application/json" })
      assert.equal(400, s)
      assert.matches("^bad JSON", v.error)
      s, v = api("POST", "/api/v1/messages", { from = "a@b.test", to = "c@d.test", subjet = "typo" })
      assert.equal(400, s)
      assert.matches("unknown field 'subjet'", v.error)
      s, v = api("POST", "/api/v1/messages", { to = "c@d.test", text = "x" })
      assert.equal(400, s)
      assert.matches("^from: required", v.error)
      s, v = api("POST", "/api/v1/messages", { from = "a@b.test", to = { "c@d.test", "not an address" }, text = "x" })
      assert.equal(400, s)
      assert.matches("^to item 2: bad address", v.error)
      s, v = api("POST", "/api/v1/messages", { from = "a@b.test", to = "c@d.test> NOTIFY=NEVER", text = "x" })
      assert.equal(400, s)
      assert.matches("^to item 1: bad address", v.error)
      s, v = api("POST", "/api/v1/messages", { from = "a@b.test", to = "c@d.test", content = "Subject: x\r\n\r\nx",
        text = "y" })
      assert.equal(400, s)
      assert.matches("either content or structured parts", v.error)
      s, v = api("POST", "/api/v1/messages", { from = "a@b.test", to = "c@d.test", subject = "a\r\nBcc: x@y.test" })
      assert.equal(400, s)
      assert.matches("subject: holds a line break", v.error)
      -- any control character but tab, in the subject, a header value or a display name
      s, v = api("POST", "/api/v1/messages", { from = "a@b.test", to = "c@d.test", subject = "hi\27[2J", text = "x" })
      assert.equal(400, s)
      assert.equal("subject: holds a control character (U+001B; only tab is allowed)", v.error)
      s, v = api("POST", "/api/v1/messages", { from = "a@b.test", to = "c@d.test", text = "x",
        headers = { ["X-T"] = "\27]0;pwned\7" } })
      assert.equal(400, s)
      assert.matches("headers: X-T: the value holds a control character", v.error, nil, true)
      s, v = api("POST", "/api/v1/messages", { from = "a@b.test", to = "c@d.test", text = "x",
        headers = { { "X-C1", "a\194\155b" } } })
      assert.equal(400, s)
      assert.matches("headers: X-C1: the value holds a control character (U+009B", v.error, nil, true)
      s, v = api("POST", "/api/v1/messages", { from = "a@b.test", to = "c@d.test", text = "x",
        from_header = { name = "A\8B", address = "a@b.test" } })
      assert.equal(400, s)
      assert.matches("from_header: the name holds a control character", v.error, nil, true)
      s, v = api("POST", "/api/v1/messages", { from = "a@b.test", to = "c@d.test", text = "x\ty",
        subject = "tab\tok" })
      assert.equal(202, s, cjson.encode(v))
      -- a display address is one address: a comma in it would add a recipient of the header
      s, v = api("POST", "/api/v1/messages", { from = "a@b.test", to = "c@d.test", text = "x",
        to_header = "A <a@x.test,evil@z.test>" })
      assert.equal(400, s)
      assert.matches('to_header: bad address "a@x.test,evil@z.test"', v.error, nil, true)
      -- attachments as an object instead of a list: refused, not dropped
      s, v = api("POST", "/api/v1/messages", { from = "a@b.test", to = "c@d.test", text = "x",
        attachments = { name = "x.txt", data = "eA==" } })
      assert.equal(400, s)
      assert.equal("attachments: expected a list", v.error)
      s, v = api("POST", "/api/v1/messages", { from = "a@b.test", to = "c@d.test", tenant = "nobody" })
      assert.equal(400, s)
      assert.matches("unknown tenant 'nobody'", v.error)
      s, v = api("POST", "/api/v1/messages", { from = "a@b.test", to = "c@d.test",
        attachments = { { name = "x.bin", data = "not base64!" } } })
      assert.equal(400, s)
      assert.matches("attachments item 1: data is not valid base64", v.error)
      -- NOTIFY: NEVER, or one or more of SUCCESS, FAILURE, DELAY (an empty one would send no DSN at all)
      for _, notify in ipairs({ "[]", "[1,{}]", "\"\"", "\"SUCCESS,,DELAY\"", "\"FAILURE,FAILURE\"",
        "\"NEVER,SUCCESS\"", "{\"a\":\"SUCCESS\"}" }) do
        s, v = api("POST", "/api/v1/messages", "{\"from\":\"a@b.test\",\"to\":\"c@d.test\",\"text\":\"x\",\"notify\":"
          .. notify .. "}", { ["Content-Type"] = "application/json" })
        assert.equal(400, s, notify)
        assert.equal(1, v.error:find("notify: expected \"NEVER\" or one or more of SUCCESS, FAILURE, DELAY", 1, true),
          notify .. ": " .. v.error)
      end
      -- ENVID: the SMTP server's own check (a line break would break the DSN field that quotes it)
      s, v = api("POST", "/api/v1/messages", { from = "a@b.test", to = "c@d.test", text = "x",
        envid = "x\r\nX-Injected: yes" })
      assert.equal(400, s)
      assert.equal("envid: ENVID must be printable US-ASCII: no control character (xtext +00 to +1F, +7F)", v.error)
      s, v = api("POST", "/api/v1/messages", { from = "a@b.test", to = "c@d.test", text = "x",
        envid = string.rep("+", 34) })
      assert.equal(400, s)
      assert.equal("envid: ENVID must be xtext of at most 100 octets", v.error)
      s, v = api("POST", "/api/v1/bounce", {})
      assert.equal(400, s)
      assert.matches("give a filter", v.error)
      s, v = api("POST", "/api/v1/suspend", { tenant = 42 })
      assert.equal(400, s)
      assert.matches("tenant: expected a string", v.error)
      -- older than 0 seconds would be every message: that is all = true, not a filter
      for _, zero in ipairs({ 0, "0s", "0m" }) do
        s, v = api("POST", "/api/v1/bounce", { older_than = zero })
        assert.equal(400, s, tostring(zero))
        assert.matches("older_than: must be more than 0", v.error)
      end
      -- suspensions are told apart by their fields, whatever the values hold
      s, v = api("POST", "/api/v1/suspend", { tenant = "a site=b" })
      assert.equal(200, s)
      assert.is_false(v.existing)
      s, v = api("POST", "/api/v1/suspend", { tenant = "a", site = "b" })
      assert.equal(200, s)
      assert.is_false(v.existing)
      assert.are_not.equal(v.suspended.key, select(2, api("GET", "/api/v1/suspensions")).suspensions[1].key)
      s, v = api("POST", "/api/v1/resume", { tenant = "a", site = "b" })
      assert.equal(200, s)
      assert.equal(1, #v.resumed)
      s, v = api("GET", "/api/v1/suspensions")
      assert.equal(200, s)
      assert.equal(1, #v.suspensions)
      assert.equal("a site=b", v.suspensions[1].tenant)
      assert.is_nil(v.suspensions[1].site)
      assert.equal(200, (api("POST", "/api/v1/resume", { all = true })))
      -- nothing was queued by any of these
      assert.equal(0, mta.spool:count())
      H.stop_mta(mta)
    end)
  end)

  it("injects a structured message that Python's email package parses into the right parts", function()
    H.with_sink(function(sink)
      local mta, api = api_mta(dir, sink.port)
      local pdf = "%PDF-1.4\n" .. string.rep("\0\1\2\255", 300) .. "\n%%EOF\n"
      local text = "Hallo Jörg,\n\nthe report is attached. A long line follows: " .. string.rep("abc ", 40)
        .. "\n\n-- \nAcme"
      local s, v = api("POST", "/api/v1/messages", {
        from = "news@acme.test", to = { "joerg@x.test" },
        from_header = { name = "Acme Newsroom", address = "news@acme.test" },
        to_header = "Jörg Müller <joerg@x.test>",
        subject = "Ihr Bericht für März — Grüße ✓",
        text = text,
        html = "<p>Hallo J&ouml;rg, <b>the report</b> is attached.</p>",
        headers = { ["X-Campaign"] = "spring-2026" },
        attachments = { { name = "bericht-märz.pdf", content_type = "application/pdf", data = passwd.b64encode(pdf) } },
      })
      assert.equal(202, s, cjson.encode(v))
      assert.is_string(v.id)
      assert.same({ v.id }, v.ids)
      assert.is_true(H.wait_for(function() return #sink.messages() == 1 end, 10))
      local m = sink.messages()[1]
      assert.equal("news@acme.test", m.from)
      assert.same({ "joerg@x.test" }, m.rcpts)
      -- the Received field names the API and the id that was returned
      assert.matches("^Received: from %[127%.0%.0%.1%]\r\n\tby mx%.test %(Moonpost%) with HTTP id " .. v.id, m.data)
      local p = parse(m.data)
      assert.same({}, p.defects)
      assert.same({ "multipart/mixed", { "multipart/alternative", "text/plain", "text/html" }, "application/pdf" },
        p.tree)
      assert.equal("Ihr Bericht für März — Grüße ✓", p.subject)
      assert.equal("Acme Newsroom <news@acme.test>", p.from)
      assert.equal("Jörg Müller <joerg@x.test>", p.to)
      assert.equal("1.0", p.mime)
      assert.equal("spring-2026", p.x_campaign)
      assert.matches("^<" .. v.id .. "%.%x+@mx%.test>$", p.message_id)
      assert.truthy(p.date)
      local plain, html, att = p.leaves[1], p.leaves[2], p.leaves[3]
      assert.equal("quoted-printable", plain.cte) -- not ASCII, and a line over 76 columns
      assert.equal(text .. "\n", plain.text)
      assert.equal("7bit", html.cte)
      assert.matches("<b>the report</b>", html.text)
      assert.equal("bericht-märz.pdf", att.filename)
      assert.equal("base64", att.cte)
      assert.equal(passwd.b64encode(pdf), att.b64)
      -- every line of the message is short (RFC 5322 2.1.1: at most 78 recommended)
      for line in m.data:gmatch("[^\r\n]+") do
        assert.is_true(#line <= 998, "a line over 998 octets")
        if not line:match("^Received") then assert.is_true(#line <= 78, "long line: " .. line) end
      end
      H.stop_mta(mta)
    end)
  end)

  it("keeps every header line under 998 octets, even for a subject that is one long word", function()
    H.with_sink(function(sink)
      local mta, api = api_mta(dir, sink.port)
      local word = string.rep("x", 3000)
      local s, v = api("POST", "/api/v1/messages", { from = "news@acme.test", to = "joerg@x.test",
        subject = "Report " .. word, headers = { ["X-Campaign"] = word }, text = "x" })
      assert.equal(202, s, cjson.encode(v))
      assert.is_true(H.wait_for(function() return #sink.messages() == 1 end, 10))
      local m = sink.messages()[1]
      for line in m.data:gmatch("[^\r\n]+") do
        assert.is_true(#line <= 998, "a line of " .. #line .. " octets")
      end
      local p = parse(m.data)
      assert.same({}, p.defects)
      assert.equal("Report " .. word, p.subject)
      assert.equal(word, p.x_campaign)
      H.stop_mta(mta)
    end)
  end)

  it("injects raw content and batches, adding Date and Message-ID only where missing", function()
    H.with_sink(function(sink)
      local mta, api = api_mta(dir, sink.port)
      local s, v = api("POST", "/api/v1/messages", { messages = {
        { from = "a@origin.test", to = "raw1@x.test", content = "From: a@origin.test\nTo: raw1@x.test\n"
          .. "Subject: raw one\n\nbare LF lines\nbecome CRLF\n" },
        { from = "a@origin.test", to = { "raw2@x.test", "raw3@x.test" }, content = "From: a@origin.test\r\n"
          .. "Message-ID: <mine@origin.test>\r\nDate: Mon, 30 Nov 2026 18:00:00 +0000\r\nSubject: raw two\r\n\r\nbody\r\n" },
      } })
      assert.equal(202, s, cjson.encode(v))
      assert.equal(2, #v.ids)
      assert.is_true(H.wait_for(function() return #sink.messages() == 2 end, 10))
      local one, two = arrived(sink, "raw1@x.test"), arrived(sink, "raw2@x.test")
      assert.same({ "raw2@x.test", "raw3@x.test" }, two.rcpts)
      assert.matches("\r\nDate: [^\r\n]+\r\nMessage%-ID: <" .. v.ids[1] .. "%.%x+@mx%.test>\r\nFrom: a@origin%.test\r\n",
        one.data)
      assert.matches("\r\n\r\nbare LF lines\r\nbecome CRLF\r\n$", one.data)
      assert.equal(1, select(2, two.data:gsub("\r\nMessage%-ID:", "")))
      assert.matches("Message%-ID: <mine@origin%.test>", two.data)
      assert.equal(1, select(2, two.data:gsub("\r\nDate:", "")))
      H.stop_mta(mta)
    end)
  end)

  it("runs the MAIL and RCPT handlers on injected mail: suppressed and refused recipients are left out", function()
    H.with_sink(function(sink)
      local sup = require("moonpost.suppress").setup({ path = dir .. "/suppress.log" }) -- checked at RCPT
      local mta, api = api_mta(dir, sink.port, { tenants = { acme = {} }, setup = function(m, moonpost)
        m:use(sup)
        m:on("smtp_server_mail_from", function(txn, sender)
          if sender.address == "blocked@origin.test" then return moonpost.reject(550, "5.7.1", "sender blocked") end
          txn.notes.mail_seen = true
        end)
        m:on("smtp_server_rcpt_to", function(_, rcpt)
          if rcpt.domain == "example.invalid" then return moonpost.reject(550, "5.1.2", "no such domain") end
        end)
      end })
      assert.equal(200, (api("POST", "/api/v1/suppressions", { tenant = "acme", address = "gone@x.test" })))
      local s, v = api("POST", "/api/v1/messages", { from = "n@acme.test", tenant = "acme",
        to = { "gone@x.test", "bad@example.invalid", "ok@x.test" }, subject = "s", text = "x" })
      assert.equal(202, s, cjson.encode(v))
      assert.equal(2, #v.refused)
      assert.equal("gone@x.test", v.refused[1].address)
      assert.equal("550 5.7.1 gone@x.test is on the suppression list", v.refused[1].reply)
      assert.equal("bad@example.invalid", v.refused[2].address)
      assert.equal("550 5.1.2 no such domain", v.refused[2].reply)
      assert.equal(v.id, v.refused[1].id)
      assert.is_true(H.wait_for(function() return #sink.messages() == 1 end, 10))
      assert.same({ "ok@x.test" }, sink.messages()[1].rcpts)
      assert.matches("\r\n\tfor <ok@x%.test>;", sink.messages()[1].data)
      s, v = api("POST", "/api/v1/messages", { from = "n@acme.test", tenant = "acme", to = { "gone@x.test" }, text = "x" })
      assert.equal(422, s)
      assert.equal("every recipient was refused: gone@x.test: 550 5.7.1 gone@x.test is on the suppression list", v.error)
      s, v = api("POST", "/api/v1/messages", { from = "blocked@origin.test", to = "ok@x.test", text = "x" })
      assert.equal(422, s)
      assert.equal("refused by the policy: 550 5.7.1 sender blocked", v.error)
      assert.equal(0, mta.spool:count())
      H.stop_mta(mta)
    end)
  end)

  it("signs injected mail with DKIM (the message steps run), as python3-dkim verifies", function()
    H.with_sink(function(sink)
      local keys = dir .. "/dkim"
      local code, rec, err = H.exec(H.root .. "/scripts/dkim-keygen", { "--type", "ed25519", "--domain",
        "api.dkim.test", "--selector", "s1", "--dir", keys }, { timeout = 60 })
      assert(code == 0, "dkim-keygen: " .. rec .. err)
      local dnsd = H.dns_server({ ["dkim.test"] = "$ORIGIN dkim.test.\n$TTL 300\n"
        .. "@ IN SOA ns.dkim.test. hostmaster.dkim.test. 1 3600 600 86400 60\n@ IN NS ns.dkim.test.\n"
        .. "ns IN A 127.0.0.1\n" .. rec .. "\n" })
      local ok, e = pcall(function()
        local mta, api = api_mta(dir, sink.port, { setup = function(m)
          m:use(require("moonpost.dkim").sign({ keys = keys }))
        end })
        local s = api("POST", "/api/v1/messages", { from = "news@api.dkim.test", to = "r@x.test",
          subject = "Signé", text = "signed over HTTP", html = "<p>signed</p>" })
        assert.equal(202, s)
        s = api("POST", "/api/v1/messages", { from = "news@api.dkim.test", to = "raw@x.test",
          content = "From: news@api.dkim.test\nTo: raw@x.test\nSubject: raw\n\nraw and signed\n" })
        assert.equal(202, s)
        assert.is_true(H.wait_for(function() return #sink.messages() == 2 end, 10))
        for _, m in ipairs(sink.messages()) do
          assert.matches("^DKIM%-Signature:", m.data)
          assert.same({ true }, dkim_verify(m.data, dnsd.port))
        end
        H.stop_mta(mta)
      end)
      dnsd.stop()
      if not ok then error(e, 0) end
    end, 90)
  end)

  it("runs the policy's message handlers on injected mail: a reject is a 422 with the reply", function()
    H.with_sink(function(sink)
      local mta, api = api_mta(dir, sink.port, { setup = function(m)
        m:on("smtp_server_message_received", function(txn, msg)
          if msg:headers():find("Subject: spam", 1, true) then
            return require("moonpost").reject(550, "5.7.1", "no spam here")
          end
          txn.notes.seen = true
          msg:prepend("X-Seen-By-Policy: " .. txn.conn.protocol .. "\r\n")
        end)
      end })
      local s, v = api("POST", "/api/v1/messages", { from = "a@b.test", to = "c@x.test", subject = "spam", text = "x" })
      assert.equal(422, s)
      assert.equal("refused by the policy: 550 5.7.1 no spam here", v.error)
      s = api("POST", "/api/v1/messages", { from = "a@b.test", to = "c@x.test", subject = "ham", text = "x" })
      assert.equal(202, s)
      assert.is_true(H.wait_for(function() return #sink.messages() == 1 end, 10))
      assert.matches("^X%-Seen%-By%-Policy: http\r\n", sink.messages()[1].data)
      H.stop_mta(mta)
    end)
  end)

  it("keeps what a resume releases while delivery is paused, and delivers it when delivery starts again", function()
    H.with_sink(function(sink)
      local mta, api = api_mta(dir, sink.port)
      assert.equal(200, (api("POST", "/api/v1/suspend", { domain = "held.test" })))
      for i = 1, 3 do
        assert.equal(202, (api("POST", "/api/v1/messages", { from = "a@origin.test", to = "u" .. i .. "@held.test",
          subject = "held " .. i, text = "x" })))
      end
      assert.is_true(H.wait_for(function()
        local _, v = api("GET", "/api/v1/suspensions")
        return v.suspensions[1].held == 3
      end, 10))
      -- delivery paused (as a reload to a policy without a transport does)
      mta.queue:stop()
      local s, v = api("POST", "/api/v1/resume", { domain = "held.test" })
      assert.equal(200, s)
      assert.equal(3, v.released)
      H.wait_for(function() return false end, 0.5)
      assert.equal(0, #sink.messages())
      mta.queue:start()
      assert.is_true(H.wait_for(function() return #sink.messages() == 3 end, 10))
      assert.is_true(H.wait_for(function() return mta.spool:count() == 0 end, 10))
      H.stop_mta(mta)
    end)
  end)

  it("suspends a domain: nothing arrives, no attempt is counted; resume delivers everything at once", function()
    H.with_sink(function(sink)
      local mta, api = api_mta(dir, sink.port)
      local s, v = api("POST", "/api/v1/suspend", { domain = "Held.test", reason = "maintenance" })
      assert.equal(200, s, cjson.encode(v))
      assert.equal("domain=held.test", v.suspended.key)
      local ids = {}
      for i = 1, 5 do
        s, v = api("POST", "/api/v1/messages", { from = "a@origin.test", to = "user" .. i .. "@held.test",
          subject = "held " .. i, text = "x" })
        assert.equal(202, s)
        ids[i] = v.id
      end
      -- mail to other domains flows meanwhile
      s = api("POST", "/api/v1/messages", { from = "a@origin.test", to = "free@other.test", subject = "free", text = "x" })
      assert.equal(202, s)
      assert.is_true(H.wait_for(function() return arrived(sink, "free@other.test") ~= nil end, 10))
      H.wait_for(function() return false end, 1.5)
      assert.equal(1, #sink.messages())
      s, v = api("GET", "/api/v1/suspensions")
      assert.equal(200, s)
      assert.equal(1, #v.suspensions)
      assert.equal("held.test", v.suspensions[1].domain)
      assert.equal("maintenance", v.suspensions[1].reason)
      assert.equal(5, v.suspensions[1].held)
      s, v = api("GET", "/api/v1/messages/" .. ids[1])
      assert.equal(200, s)
      assert.equal("suspended", v.state)
      assert.equal("domain=held.test", v.suspended_by)
      assert.equal(0, v.attempts)
      -- suspending again says so and changes nothing
      s, v = api("POST", "/api/v1/suspend", { domain = "held.test" })
      assert.equal(200, s)
      assert.is_true(v.existing)
      local t0 = require("luv").now()
      s, v = api("POST", "/api/v1/resume", { domain = "held.test" })
      assert.equal(200, s)
      assert.equal(5, v.released)
      assert.is_true(H.wait_for(function() return #sink.messages() == 6 end, 10))
      assert.is_true(require("luv").now() - t0 < 3000, "resumed mail went at once")
      s, v = api("GET", "/api/v1/suspensions")
      assert.equal(200, s)
      assert.same({}, v.suspensions)
      s, v = api("POST", "/api/v1/resume", { domain = "held.test" })
      assert.equal(404, s)
      assert.matches("no such suspension", v.error)
      H.stop_mta(mta)
    end)
  end)

  it("lets a message go whose suspension ended while its other recipients were being tried", function()
    H.with_sink(function(sink)
      local mta, api = api_mta(dir, sink.port)
      assert.equal(200, (api("POST", "/api/v1/suspend", { domain = "held.test" })))
      -- the sink does not answer the first RCPT of stall1-*: that attempt takes the 2 s timeout
      assert.equal(202, (api("POST", "/api/v1/messages", { from = "a@origin.test",
        to = { "u@held.test", "stall1-x@other.test" }, text = "x" })))
      assert.is_true(H.wait_for(function() return #sink.events("stall") == 1 end, 10))
      local s, v = api("POST", "/api/v1/resume", { domain = "held.test" })
      assert.equal(200, s)
      assert.equal(0, v.released) -- not parked yet: its attempt is still running
      assert.is_true(H.wait_for(function() return arrived(sink, "u@held.test") ~= nil end, 15))
      assert.is_true(H.wait_for(function() return mta.spool:count() == 0 end, 15))
      H.stop_mta(mta)
    end)
  end)

  -- docs/spool.md#expiry: a suspension does not stop max_age. The queue takes
  -- the message back when a held recipient reaches it; a resume that comes
  -- after that (from the suspension that held it first) does nothing, and
  -- the recipient still held goes once, at its own suspension's resume.
  it("expires suspended mail at max_age; the rest of the message goes once, at its resume", function()
    H.with_sink(function(sink)
      local mta, api = api_mta(dir, sink.port, { queue = { retry = { "1s" }, max_age = "1h",
        domains = { ["short.test"] = { max_age = "2s" } } } })
      assert.equal(200, (api("POST", "/api/v1/suspend", { domain = "short.test" })))
      assert.equal(200, (api("POST", "/api/v1/suspend", { domain = "long.test" })))
      local s, v = api("POST", "/api/v1/messages", { from = "a@origin.test", to = { "x@short.test", "y@long.test" },
        subject = "held", text = "x" })
      assert.equal(202, s)
      local id = v.id
      -- x@short.test expires while both suspensions last, with its DSN
      assert.is_true(H.wait_for(function() return to_sender(sink, "a@origin.test") == 1 end, 15),
        "x@short.test did not expire while suspended")
      assert.matches("bounced: 4%.4%.7 message expired: held: suspended by the administrator %(domain=short%.test%)",
        H.log("to=<x@short.test> bounced"))
      local d = H.parse_dsn(arrived(sink, "a@origin.test").data)
      assert.equal("rfc822; x@short.test", d.recipients[1]["Final-Recipient"])
      assert.equal("4.4.7", d.recipients[1]["Status"])
      -- y@long.test is held by its own suspension now
      s, v = api("GET", "/api/v1/messages/" .. id)
      assert.equal(200, s)
      assert.equal("suspended", v.state)
      assert.equal("domain=long.test", v.suspended_by)
      assert.is_nil(arrived(sink, "y@long.test"))
      -- the suspension that held it first gives nothing back
      s, v = api("POST", "/api/v1/resume", { domain = "short.test" })
      assert.equal(200, s)
      assert.equal(0, v.released)
      s, v = api("POST", "/api/v1/resume", { domain = "long.test" })
      assert.equal(200, s)
      assert.equal(1, v.released)
      assert.is_true(H.wait_for(function() return mta.spool:count() == 0 end, 10))
      local n = 0
      for _, m in ipairs(sink.messages()) do
        for _, r in ipairs(m.rcpts) do if r == "y@long.test" then n = n + 1 end end
      end
      assert.equal(1, n)
      assert.equal(1, H.count(H.log("to=<y@long.test> delivered"), "delivered"))
      H.stop_mta(mta)
    end)
  end)

  it("suspends a tenant (others flow) and a site; suspensions outlive a restart", function()
    H.with_sink(function(sink)
      local tenants = { acme = {}, globex = {} }
      local mta, api = api_mta(dir, sink.port, { tenants = tenants })
      assert.equal(200, (api("POST", "/api/v1/suspend", { tenant = "acme" })))
      assert.equal(202, (api("POST", "/api/v1/messages", { from = "a@acme.test", to = "one@x.test", tenant = "acme",
        subject = "acme", text = "x" })))
      assert.equal(202, (api("POST", "/api/v1/messages", { from = "g@globex.test", to = "two@x.test",
        tenant = "globex", subject = "globex", text = "x" })))
      assert.is_true(H.wait_for(function() return arrived(sink, "two@x.test") ~= nil end, 10))
      H.wait_for(function() return false end, 1)
      assert.is_nil(arrived(sink, "one@x.test"))
      -- the site: the relay's address as route.smtp names it
      local s, v = api("GET", "/api/v1/queues")
      assert.equal(200, s)
      local site = v.sites[1].site
      assert.equal("[127.0.0.1]:" .. sink.port, site)
      assert.equal(1, v.sites[1].delivered)
      assert.equal(200, (api("POST", "/api/v1/suspend", { site = site })))
      assert.equal(202, (api("POST", "/api/v1/messages", { from = "g@globex.test", to = "three@x.test",
        tenant = "globex", subject = "site", text = "x" })))
      H.wait_for(function() return false end, 1.5)
      assert.is_nil(arrived(sink, "three@x.test"))
      s, v = api("GET", "/api/v1/queues?site=" .. site)
      assert.equal(200, s)
      assert.is_true(v.sites[1].suspended)
      assert.equal(1, v.sites[1].held)
      -- a restart on the same spool: still suspended, and the mail still waits
      H.stop_mta(mta)
      mta, api = api_mta(dir, sink.port, { tenants = tenants })
      s, v = api("GET", "/api/v1/suspensions")
      assert.equal(200, s)
      assert.equal(2, #v.suspensions)
      H.wait_for(function() return false end, 1.5)
      assert.equal(1, #sink.messages())
      s, v = api("POST", "/api/v1/resume", { all = true })
      assert.equal(200, s)
      assert.equal(2, #v.resumed)
      assert.is_true(H.wait_for(function() return #sink.messages() == 3 end, 10))
      H.stop_mta(mta)
    end)
  end)

  it("reports shaped sites and their gates, and purges mail a gate holds", function()
    H.with_sink(function(sink)
      local mta, api = api_mta(dir, sink.port, { setup = function(m)
        m:use(require("moonpost.shape").setup({
          destinations = { limited = { domains = { "lim.test" }, rate = "1/h", burst = 1 } },
        }))
      end })
      for i = 1, 3 do
        assert.equal(202, (api("POST", "/api/v1/messages", { from = "s@origin.test", to = "u" .. i .. "@lim.test",
          text = "x" })))
      end
      -- one goes (the burst), two wait at the gate for an hour
      assert.is_true(H.wait_for(function() return #sink.messages() == 1 end, 10))
      local s, v
      assert.is_true(H.wait_for(function()
        s, v = api("GET", "/api/v1/queues?site=limited")
        return #v.sites == 1 and v.sites[1].parked == 2
      end, 10))
      assert.equal(200, s)
      assert.same({ "default" }, v.sites[1].sources)
      assert.equal(1, v.sites[1].delivered)
      assert.equal("ready:default>limited", v.gates[1].key)
      assert.equal("ready", v.gates[1].kind)
      s, v = api("GET", "/api/v1/queues?domain=lim.test")
      assert.equal(200, s)
      assert.equal(2, v.queues[1].depth)
      -- held by the gate: no attempt runs for them, none waits for one
      assert.equal(0, v.queues[1].active)
      assert.equal(0, v.queues[1].set_aside)
      -- a purge takes them back from the gate at once
      s, v = api("POST", "/api/v1/bounce", { domain = "lim.test", dsn = false })
      assert.equal(200, s)
      assert.equal(2, v.matched)
      assert.equal(2, v.bounced)
      assert.is_true(H.wait_for(function() return mta.spool:count() == 0 end, 10))
      H.stop_mta(mta)
    end)
  end)

  it("bounces queued mail by filter with DSNs to the senders, or silently", function()
    H.with_sink(function(sink)
      -- the first attempt defers (451), and the retry is an hour away: the
      -- purge must bring the messages forward
      local mta, api = api_mta(dir, sink.port, { queue = { retry = { "1h" }, max_age = "1d" } })
      local ids = {}
      for i = 1, 3 do
        local s, v = api("POST", "/api/v1/messages", { from = "sender@origin.test", to = "r451-u" .. i .. "@purge.test",
          subject = "doomed " .. i, text = "x" })
        assert.equal(202, s)
        ids[i] = v.id
      end
      assert.equal(202, (api("POST", "/api/v1/messages", { from = "sender@origin.test", to = "r451-keep@kept.test",
        subject = "kept", text = "x" })))
      assert.is_true(H.wait_for(function()
        local _, v = api("GET", "/api/v1/messages/" .. ids[3])
        return v.attempts == 1
      end, 10))
      local s, v = api("POST", "/api/v1/bounce", { domain = "purge.test", older_than = 3600 })
      assert.equal(200, s)
      assert.equal(0, v.matched)
      s, v = api("POST", "/api/v1/bounce", { domain = "purge.test" })
      assert.equal(200, s, cjson.encode(v))
      assert.equal(3, v.matched)
      assert.equal(3, v.bounced)
      assert.equal(0, v.pending)
      assert.is_true(v.dsn)
      assert.is_true(H.wait_for(function() return to_sender(sink, "sender@origin.test") == 3 end, 10))
      local d = H.parse_dsn(arrived(sink, "sender@origin.test").data)
      assert.equal("multipart/report", d.type)
      assert.equal("failed", d.recipients[1]["Action"])
      assert.equal("5.0.0", d.recipients[1]["Status"])
      assert.matches("deleted from the queue by the administrator", d.recipients[1]["Diagnostic-Code"])
      s = api("GET", "/api/v1/messages/" .. ids[1])
      assert.equal(404, s)
      -- the message to kept.test is still queued, untouched
      s, v = api("GET", "/api/v1/queues?domain=kept.test")
      assert.equal(200, s)
      assert.equal(1, #v.queues)
      assert.equal(1, v.queues[1].depth)
      -- silently: no DSN
      s, v = api("POST", "/api/v1/bounce", { rcpt = "R451-keep@kept.test", dsn = false })
      assert.equal(200, s)
      assert.equal(1, v.matched)
      assert.equal(1, v.bounced)
      assert.is_false(v.dsn)
      assert.is_true(H.wait_for(function() return mta.spool:count() == 0 end, 10))
      H.wait_for(function() return false end, 1)
      assert.equal(3, to_sender(sink, "sender@origin.test"))
      H.stop_mta(mta)
    end)
  end)

  it("purges suspended mail too, and by tenant and sender", function()
    H.with_sink(function(sink)
      local mta, api = api_mta(dir, sink.port, { tenants = { acme = {}, globex = {} } })
      assert.equal(200, (api("POST", "/api/v1/suspend", { domain = "x.test" })))
      for _, t in ipairs({ "acme", "acme", "globex" }) do
        assert.equal(202, (api("POST", "/api/v1/messages", { from = "bounces@" .. t .. ".test", to = "u@x.test",
          tenant = t, subject = t, text = "x" })))
      end
      assert.is_true(H.wait_for(function()
        local _, v = api("GET", "/api/v1/suspensions")
        return v.suspensions[1].held == 3
      end, 10))
      local s, v = api("POST", "/api/v1/bounce", { tenant = "acme", from = "BOUNCES@acme.test" })
      assert.equal(200, s)
      assert.equal(2, v.matched)
      assert.equal(2, v.bounced)
      assert.is_true(H.wait_for(function() return to_sender(sink, "bounces@acme.test") == 2 end, 10))
      s, v = api("GET", "/api/v1/queues")
      assert.equal(200, s)
      assert.equal(1, v.messages)
      assert.equal("globex", v.queues[1].tenant)
      H.stop_mta(mta)
    end)
  end)

  it("inspects a message: envelope, recipients, attempts, next attempt, headers, and the body on request", function()
    H.with_sink(function(sink)
      local mta, api, port = api_mta(dir, sink.port, { queue = { retry = { "1h" }, max_age = "1d" },
        tenants = { acme = {} } })
      local s, v = api("POST", "/api/v1/messages", { from = "a@acme.test", to = { "ok@x.test", "r451-later@x.test" },
        tenant = "acme", subject = "inspect me", text = "the body" })
      assert.equal(202, s)
      local id = v.id
      assert.is_true(H.wait_for(function() return arrived(sink, "ok@x.test") ~= nil end, 10))
      assert.is_true(H.wait_for(function()
        local _, m = api("GET", "/api/v1/messages/" .. id)
        return m.attempts == 1
      end, 10))
      s, v = api("GET", "/api/v1/messages/" .. id)
      assert.equal(200, s)
      assert.equal(id, v.id)
      assert.equal("a@acme.test", v.from)
      assert.equal("acme", v.tenant)
      assert.equal("deferred", v.state)
      assert.equal(1, v.attempts)
      assert.is_true(v.next_attempt > os.time() + 3000)
      assert.is_true(v.size > 100)
      assert.equal("ok@x.test", v.recipients[1].address)
      assert.equal("delivered", v.recipients[1].state)
      assert.equal("r451-later@x.test", v.recipients[2].address)
      assert.equal("deferred", v.recipients[2].state)
      assert.equal(451, v.recipients[2].last_result.code)
      local subject
      for _, h in ipairs(v.headers) do if h.name == "Subject" then subject = h.value end end
      assert.equal("inspect me", subject)
      assert.is_nil(v.body)
      s, v = api("GET", "/api/v1/messages/" .. id .. "?body=1")
      assert.equal(200, s)
      assert.equal("the body\r\n", v.body)
      -- a header field in a legacy 8-bit charset, sent raw: the answer is still JSON (UTF-8)
      local c, _, t = H.send(mta:addresses()[1].port, { from = "a@acme.test", to = "r451-later@x.test",
        body = "Subject: caf\233 cr\232me\r\nX-Ok: d\195\169j\195\160\r\n\r\nbody\r\n" })
      assert.equal(250, c)
      local id8 = t:match("queued as (%x+)")
      local code, raw = http.request("127.0.0.1", port, "GET", "/api/v1/messages/" .. id8, nil,
        { Authorization = "Bearer " .. TOKEN }, 30)
      assert.equal(200, code)
      local jcode, jout, jerr = H.exec(H.python, { "-c",
        "import json,sys; v=json.loads(sys.stdin.buffer.read().decode('utf-8')); "
        .. "print(json.dumps([[h['value'], h.get('value_base64')] for h in v['headers'] if h['name'] in ('Subject','X-Ok')]))" },
        { stdin = raw, timeout = 30 })
      assert.equal(0, jcode, jerr)
      assert.same({ { "caf\239\191\189 cr\239\191\189me", passwd.b64encode("caf\233 cr\232me") },
        { "d\195\169j\195\160", cjson.null } }, cjson.decode(jout))
      s, v = api("GET", "/api/v1/messages/0123456789abc")
      assert.equal(404, s)
      assert.matches("no such message", v.error)
      -- the queue summary names the deferral
      s, v = api("GET", "/api/v1/queues?tenant=acme")
      assert.equal(200, s)
      assert.equal(1, #v.queues)
      assert.equal("x.test", v.queues[1].domain)
      assert.equal(1, v.queues[1].depth)
      assert.matches("^451 4%.2%.0", v.queues[1].last_error)
      assert.is_true(v.queues[1].oldest >= 0)
      s, v = api("GET", "/api/v1/queues?tenant=globex")
      assert.equal(200, s)
      assert.same({}, v.queues)
      H.stop_mta(mta)
    end)
  end)

  it("caps the body an inspection returns: body_max (1 MiB by default), body_truncated and body_size", function()
    H.with_sink(function(sink)
      local mta, api = api_mta(dir, sink.port, { queue = { retry = { "1h" }, max_age = "1d" } })
      -- 1.5 MiB of body, a two-octet UTF-8 character across the 1 MiB mark
      local line = string.rep("x", 1022) .. "\r\n"
      local big = string.rep(line, 1023) .. string.rep("y", 1023) .. "\195\169" .. string.rep(line, 512)
      local s, v = api("POST", "/api/v1/messages", { from = "a@origin.test", to = "r451-later@x.test",
        content = "From: a@origin.test\r\nSubject: big\r\n\r\n" .. big })
      assert.equal(202, s, cjson.encode(v))
      local id = v.id
      s, v = api("GET", "/api/v1/messages/" .. id .. "?body=1")
      assert.equal(200, s)
      assert.is_true(v.body_truncated)
      assert.equal(#big, v.body_size)
      -- cut before the character that the cap would split: still UTF-8
      assert.equal(1048575, #v.body)
      assert.equal(big:sub(1, 1048575), v.body)
      s, v = api("GET", "/api/v1/messages/" .. id .. "?body=1&body_max=100")
      assert.equal(200, s)
      assert.equal(big:sub(1, 100), v.body)
      assert.is_true(v.body_truncated)
      assert.equal(#big, v.body_size)
      s, v = api("GET", "/api/v1/messages/" .. id .. "?body=1&body_max=2000000")
      assert.equal(200, s)
      assert.equal(big, v.body)
      assert.is_nil(v.body_truncated)
      assert.equal(#big, v.body_size)
      s, v = api("GET", "/api/v1/messages/" .. id .. "?body=1&body_max=20000000")
      assert.equal(400, s)
      assert.matches("body_max", v.error)
      H.stop_mta(mta)
    end)
  end)

  it("refuses a tenant over its queue quota with 429", function()
    H.with_sink(function(sink)
      local mta, api = api_mta(dir, sink.port, { tenants = { acme = { max_queued = 2 } } })
      assert.equal(200, (api("POST", "/api/v1/suspend", { tenant = "acme" })))
      for i = 1, 2 do
        assert.equal(202, (api("POST", "/api/v1/messages", { from = "a@acme.test", to = "u" .. i .. "@x.test",
          tenant = "acme", text = "x" })))
      end
      assert.is_true(H.wait_for(function() return mta:tenant_depth("acme") == 2 end, 10))
      local s, v = api("POST", "/api/v1/messages", { from = "a@acme.test", to = "u3@x.test", tenant = "acme",
        text = "x" })
      assert.equal(429, s)
      assert.matches("queue quota exceeded", v.error)
      H.stop_mta(mta)
    end)
  end)

  it("adds, lists, exports and removes suppressions; 404 without a suppress block", function()
    H.with_sink(function(sink)
      local mta, api = api_mta(dir, sink.port)
      local s, v = api("GET", "/api/v1/suppressions")
      assert.equal(404, s)
      assert.equal("the policy uses no moonpost.suppress block", v.error)
      H.stop_mta(mta)
      local sup = require("moonpost.suppress").setup({ path = dir .. "/suppress.log", check = "queue" })
      mta, api = api_mta(dir, sink.port, { tenants = { acme = {}, globex = {} },
        setup = function(m) m:use(sup) end })
      local addrs = {}
      for i = 1, 5 do addrs[i] = "gone" .. i .. "@x.test" end
      s, v = api("POST", "/api/v1/suppressions", { tenant = "acme", addresses = addrs, reason = "complaint" })
      assert.equal(200, s, cjson.encode(v))
      assert.equal(5, v.added)
      s, v = api("POST", "/api/v1/suppressions", { tenant = "acme", address = "gone1@x.test" })
      assert.equal(200, s)
      assert.equal(0, v.added)
      assert.equal(1, v.existing)
      assert.equal(200, (api("POST", "/api/v1/suppressions", { tenant = "globex", address = "other@x.test" })))
      -- on disk before the answer: the log file has them
      assert.matches("gone5@x%.test", H.read(dir .. "/suppress.log"))
      s, v = api("GET", "/api/v1/suppressions?tenant=acme&limit=2")
      assert.equal(200, s)
      assert.equal(2, v.count)
      assert.equal(5, v.total)
      assert.equal(2, v.next_offset)
      assert.equal("complaint", v.entries[1].reason)
      local seen = {}
      local offset = 0
      repeat
        s, v = api("GET", "/api/v1/suppressions?tenant=acme&limit=2&offset=" .. offset)
        assert.equal(200, s)
        for _, e in ipairs(v.entries) do
          assert.equal("acme", e.tenant)
          seen[#seen + 1] = e.address
        end
        offset = v.next_offset
      until not offset
      table.sort(seen)
      assert.same(addrs, seen)
      s, v = api("GET", "/api/v1/suppressions")
      assert.equal(200, s)
      assert.equal(6, v.total)
      local csv, h
      s, csv, h = api("GET", "/api/v1/suppressions/export?tenant=globex")
      assert.equal(200, s)
      assert.matches("^text/csv", h["content-type"])
      assert.matches("^tenant,address,reason,time\nglobex,other@x%.test,admin,%d+\n$", csv)
      -- the queue check applies at once: an injected message to a suppressed address is dropped
      assert.equal(202, (api("POST", "/api/v1/messages", { from = "a@acme.test", to = { "gone2@x.test", "fine@x.test" },
        tenant = "acme", text = "x" })))
      assert.is_true(H.wait_for(function() return arrived(sink, "fine@x.test") ~= nil end, 10))
      assert.same({ "fine@x.test" }, arrived(sink, "fine@x.test").rcpts)
      s, v = api("DELETE", "/api/v1/suppressions", { tenant = "acme", addresses = { "gone1@x.test", "never@x.test" } })
      assert.equal(200, s)
      assert.equal(1, v.removed)
      assert.equal(1, v.missing)
      s, v = api("DELETE", "/api/v1/suppressions?tenant=acme&address=gone2%40x.test")
      assert.equal(200, s)
      assert.equal(1, v.removed)
      s, v = api("GET", "/api/v1/suppressions?tenant=acme")
      assert.equal(200, s)
      assert.equal(3, v.total)
      H.stop_mta(mta)
    end)
  end)

  it("records injections as Reception and admin actions as AdminAction in the event log", function()
    H.with_sink(function(sink)
      local file = dir .. "/events.jsonl"
      local mta, api = api_mta(dir, sink.port, { setup = function(m)
        m:use(require("moonpost.eventlog").setup({ file = file }))
      end })
      local s, v = api("POST", "/api/v1/messages", { from = "a@origin.test", to = "r@x.test", text = "x" })
      assert.equal(202, s)
      local id = v.id
      assert.equal(200, (api("POST", "/api/v1/suspend", { domain = "later.test", reason = "why not" })))
      assert.equal(200, (api("POST", "/api/v1/resume", { domain = "later.test" })))
      assert.is_true(H.wait_for(function() return #sink.messages() == 1 end, 10))
      H.stop_mta(mta)
      local recs = {}
      for line in H.read(file):gmatch("[^\n]+") do recs[#recs + 1] = cjson.decode(line) end
      local reception, actions = nil, {}
      for _, r in ipairs(recs) do
        if r.type == "Reception" and r.id == id then reception = r end
        if r.type == "AdminAction" then actions[#actions + 1] = r end
      end
      assert.truthy(reception, "no Reception for the injected message")
      assert.equal("a@origin.test", reception.sender)
      assert.equal("127.0.0.1", reception.ip)
      assert.equal(2, #actions)
      assert.equal("suspend", actions[1].action)
      assert.equal("later.test", actions[1].domain)
      assert.equal("why not", actions[1].reason)
      assert.equal("127.0.0.1", actions[1].client)
      assert.equal("resume", actions[2].action)
    end)
  end)

  it("reloads: the blocks read their files again (the reloaded event runs)", function()
    H.with_sink(function(sink)
      local reloaded = 0
      local mta, api = api_mta(dir, sink.port, { setup = function(m)
        m:on("reloaded", function() reloaded = reloaded + 1 end)
      end })
      local s, v = api("POST", "/api/v1/reload")
      assert.equal(200, s, cjson.encode(v))
      assert.is_true(v.reloaded)
      assert.is_false(v.policy)
      assert.equal(1, reloaded)
      assert.matches("admin: reload", H.log("admin: reload"))
      H.stop_mta(mta)
    end)
  end)
end)
