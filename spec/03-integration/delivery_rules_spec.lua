-- What the SMTP client checks before sending, HELO fallback, delay
-- notifications, and relaying into a second Moonpost.
local H = require "helpers"

local with_sink = H.with_sink

local function relay_mta(dir, port, queue_opts)
  return H.start_mta({}, function(m)
    m:use(require("moonpost.route").smtp { relay = "127.0.0.1:" .. port, idle_timeout = "1s" })
  end, { spool = { dir = dir .. "/spool", min_free = 0 }, queue = queue_opts or { retry = { "1s" } } })
end

describe("delivery rules", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-rules") end)
  after_each(function() H.rm_rf(dir) end)

  it("bounces a message over the server's SIZE without sending it (5.3.4)", function()
    with_sink({ "--size", "500" }, function(sink)
      local mta, port = relay_mta(dir, sink.port)
      assert.equal(250, (H.send(port, { from = "", to = { "big@x.test" },
        body = "Subject: big\r\n\r\n" .. string.rep("0123456789\r\n", 100) })))
      assert.is_true(H.wait_for(function() return H.log("to=<big@x.test> bounced"):find("5.3.4", 1, true) end, 10))
      assert.equal(0, #sink.events("message"))
      H.stop_mta(mta)
    end)
  end)

  it("bounces an SMTPUTF8 message to a server without SMTPUTF8 (5.6.7)", function()
    with_sink({ "--no-smtputf8" }, function(sink)
      local mta, port = relay_mta(dir, sink.port)
      assert.equal(250, (H.send(port, { from = "", to = { "üser@x.test" }, mail_params = "SMTPUTF8" })))
      assert.is_true(H.wait_for(function() return H.log("to=<üser@x.test> bounced"):find("5.6.7", 1, true) end, 10))
      assert.equal(0, #sink.events("message"))
      H.stop_mta(mta)
    end)
  end)

  it("sends an all-ASCII message received with SMTPUTF8 to a server without SMTPUTF8", function()
    with_sink({ "--no-smtputf8" }, function(sink)
      local mta, port = relay_mta(dir, sink.port)
      assert.equal(250, (H.send(port, { from = "", to = { "plain@x.test" }, mail_params = "SMTPUTF8" })))
      assert.is_true(H.wait_for(function() return #sink.messages() == 1 end, 10))
      assert.same({}, sink.messages()[1].mail_params)
      H.stop_mta(mta)
    end)
  end)

  it("accepts and queues a message whose tenant a hook set to a non-string", function()
    with_sink(nil, function(sink)
      local mta, port = H.start_mta({}, function(m)
        m:on("smtp_server_mail_from", function(txn) txn.tenant = 42 end)
        m:use(require("moonpost.route").smtp { relay = "127.0.0.1:" .. sink.port })
      end, { spool = { dir = dir .. "/spool", min_free = 0 } })
      assert.equal(250, (H.send(port, { to = { "t@x.test" } })))
      assert.is_true(H.wait_for(function() return #sink.messages() == 1 end, 10))
      H.stop_mta(mta)
    end)
  end)

  it("bounces an 8BITMIME message to a server without 8BITMIME (5.6.3)", function()
    with_sink({ "--no-8bitmime" }, function(sink)
      local mta, port = relay_mta(dir, sink.port)
      assert.equal(250, (H.send(port, { from = "", to = { "eight@x.test" }, mail_params = "BODY=8BITMIME",
        body = "Subject: 8bit\r\n\r\nd\195\169j\195\160 vu\r\n" })))
      assert.is_true(H.wait_for(function() return H.log("to=<eight@x.test> bounced"):find("5.6.3", 1, true) end, 10))
      assert.equal(0, #sink.events("message"))
      H.stop_mta(mta)
    end)
  end)

  it("falls back to HELO when EHLO is refused, and then does not pipeline", function()
    with_sink({ "--no-ehlo" }, function(sink)
      local mta, port = relay_mta(dir, sink.port)
      assert.equal(250, (H.send(port, { to = { "old@x.test" } })))
      assert.is_true(H.wait_for(function() return #sink.messages() == 1 end, 10))
      assert.equal(1, #sink.events("ehlo_refused"))
      assert.equal(mta.hostname, sink.events("helo")[1].name)
      assert.is_false(sink.messages()[1].pipelined)
      assert.same({}, sink.messages()[1].mail_params) -- no ESMTP parameters after HELO
      H.stop_mta(mta)
    end)
  end)

  it("sends one delay notification when delay_warning passes (NOTIFY=DELAY)", function()
    with_sink(nil, function(sink)
      local mta, port = relay_mta(dir, sink.port, { retry = { "1s" }, delay_warning = "1s", max_age = "1h" })
      assert.equal(250, (H.send(port, { from = "origin@sender.test", to = { "r451-slow@x.test" },
        rcpt_params = "NOTIFY=DELAY,FAILURE" })))
      assert.is_true(H.wait_for(function()
        for _, m in ipairs(sink.messages()) do
          if m.rcpts[1] == "origin@sender.test" then return true end
        end
      end, 15))
      require("moonpost.runtime.sched").sleep(2.5) -- more attempts: still one notice
      local notices = {}
      for _, m in ipairs(sink.messages()) do
        if m.rcpts[1] == "origin@sender.test" then notices[#notices + 1] = m end
      end
      assert.equal(1, #notices)
      assert.truthy(notices[1].data:find("\r\nAction: delayed\r\n", 1, true))
      assert.truthy(notices[1].data:find("\r\nStatus: 4.2.0\r\n", 1, true))
      assert.truthy(notices[1].data:find("\r\nWill-Retry-Until: ", 1, true))
      H.stop_mta(mta)
    end, 60)
  end)

  it("connects from the configured source address and greets with the configured HELO name", function()
    with_sink(nil, function(sink)
      local mta, port = H.start_mta({}, function(m)
        m:use(require("moonpost.route").smtp { relay = "127.0.0.1:" .. sink.port, source = "127.0.0.5",
          helo = "out.example.net" })
      end, { spool = { dir = dir .. "/spool", min_free = 0 } })
      assert.equal(250, (H.send(port, { to = { "who@x.test" } })))
      assert.is_true(H.wait_for(function() return #sink.messages() == 1 end, 10))
      local conn = sink.messages()[1].conn
      local peer
      for _, ev in ipairs(sink.events("connect")) do if ev.conn == conn then peer = ev.peer end end
      assert.equal("127.0.0.5", peer)
      assert.equal("out.example.net", sink.events("ehlo")[#sink.events("ehlo")].name)
      H.stop_mta(mta)
    end)
  end)

  it("relays into a second Moonpost, which stores the mail", function()
    H.run(function()
      local accept = require "moonpost.accept"
      local moonpost = require "moonpost"
      -- the destination: a spool and Maildir delivery
      local dest = moonpost.new { hostname = "dest.test", spool = { dir = dir .. "/dest-spool", min_free = 0 } }
      dest:use(accept.smtp { listen = "127.0.0.1:0", log_messages = false })
      dest:use(require("moonpost.maildir").deliver { root = dir .. "/mail" })
      assert(dest:start())
      local mta, port = relay_mta(dir, dest:addresses()[1].port)
      assert.equal(250, (H.send(port, { to = { "alice@dest.test", "bob@dest.test" },
        body = "Subject: hop\r\n\r\nthrough two\r\n" })))
      assert.is_true(H.wait_for(function()
        return #H.ls(dir .. "/mail/alice/new") == 1 and #H.ls(dir .. "/mail/bob/new") == 1
      end, 10))
      local text = H.read(dir .. "/mail/alice/new/" .. H.ls(dir .. "/mail/alice/new")[1])
      -- two Received headers: one per hop, the newest first
      local first, second = text:match("^Received: from (%S+).-\r\nReceived: from (%S+)")
      assert.equal("mx.test", first)
      assert.equal("client.test", second)
      assert.truthy(text:find("through two\r\n$"))
      H.stop_mta(mta)
      H.stop_mta(dest)
    end)
  end)
end)

describe("scheduled queues", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-queues") end)
  after_each(function() H.rm_rf(dir) end)

  it("report depth, oldest age and last error per tenant@domain, from counters", function()
    with_sink(nil, function(sink)
      local mta, port = H.start_mta({}, function(m)
        m:use(require("moonpost.route").smtp { relay = "127.0.0.1:" .. sink.port })
      end, { spool = { dir = dir .. "/spool", min_free = 0 }, queue = { retry = { "1h" } } })
      assert.equal(250, (H.send(port, { to = { "r451-a@slow.test", "r451-b@slow.test", "ok@fast.test" } })))
      assert.equal(250, (H.send(port, { to = { "r451-c@slow.test" } })))
      assert.is_true(H.wait_for(function()
        for _, q in ipairs(mta:queues()) do
          if q.domain == "slow.test" and q.last_error and q.depth == 2 then return true end
        end
      end, 10))
      local byd = {}
      for _, q in ipairs(mta:queues()) do byd[q.domain] = q end
      assert.equal(2, byd["slow.test"].depth)
      assert.equal("", byd["slow.test"].tenant)
      assert.is_true(byd["slow.test"].oldest >= 0 and byd["slow.test"].oldest < 60)
      assert.matches("^451 4%.2%.0 try again later", byd["slow.test"].last_error)
      assert.is_true(byd["fast.test"] == nil or byd["fast.test"].depth == 0)
      H.stop_mta(mta)
    end)
  end)

  it("use the retry schedule of the recipient's domain", function()
    with_sink(nil, function(sink)
      local mta, port = H.start_mta({}, function(m)
        m:use(require("moonpost.route").smtp { relay = "127.0.0.1:" .. sink.port })
      end, { spool = { dir = dir .. "/spool", min_free = 0 },
        queue = { retry = { "1h" }, domains = { ["quick.test"] = { retry = { "1s" } } } } })
      assert.equal(250, (H.send(port, { to = { "flaky1-a@quick.test" } })))
      assert.equal(250, (H.send(port, { to = { "flaky1-b@slow.test" } })))
      -- quick.test is retried after a second; slow.test waits an hour
      assert.is_true(H.wait_for(function()
        for _, msg in ipairs(sink.messages()) do
          if msg.rcpts[1] == "flaky1-a@quick.test" then return true end
        end
      end, 10))
      for _, msg in ipairs(sink.messages()) do assert.are_not.equal("flaky1-b@slow.test", msg.rcpts[1]) end
      H.stop_mta(mta)
    end)
  end)
end)

describe("scheduled queue bookkeeping", function()
  it("does not keep delivered messages alive", function()
    local dir = H.tmpdir("moonpost-fifo")
    with_sink(nil, function(sink)
      local mta, port = H.start_mta({}, function(m)
        m:use(require("moonpost.route").smtp { relay = "127.0.0.1:" .. sink.port })
      end, { spool = { dir = dir .. "/spool", min_free = 0 } })
      local p = H.connect(port)
      p:script("S: 220\nC: EHLO x\nS: 250")
      for i = 1, 300 do
        p:script("C: MAIL FROM:<a@b.c>\nS: 250\nC: RCPT TO:<n" .. i .. "@bulk.test>\nS: 250\nC: DATA\nS: 354\nC: x\nC: .\nS: 250")
      end
      p:close()
      assert.is_true(H.wait_for(function() return #sink.messages() == 300 and mta.spool:count() == 0 end, 30))
      local Q = mta.queue.queues["@bulk.test"]
      assert.equal(0, Q.depth)
      assert.is_true(#Q.fifo - Q.head + 1 <= 64, "the FIFO holds " .. (#Q.fifo - Q.head + 1) .. " finished messages")
      H.stop_mta(mta)
    end)
    H.rm_rf(dir)
  end)
end)
