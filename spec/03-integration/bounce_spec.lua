-- Bounce classes end to end: a real peer (spec/tools/sink.py) refuses
-- recipients, the queue classifies the results before delivery_bounced /
-- delivery_deferred, the log line and the DSN say the class, and a policy's
-- moonpost.bounce rules change it. `moonpost check` reports a bad rule at
-- the policy's line.
local H = require "helpers"

-- An in-process MTA relaying everything to `port`; setup(mta) adds the
-- policy's blocks and hooks.
local function relay_mta(dir, port, setup)
  return H.start_mta({}, function(m)
    m:use(require("moonpost.route").smtp({ relay = "127.0.0.1:" .. port, idle_timeout = "2s",
      timeouts = { connect = 2, greeting = 2, ehlo = 2, mail = 2, rcpt = 2, data = 2, block = 2, done = 2 } }))
    if setup then setup(m) end
  end, { spool = { dir = dir .. "/spool", min_free = 0 }, queue = { retry = { "1s" }, max_age = "1h" } })
end

-- The DSN's text part and its per-recipient report fields, read by Python's
-- email package.
local parse_dsn = H.parse_dsn

local with_sink = H.with_sink

-- the DSN the sink received for origin@sender.test
local function dsn_of(sink)
  for _, m in ipairs(sink.messages()) do
    if m.rcpts[1] == "origin@sender.test" then return parse_dsn(m.data) end
  end
end

