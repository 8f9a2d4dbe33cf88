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
      -- settled: both messages deferred for slow.test, and the delivery to
      -- fast.test done (it may finish after the deferrals of its message)
      assert.is_true(H.wait_for(function()
        local slow, fast = false, true
        for _, q in ipairs(mta:queues()) do
          if q.domain == "slow.test" and q.last_error and q.depth == 2 then slow = true end
          if q.domain == "fast.test" and q.depth ~= 0 then fast = false end
        end
        return slow and fast
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

  -- A queue's oldest message is found in a FIFO whose finished heads are
  -- dropped as they are met. Kept in a plain Lua list, a message queued
  -- once most of a long list had been dropped went out of its reach (`#`
  -- answered 0): the queue showed its depth and no oldest age.
  it("report the oldest age of a queue whose earlier messages have gone", function()
    with_sink(nil, function(sink)
      local mta, port = H.start_mta({}, function(m)
        m:use(require("moonpost.route").smtp { relay = "127.0.0.1:" .. sink.port })
      end, { spool = { dir = dir .. "/spool", min_free = 0 },
        queue = { retry = { "1h" }, domains = { ["q.test"] = { retry = { "1s" } } } } })
      local function queue()
        for _, q in ipairs(mta:queues()) do
          if q.domain == "q.test" then return q end
        end
      end
      for i = 1, 34 do assert.equal(250, (H.send(port, { to = { "ok" .. i .. "@q.test" } }))) end
      assert.is_true(H.wait_for(function() return #sink.messages() == 34 end, 20))
      -- six that are refused once, then delivered at their retry
      for i = 1, 6 do assert.equal(250, (H.send(port, { to = { "flaky1-" .. i .. "@q.test" } }))) end
      assert.is_true(H.wait_for(function()
        local q = queue()
        return q and q.depth == 6 and q.last_error ~= nil
      end, 10))
      assert.is_number(queue().oldest) -- (drops the 34 finished heads)
      assert.equal(250, (H.send(port, { to = { "r451-late@q.test" } })))
      assert.is_true(H.wait_for(function() return #sink.messages() == 40 end, 20))
      assert.is_true(H.wait_for(function() return queue().depth == 1 end, 10))
      local q = queue()
      assert.is_number(q.oldest)
      assert.is_true(q.oldest >= 0 and q.oldest < 60)
      H.stop_mta(mta)
    end)
  end)

  it("use the retry schedule of the recipient's domain", function()
    with_sink(nil, function(sink)
      local mta, port = H.start_mta({}, function(m)
        m:use(require("moonpost.route").smtp { relay = "127.0.0.1:" .. sink.port })
      end, { spool = { dir = dir .. "/spool", min_free = 0 },
        queue = { retry = { "1h" }, domains = { ["quick.test"] = { retry = { "1s" } },
          -- internationalized names match in either form
          ["Bücher.test"] = { retry = { "1s" } }, ["xn--caf-dma.test"] = { retry = { "1s" } } } } })
      assert.equal(250, (H.send(port, { to = { "flaky1-a@quick.test" } })))
      assert.equal(250, (H.send(port, { to = { "flaky1-b@slow.test" } })))
      assert.equal(250, (H.send(port, { to = { "flaky1-c@xn--bcher-kva.test" } })))
      assert.equal(250, (H.send(port, { to = { "flaky1-d@café.test" }, mail_params = "SMTPUTF8" })))
      -- quick.test is retried after a second; slow.test waits an hour
      local function arrived(rcpt)
        for _, msg in ipairs(sink.messages()) do
          if msg.rcpts[1] == rcpt then return true end
        end
      end
      assert.is_true(H.wait_for(function() return arrived("flaky1-a@quick.test") end, 10))
      assert.is_true(H.wait_for(function() return arrived("flaky1-c@xn--bcher-kva.test") end, 10))
      assert.is_true(H.wait_for(function() return arrived("flaky1-d@café.test") end, 10))
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
      local held = require("moonpost.runtime.fifo").len(Q.fifo)
      assert.is_true(held <= 64, "the FIFO holds " .. held .. " finished messages")
      H.stop_mta(mta)
    end)
    H.rm_rf(dir)
  end)
end)

-- A transport or a delivery filter with a bug costs its own recipients an
-- attempt, never the rest of the message, and never the max_age limit.
describe("transports and delivery filters that misbehave", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-misbehave") end)
  after_each(function() H.rm_rf(dir) end)

  -- An MTA whose "local" transport takes a.test (deliver(rcpts, calls) ->
  -- results) and whose default transport keeps the DSNs sent to
  -- sender.test; every other domain gets whatever `other` returns.
  local function mta_with(deliver, other, filter)
    local dsns, calls = {}, { a = 0, other = 0 }
    local mta, port = H.start_mta({}, function(m)
      m:add_transport { name = "local", domains = { "a.test" }, deliver = function(_, _, rcpts)
        calls.a = calls.a + 1
        return deliver(rcpts, calls.a)
      end }
      m:add_transport { name = "remote", deliver = function(_, body, rcpts)
        local out = {}
        if rcpts[1].domain == "sender.test" then
          dsns[#dsns + 1] = H.parse_dsn(type(body) == "string" and body or body:tostring())
          for _, r in ipairs(rcpts) do out[r.index] = { status = "delivered", text = "2.0.0 kept" } end
          return out
        end
        calls.other = calls.other + 1
        return other(rcpts)
      end }
      if filter then m:add_delivery_filter(filter) end
    end, { spool = { dir = dir .. "/spool", min_free = 0 }, queue = { retry = { "1s" }, max_age = "2s" } })
    return mta, port, dsns, calls
  end

  local function delivered(rcpts, extra)
    local out = {}
    for _, r in ipairs(rcpts) do out[r.index] = { status = "delivered", text = "2.0.0 ok", final = extra } end
    return out
  end

  local function failed_for(dsns)
    local st = {}
    for _, d in ipairs(dsns) do
      for _, r in ipairs(d.recipients) do st[r["Final-Recipient"]] = r["Action"] .. " " .. r["Status"] end
    end
    return st
  end

  it("defers a domain whose transport returns no table; the other domain is delivered once; max_age holds", function()
    H.run(function()
      local mta, port, dsns, calls = mta_with(delivered, function() return true end)
      assert.equal(250, (H.send(port, { from = "origin@sender.test", to = { "x@a.test", "y@b.test" } })))
      assert.is_true(H.wait_for(function() return #dsns == 1 and mta.spool:count() == 0 end, 20),
        "y@b.test did not expire")
      assert.same({ ["rfc822; y@b.test"] = "failed 4.4.7" }, failed_for(dsns))
      assert.equal(1, calls.a)
      assert.is_true(calls.other >= 2)
      assert.truthy(H.log("transport remote returned a boolean, not a table of results"))
      assert.matches("4%.4%.7 message expired: transport gave no result", H.log("to=<y@b.test> bounced"))
      H.stop_mta(mta)
    end)
  end)

  it("takes results with fields of the wrong type: a text that is a table, a code that is a string", function()
    H.run(function()
      local mta, port, dsns = mta_with(function(rcpts, n)
        local out = {}
        for _, r in ipairs(rcpts) do
          if r.address == "gone@a.test" then
            out[r.index] = { status = "bounced", text = { "no" }, code = "550", enhanced = 5.1, host = {}, stage = 1 }
          elseif n == 1 then
            out[r.index] = "delivered" -- not a result: no result for it this time
          else
            out[r.index] = { status = "delivered", text = 250 }
          end
        end
        return out
      end, delivered)
      assert.equal(250, (H.send(port, { from = "origin@sender.test", to = { "x@a.test", "gone@a.test" } })))
      assert.is_true(H.wait_for(function() return mta.spool:count() == 0 and #dsns == 1 end, 20),
        "the message was not finished")
      local st = failed_for(dsns)
      assert.same({ ["rfc822; gone@a.test"] = "failed 5.0.0" }, st)
      assert.equal(1, H.count(H.log("to=<x@a.test> deferred"), "transport gave no result"))
      assert.equal(1, H.count(H.log("to=<x@a.test> delivered"), "delivered: 250"))
      assert.truthy(H.log("transport local gave <x@a.test> a string, not a result table") ~= "")
      assert.truthy(H.log("transport local gave <gone@a.test> a result whose text is a table") ~= "")
      assert.truthy(H.log("transport local gave <gone@a.test> a result whose host is a table: left out") ~= "")
      assert.matches("bounced: 550 table: ", H.log("to=<gone@a.test> bounced"))
      H.stop_mta(mta)
    end)
  end)

  it("defers a recipient whose delivery filter raises, and expires it at max_age", function()
    H.run(function()
      local mta, port, dsns, calls = mta_with(delivered, delivered, function(_, rcpt)
        if rcpt.address == "boom@a.test" then error("filter bug") end
      end)
      assert.equal(250, (H.send(port, { from = "origin@sender.test", to = { "ok@a.test", "boom@a.test" } })))
      assert.is_true(H.wait_for(function() return #dsns == 1 and mta.spool:count() == 0 end, 20),
        "boom@a.test did not expire")
      assert.same({ ["rfc822; boom@a.test"] = "failed 4.4.7" }, failed_for(dsns))
      assert.equal(1, H.count(H.log("to=<ok@a.test> delivered"), "delivered"))
      assert.equal(1, calls.a)
      assert.truthy(H.log("delivery filter failed for <boom@a.test>"):find("filter bug", 1, true))
      assert.matches("deferred: 451 4%.3%.0 delivery filter failed", H.log("to=<boom@a.test> deferred"))
      H.stop_mta(mta)
    end)
  end)

  it("retries an attempt that raises on the queue's schedule, and expires the message at max_age with a DSN", function()
    H.run(function()
      -- a filter with a bug that breaks the recipient it is given: the
      -- attempt raises later, in the queue's own code, at every attempt
      local mta, port, dsns, calls = mta_with(delivered, delivered, function(_, rcpt)
        if rcpt.address == "broken@a.test" then rcpt.domain = nil end
      end)
      assert.equal(250, (H.send(port, { from = "origin@sender.test", to = { "broken@a.test" } })))
      assert.is_true(H.wait_for(function() return #dsns == 1 and mta.spool:count() == 0 end, 20),
        "broken@a.test did not expire")
      assert.same({ ["rfc822; broken@a.test"] = "failed 4.4.7" }, failed_for(dsns))
      assert.matches("4%.4%.7 message expired: 4%.3%.0 every attempt failed with an internal error",
        H.log("to=<broken@a.test> bounced"))
      assert.is_true(H.count(H.log("attempt to index field 'domain'"), "attempt to index") >= 2, "not retried")
      assert.equal("", H.log("dropped"))
      assert.equal(0, calls.a)
      H.stop_mta(mta)
    end)
  end)
end)