describe("bounce classes on deliveries", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-bounce") end)
  after_each(function() H.rm_rf(dir) end)

  it("delivery_bounced and delivery_deferred carry result.class and result.permanent; the DSN says the class",
    function()
      with_sink(function(sink)
        local bounced, deferred = {}, {}
        local mta, port = relay_mta(dir, sink.port, function(m)
          m:on("delivery_bounced", function(_, rcpt, res)
            bounced[rcpt.address] = { class = res.class, permanent = res.permanent }
          end)
          m:on("delivery_deferred", function(_, rcpt, res)
            deferred[rcpt.address] = { class = res.class, permanent = res.permanent }
          end)
        end)
        assert.equal(250, (H.send(port, { from = "origin@sender.test",
          to = { "r550-gone@x.test", "r451-later@x.test" }, body = "Subject: classes\r\n\r\nbody\r\n" })))
        assert.is_true(H.wait_for(function() return dsn_of(sink) ~= nil and deferred["r451-later@x.test"] end, 20))
        -- the sink's "550 5.1.1 no such user here" and "451 4.2.0 try again later"
        assert.same({ class = "invalid-recipient", permanent = true }, bounced["r550-gone@x.test"])
        assert.same({ class = "other", permanent = false }, deferred["r451-later@x.test"])
        assert.truthy(H.log("to=<r550-gone@x.test> bounced: "):find(
          "RCPT TO: 550 5.1.1 no such user here (invalid-recipient, hard)", 1, true), H.log("r550-gone"))
        assert.truthy(H.log("to=<r451-later@x.test> deferred: "):find("(other, soft)", 1, true))
        local d = dsn_of(sink)
        assert.truthy(d.text:find("<r550-gone@x.test>: The recipient address does not exist (invalid-recipient)\r\n"
          .. "    550 5.1.1 no such user here", 1, true), d.text)
        assert.equal(1, #d.recipients)
        assert.equal("rfc822; r550-gone@x.test", d.recipients[1]["Final-Recipient"])
        assert.equal("invalid-recipient", d.recipients[1]["X-Moonpost-Bounce-Class"])
        assert.equal("5.1.1", d.recipients[1]["Status"])
        H.stop_mta(mta)
      end)
    end)

  it("a moonpost.bounce block's rules decide the class, hard or soft, and the DSN's text", function()
    with_sink(function(sink)
      local bounced = {}
      local mta, port = relay_mta(dir, sink.port, function(m)
        m:use(require("moonpost.bounce").setup { rules = {
          { pattern = "no such user here", class = "inactive-mailbox", permanent = false },
          { pattern = { regex = [[^554 5\.6\.0 ]] }, class = "spam-related" },
        } })
        m:on("delivery_bounced", function(_, rcpt, res)
          bounced[rcpt.address] = { class = res.class, permanent = res.permanent }
        end)
      end)
      assert.equal(250, (H.send(port, { from = "origin@sender.test", to = { "r550-gone@x.test" } })))
      assert.equal(250, (H.send(port, { from = "other@sender.test", to = { "d554-x@x.test" } })))
      assert.is_true(H.wait_for(function() return dsn_of(sink) ~= nil and bounced["d554-x@x.test"] end, 20))
      assert.same({ class = "inactive-mailbox", permanent = false }, bounced["r550-gone@x.test"])
      assert.same({ class = "spam-related", permanent = true }, bounced["d554-x@x.test"])
      local d = dsn_of(sink)
      assert.truthy(d.text:find("<r550-gone@x.test>: The recipient's mailbox is disabled or no longer in use "
        .. "(inactive-mailbox)", 1, true), d.text)
      assert.equal("inactive-mailbox", d.recipients[1]["X-Moonpost-Bounce-Class"])
      H.stop_mta(mta)
    end)
  end)

  it("moonpost check reports an unknown class in a rule at the policy's file and line", function()
    H.run(function()
      local code, out, err = H.exec(H.root .. "/scripts/moonpost", { "check", "spec/fixtures/policies/bad_bounce.lua" },
        { cwd = H.root, timeout = 30 })
      assert.equal(1, code)
      assert.equal("", out)
      local want = "moonpost: spec/fixtures/policies/bad_bounce.lua:3: bounce.setup: field 'rules[2].class': "
        .. "unknown class 'hard-bounce' (known: invalid-recipient, "
      assert.equal(want, err:sub(1, #want))
      assert.falsy(err:find("stack traceback", 1, true))
    end)
  end)
end)

-- A DSN goes from <>: one that the sender's MX cannot take is lost, so a
-- DSN that cannot go whole goes with the returned message's header only.
describe("DSNs the sender's mail server cannot take whole", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-dsnfit") end)
  after_each(function() H.rm_rf(dir) end)

  -- the recipient's MX (refuses r550-*) and the sender's, each a sink;
  -- fn(mta, port, rcpt_mx, sender_mx)
  local function two_sinks(sender_args, fn)
    H.run(function()
      local rcpt_mx, sender_mx = H.sink({}), H.sink(sender_args)
      local ok, err = pcall(function()
        local mta, port = H.start_mta({}, function(m)
          m:use(require("moonpost.route").smtp({ idle_timeout = "1s",
            timeouts = { connect = 3, greeting = 3, ehlo = 3, mail = 3, rcpt = 3, data = 3, block = 3, done = 3 },
            routes = { ["x.test"] = "127.0.0.1:" .. rcpt_mx.port, ["sender.test"] = "127.0.0.1:" .. sender_mx.port } }))
        end, { spool = { dir = dir .. "/spool", min_free = 0 }, queue = { retry = { "30s" }, max_age = "1h" } })
        local fok, ferr = pcall(fn, mta, port, rcpt_mx, sender_mx)
        H.stop_mta(mta)
        if not fok then error(ferr, 0) end
      end)
      rcpt_mx.stop()
      sender_mx.stop()
      if not ok then error(err, 0) end
    end, 60)
  end

  local EIGHT = "Subject: caf\195\169 cr\195\168me\r\nFrom: <origin@sender.test>\r\n\r\nh\195\169llo w\195\182rld\r\n"

  it("sends the DSN of an 8-bit message whole, with BODY=8BITMIME, to a server that has 8BITMIME", function()
    two_sinks({}, function(_, port, _, sender_mx)
      assert.equal(250, (H.send(port, { from = "origin@sender.test", to = "r550-gone@x.test",
        mail_params = "BODY=8BITMIME", body = EIGHT })))
      assert.is_true(H.wait_for(function() return #sender_mx.messages() > 0 end, 20), H.log("origin@sender.test"))
      local m = sender_mx.messages()[1]
      assert.equal("<>", m.from)
      assert.same({ "BODY=8BITMIME" }, m.mail_params)
      assert.same({ "multipart/report", "text/plain", "message/delivery-status", "message/rfc822" },
        parse_dsn(m.data).parts)
      assert.truthy(m.data:find("h\195\169llo w\195\182rld", 1, true))
    end)
  end)

  it("sends the 8-bit message's header only, in US-ASCII, to a server without 8BITMIME, and says so", function()
    two_sinks({ "--no-8bitmime" }, function(_, port, _, sender_mx)
      assert.equal(250, (H.send(port, { from = "origin@sender.test", to = "r550-gone@x.test",
        mail_params = "BODY=8BITMIME", body = EIGHT })))
      -- before: 554 5.6.3 for the DSN, and a DSN from <> that bounces is dropped
      assert.is_true(H.wait_for(function() return #sender_mx.messages() > 0 end, 20),
        H.log("origin@sender.test") .. H.log("5.6.3"))
      local m = sender_mx.messages()[1]
      if os.getenv("DSN_DEBUG") then io.stderr:write(m.data, "\n") end
      assert.equal("<>", m.from)
      assert.same({}, m.mail_params)
      assert.falsy(m.data:find("[\128-\255]"))
      local d = parse_dsn(m.data)
      assert.same({ "multipart/report", "text/plain", "message/delivery-status", "text/rfc822-headers" }, d.parts)
      assert.truthy(d.text:find("This is a permanent\r\nerror; the message will not be retried.\r\n\r\n"
        .. "Only the header section of your message is returned below:\r\n"
        .. "the mail server this report is sent to, [127.0.0.1]:" .. sender_mx.port
        .. ", does not accept 8-bit data (8BITMIME).\r\n"
        .. "Octets outside US-ASCII in it are shown as \"?\".\r\n\r\n<r550-gone@x.test>: ", 1, true), d.text)
      assert.equal("rfc822; r550-gone@x.test", d.recipients[1]["Final-Recipient"])
      assert.truthy(m.data:find("Content-Description: Returned headers\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        .. "Received: ", 1, true), m.data)
      assert.truthy(m.data:find("\r\nSubject: caf? cr?me\r\nFrom: <origin@sender.test>\r\n\r\n--", 1, true), m.data)
      assert.falsy(m.data:find("llo w", 1, true))
      assert.truthy(H.log("DSN sent with the returned message's header section only"):find("8BITMIME", 1, true))
    end)
  end)

  -- RFC 6533: the DSN of a message that came with SMTPUTF8 is an
  -- internationalized one. Before, its report said "rfc822; " before a UTF-8
  -- address in a message/delivery-status (which must be ASCII), and returned
  -- the message as message/rfc822.
  it("sends an SMTPUTF8 message's DSN as message/global-delivery-status with utf-8 addresses", function()
    two_sinks({}, function(_, port, _, sender_mx)
      assert.equal(250, (H.send(port, { from = "origin@sender.test", to = "r550-g\195\184ne@x.test",
        mail_params = "SMTPUTF8 BODY=8BITMIME", rcpt_params = "ORCPT=utf-8;r550-g\\x{F8}ne@x.test", body = EIGHT })))
      assert.is_true(H.wait_for(function() return #sender_mx.messages() > 0 end, 20), H.log("origin@sender.test"))
      local m = sender_mx.messages()[1]
      assert.equal("<>", m.from)
      -- (its envelope and header section are ASCII: SMTPUTF8 is not needed, 8BITMIME is)
      assert.equal("BODY=8BITMIME", m.mail_params[1])
      local d = parse_dsn(m.data)
      assert.equal("delivery-status", d.report_type)
      assert.same({ "multipart/report", "text/plain", "message/global-delivery-status", "message/global" }, d.parts)
      assert.equal("utf-8; r550-g\195\184ne@x.test", d.recipients[1]["Final-Recipient"])
      assert.equal("utf-8;r550-g\195\184ne@x.test", d.recipients[1]["Original-Recipient"])
      assert.equal("failed", d.recipients[1]["Action"])
      assert.truthy(d.text:find("<r550-g\195\184ne@x.test>", 1, true), d.text)
      assert.truthy(m.data:find("h\195\169llo w\195\182rld", 1, true))
    end)
  end)

  it("stores a DSN with what it makes final in the original: its id and failed recipients (for recovery)", function()
    two_sinks({}, function(mta, port)
      -- the sender's server defers the DSN: it stays in the spool
      local code, _, text = H.send(port, { from = "r451-origin@sender.test",
        to = { "ok@x.test", "r550-gone@x.test" } })
      assert.equal(250, code)
      local orig = text:match("queued as (%x+)")
      local env
      assert.is_true(H.wait_for(function()
        mta.spool:each(function(m)
          local e = require("moonpost.runtime.spool").envelope(m)
          if e and e.dsn then env = e end
        end)
        return env ~= nil
      end, 20), H.log())
      assert.equal(orig, env.of)
      assert.equal("failed", env.act)
      assert.same({ 2 }, env.ri)
    end)
  end)

  it("sends the header only when the whole DSN exceeds the server's SIZE limit", function()
    two_sinks({ "--size", "6000" }, function(_, port, _, sender_mx)
      local big = "Subject: big\r\n\r\n" .. string.rep("0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghij\r\n", 150)
      assert.equal(250, (H.send(port, { from = "origin@sender.test", to = "r550-gone@x.test",
        mail_params = "RET=FULL", body = big })))
      -- before: 552 5.3.4 for the DSN, which was then dropped
      assert.is_true(H.wait_for(function() return #sender_mx.messages() > 0 end, 20),
        H.log("origin@sender.test") .. H.log("5.3.4"))
      local m = sender_mx.messages()[1]
      local d = parse_dsn(m.data)
      assert.same({ "multipart/report", "text/plain", "message/delivery-status", "text/rfc822-headers" }, d.parts)
      assert.truthy(d.text:find("the whole report would exceed the size limit of the mail server it is sent to, "
        .. "[127.0.0.1]:" .. sender_mx.port .. " (6000 octets).", 1, true), d.text)
      assert.truthy(m.data:find("\r\nSubject: big\r\n\r\n--", 1, true), m.data)
    end)
  end)
end)
