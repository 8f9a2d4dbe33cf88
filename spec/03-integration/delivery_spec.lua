-- Delivery over SMTP to real peers on loopback: the programmable aiosmtpd
-- sink (spec/tools/sink.py) and smtp-sink. Per-recipient outcomes, retries,
-- DSNs, expiry, pipelining, connection reuse and limits, broken servers.
local H = require "helpers"
local E = require "moonpost.runtime.spool" -- a spool entry's slots: m[E.ID], ...

-- An in-process MTA relaying everything to `port`.
local function relay_mta(dir, port, route_opts, queue_opts, spool_opts)
  local ro = { relay = "127.0.0.1:" .. port, idle_timeout = "2s",
    timeouts = { connect = 2, greeting = 2, ehlo = 2, mail = 2, rcpt = 2, data = 2, block = 2, done = 2 } }
  for k, v in pairs(route_opts or {}) do ro[k] = v end
  local mta, inport = H.start_mta({}, function(m)
    m:use(require("moonpost.route").smtp(ro))
  end, { spool = { dir = dir .. "/spool", min_free = 0, cache_bytes = spool_opts and spool_opts.cache_bytes },
    queue = queue_opts or { retry = { "1s" }, max_age = "1h" } })
  return mta, inport
end

local function by_rcpt(messages)
  local out = {}
  for _, m in ipairs(messages) do
    for _, r in ipairs(m.rcpts) do out[r] = (out[r] or 0) + 1 end
  end
  return out
end

-- Parse a DSN with Python's email package: the report's fields per recipient.
local parse_dsn = H.parse_dsn

-- Run fn(sink) in a task with a fresh sink, which is stopped however fn ends.
local with_sink = H.with_sink

describe("delivery over SMTP", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-delivery") end)
  after_each(function() H.rm_rf(dir) end)

  it("relays with PIPELINING when offered: MAIL, RCPTs and DATA in one write", function()
    with_sink(nil, function(sink)
      local mta, port = relay_mta(dir, sink.port)
      assert.equal(250, (H.send(port, { to = { "a@x.test", "b@x.test" }, body = "Subject: p\r\n\r\nhi\r\n" })))
      assert.is_true(H.wait_for(function() return #sink.messages() == 1 end))
      local m = sink.messages()[1]
      assert.is_true(m.pipelined)
      assert.same({ "a@x.test", "b@x.test" }, m.rcpts)
      assert.matches("^Received: from client%.test", m.data)
      H.stop_mta(mta)
    end)
  end)

  it("does not pipeline when the server does not offer it", function()
    with_sink({ "--no-pipelining" }, function(sink)
      local mta, port = relay_mta(dir, sink.port)
      assert.equal(250, (H.send(port, { to = { "a@x.test", "b@x.test" } })))
      assert.is_true(H.wait_for(function() return #sink.messages() == 1 end))
      assert.is_false(sink.messages()[1].pipelined)
      H.stop_mta(mta)
    end)
  end)

  it("handles mixed per-recipient outcomes in one transaction: deliver, retry, bounce with a DSN", function()
    with_sink(nil, function(sink)
      local mta, port = relay_mta(dir, sink.port)
      assert.equal(250, (H.send(port, { from = "origin@sender.test",
        to = { "ok@x.test", "flaky2-t@x.test", "r550-gone@x.test" },
        mail_params = "ENVID=env42 RET=HDRS", rcpt_params = "NOTIFY=FAILURE ORCPT=rfc822;orig+40x.test",
        body = "Subject: mixed\r\n\r\nbody\r\n" })))
      -- the DSN for r550 comes to the sender (relayed to the sink too)
      assert.is_true(H.wait_for(function()
        local got = by_rcpt(sink.messages())
        return got["ok@x.test"] == 1 and got["flaky2-t@x.test"] == 1 and got["origin@sender.test"] == 1
      end, 20))
      local first, retried, dsnmsg
      for _, m in ipairs(sink.messages()) do
        if m.rcpts[1] == "ok@x.test" then first = m end
        if m.rcpts[1] == "flaky2-t@x.test" then retried = m end
        if m.rcpts[1] == "origin@sender.test" then dsnmsg = m end
      end
      assert.same({ "ok@x.test" }, first.rcpts)
      -- flaky2: refused twice, then delivered; retried after >= 1 s each time
      assert.is_true(retried.t - first.t >= 1.5, "retried too early: " .. (retried.t - first.t))
      -- the DSN: from <>, multipart/report with the right fields
      assert.equal("<>", dsnmsg.from) -- aiosmtpd's spelling of the null sender
      local d = parse_dsn(dsnmsg.data)
      assert.equal("multipart/report", d.type)
      assert.equal("delivery-status", d.report_type)
      assert.same({ "multipart/report", "text/plain", "message/delivery-status", "text/rfc822-headers" }, d.parts)
      assert.equal("env42", d.per_message["Original-Envelope-Id"])
      assert.equal(1, #d.recipients)
      local r = d.recipients[1]
      assert.equal("rfc822; r550-gone@x.test", r["Final-Recipient"])
      assert.equal("rfc822;orig@x.test", r["Original-Recipient"])
      assert.equal("failed", r["Action"])
      assert.equal("5.1.1", r["Status"])
      assert.matches("^smtp; 550 5%.1%.1 no such user here", r["Diagnostic-Code"])
      assert.is_true(H.wait_for(function() return mta.spool:count() == 0 end, 5))
      H.stop_mta(mta)
    end)
  end)

  it("expires a message after max_age: the remaining recipients bounce with 4.4.7", function()
    with_sink(nil, function(sink)
      local mta, port = relay_mta(dir, sink.port, nil, { retry = { "1s" }, max_age = "2s" })
      assert.equal(250, (H.send(port, { from = "origin@sender.test", to = { "r451-never@x.test" } })))
      assert.is_true(H.wait_for(function() return by_rcpt(sink.messages())["origin@sender.test"] == 1 end, 20))
      local d
      for _, m in ipairs(sink.messages()) do
        if m.rcpts[1] == "origin@sender.test" then d = parse_dsn(m.data) end
      end
      assert.equal("failed", d.recipients[1]["Action"])
      assert.equal("4.4.7", d.recipients[1]["Status"])
      -- with the server and reply of the last attempt
      assert.matches("^dns; %[127%.0%.0%.1%]", d.recipients[1]["Remote-MTA"])
      assert.equal("smtp; 451 4.2.0", d.recipients[1]["Diagnostic-Code"]:sub(1, 15))
      assert.is_true(H.wait_for(function() return mta.spool:count() == 0 end, 5))
      H.stop_mta(mta)
    end)
  end)

  -- A queue of a million deferred messages costs what one entry costs, a
  -- million times. The spool's fields are array slots (8 bytes each, where
  -- a named field costs 24 and a hash part doubles past eight); the only
  -- named fields of a deferred message are the queue's two. The time of
  -- the 250 is kept beside the entry, and only until the first attempt ends.
  it("keeps a deferred message's queue entry to six slots and two named fields", function()
    with_sink(nil, function(sink)
      local mta, port = relay_mta(dir, sink.port, nil, { retry = { "1h" }, max_age = "2h" })
      assert.equal(250, (H.send(port, { from = "origin@sender.test", to = { "r451-later@x.test" } })))
      local m
      assert.is_true(H.wait_for(function()
        m = next(mta.spool.msgs) and select(2, next(mta.spool.msgs))
        return m ~= nil and m[E.ATTEMPTS] == 1 and m[E.NEXT] > os.time()
      end, 10))
      local named, slots = {}, 0
      for k in pairs(m) do
        if type(k) == "number" then slots = slots + 1 else named[#named + 1] = k end
      end
      table.sort(named)
      assert.equal(6, slots)
      assert.same({ "key", "tenant" }, named)
      assert.equal("@x.test", m.key)
      assert.is_nil(mta.queue.stored_at[m])
      H.stop_mta(mta)
    end)
  end)

  it("keeps no time of the 250 for a message a queue without a transport never attempts", function()
    H.run(function()
      local mta, port = H.start_mta({}, nil, { spool = { dir = dir .. "/spool", min_free = 0 } })
      assert.equal(250, (H.send(port, { to = { "a@x.test" } })))
      assert.equal(250, (H.send(port, { to = { "b@x.test" } })))
      assert.equal(2, mta.spool:count())
      assert.is_nil(next(mta.queue.stored_at))
      H.stop_mta(mta)
    end)
  end)

  it("never expires a message before max_age: the fraction of a second of its arrival counts", function()
    with_sink(nil, function(sink)
      local uv = require "luv"
      local sleep = require("moonpost.runtime.sched").sleep
      local mta, port = relay_mta(dir, sink.port, nil, { retry = { "1s" }, max_age = "2s" })
      -- Arrive late in a second (x.55 to x.8), then have the queue look at
      -- its messages just after second x + 2 (another message arrives): in
      -- whole seconds the first one is 2 s old then, in fact about 1.4 s.
      local sec, us
      repeat
        sec, us = uv.gettimeofday()
        local late = us >= 550000 and us < 800000
        if not late then sleep(0.02) end
      until late
      assert.equal(250, (H.send(port, { from = "origin@sender.test", to = { "r451-never@x.test" } })))
      local t0 = uv.hrtime()
      repeat
        local s2, u2 = uv.gettimeofday()
        local past = s2 > sec + 2 or (s2 == sec + 2 and u2 >= 50000)
        if not past then sleep(0.01) end
      until past
      assert.equal(250, (H.send(port, { to = { "poke@x.test" } })))
      assert.is_true(H.wait_for(function() return by_rcpt(sink.messages())["origin@sender.test"] == 1 end, 20))
      local waited = (uv.hrtime() - t0) / 1e9
      assert.is_true(waited >= 1.9, string.format("expired %.2f s after the 250 (max_age 2 s)", waited))
      H.stop_mta(mta)
    end)
  end)

  it("sends no DSN for NOTIFY=NEVER and never to the null sender", function()
    with_sink(nil, function(sink)
      local mta, port = relay_mta(dir, sink.port)
      assert.equal(250, (H.send(port, { from = "origin@sender.test", to = { "r550-a@x.test" }, rcpt_params = "NOTIFY=NEVER" })))
      assert.equal(250, (H.send(port, { from = "", to = { "r550-b@x.test" } })))
      assert.is_true(H.wait_for(function() return mta.spool:count() == 0 end, 10))
      require("moonpost.runtime.sched").sleep(0.3)
      assert.equal(0, #sink.messages())
      assert.truthy(H.log("bounce of a bounce"):find("not sent", 1, true))
      H.stop_mta(mta)
    end)
  end)

  it("reuses connections up to max_messages_per_connection", function()
    with_sink(nil, function(sink)
      local mta, port = relay_mta(dir, sink.port, { max_connections = 1, max_messages_per_connection = 5 })
      for i = 1, 20 do assert.equal(250, (H.send(port, { to = { "m" .. i .. "@x.test" } }))) end
      assert.is_true(H.wait_for(function() return #sink.messages() == 20 end, 20))
      local per = {}
      for _, m in ipairs(sink.messages()) do per[m.conn] = (per[m.conn] or 0) + 1 end
      local conns = 0
      for _, n in pairs(per) do
        conns = conns + 1
        assert.is_true(n <= 5)
      end
      assert.equal(4, conns)
      H.stop_mta(mta)
    end)
  end)

  -- RFC 2920 3.1: while more messages wait for a destination than it has
  -- connections, the next transaction's MAIL, RCPT and DATA go out in the
  -- same write as the message before them
  local function chain(sink, faults)
    local mta, port = relay_mta(dir, sink.port, { max_connections = 1 },
      { retry = { "1s" }, max_age = "1h", concurrency = 8 })
    -- the first message holds the only connection for half a second (its
    -- RCPT is answered late) while the others arrive and wait for it
    assert.equal(250, (H.send(port, { from = "origin@sender.test", to = { "slow500-first@x.test" } })))
    local big = string.rep(string.rep("y", 998) .. "\r\n", 2000) -- 2 MB: more than one write takes
    local names = {}
    for i = 1, 16 do
      local name = (faults[i] or "") .. "m" .. i
      names[i] = name
      local body = "Subject: " .. name .. "\r\n\r\nbody of " .. name .. "\r\n" .. ((i == 5 or i == 11) and big or "")
      assert.equal(250, (H.send(port, { from = "origin@sender.test", to = { name .. "@x.test" }, body = body })))
    end
    return mta, names
  end

  it("pipelines the next transaction behind a message while others wait for the connection", function()
    with_sink(nil, function(sink)
      local mta, names = chain(sink, { [8] = "d554-", [13] = "r550-" })
      -- every message but the two refused ones is accepted, and two DSNs come back
      assert.is_true(H.wait_for(function()
        local got = by_rcpt(sink.messages())
        for i, name in ipairs(names) do
          if i ~= 8 and i ~= 13 and got[name .. "@x.test"] ~= 1 then return false end
        end
        return got["origin@sender.test"] == 2
      end, 30))
      local chained, conns = 0, {}
      for _, m in ipairs(sink.messages()) do
        local name = m.rcpts[1]:match("^(.-)@x%.test$")
        if name and name ~= "slow500-first" then
          -- each transaction carried its own message, whole
          assert.truthy(m.data:find("Subject: " .. name .. "\r\n", 1, true), name)
          assert.truthy(m.data:find("body of " .. name .. "\r\n", 1, true), name)
          if name == "m5" or name == "m11" then
            assert.equal(2000, select(2, m.data:gsub(string.rep("y", 998), "")), name)
          end
        end
        if m.next_pipelined then chained = chained + 1 end
        conns[m.conn] = true
      end
      local nconns = 0
      for _ in pairs(conns) do nconns = nconns + 1 end
      assert.equal(1, nconns)
      assert.is_true(chained >= 8, "transactions pipelined behind a message: " .. chained)
      -- the results stayed with their transactions: the DSNs name the end
      -- of data's 554 and the RCPT's 550, and nothing was deferred
      local status = {}
      for _, m in ipairs(sink.messages()) do
        if m.rcpts[1] == "origin@sender.test" then
          local r = parse_dsn(m.data).recipients[1]
          status[r["Final-Recipient"]] = r["Status"]
        end
      end
      assert.same({ ["rfc822; d554-m8@x.test"] = "5.6.0", ["rfc822; r550-m13@x.test"] = "5.1.1" }, status)
      assert.equal("", H.log("deferred"))
      assert.is_true(H.wait_for(function() return mta.spool:count() == 0 end, 5))
      H.stop_mta(mta)
    end, 60)
  end)

  it("loses nothing when the connection drops with the next transaction pipelined behind a message", function()
    with_sink(nil, function(sink)
      local mta, names = chain(sink, { [6] = "dropdata1-" })
      assert.is_true(H.wait_for(function()
        local got = by_rcpt(sink.messages())
        for _, name in ipairs(names) do
          if got[name .. "@x.test"] ~= 1 then return false end
        end
        return true
      end, 30))
      -- the dropped message and the one whose commands followed it were retried
      assert.truthy(H.log("deferred"):find("connection lost", 1, true), H.log("deferred"))
      assert.equal(1, #sink.events("dropped"))
      assert.is_true(H.wait_for(function() return mta.spool:count() == 0 end, 5))
      H.stop_mta(mta)
    end, 60)
  end)

  -- The transaction pipelined behind a message whose end of data times out
  -- learns at once that the connection is broken, instead of waiting out its
  -- own MAIL timeout (60 s here) on a connection known to be dead.
  it("defers the transaction pipelined behind a message whose end-of-data reply timed out, at once", function()
    with_sink(nil, function(sink)
      local mta, port = relay_mta(dir, sink.port, { max_connections = 1,
        timeouts = { connect = 2, greeting = 2, ehlo = 2, mail = 60, rcpt = 60, data = 2, block = 2, done = 1 } },
        { retry = { "1s" }, max_age = "1h", concurrency = 8 })
      assert.equal(250, (H.send(port, { to = { "slow500-first@x.test" } })))
      assert.equal(250, (H.send(port, { to = { "dslow20000-a@x.test" } })))
      assert.equal(250, (H.send(port, { to = { "b@x.test" } })))
      assert.is_true(H.wait_for(function() return H.log("to=<b@x.test> deferred") ~= "" end, 10),
        "the transaction behind the timed-out one was not deferred")
      assert.truthy(H.log("to=<dslow20000-a@x.test> deferred"):find("timeout", 1, true))
      -- and both are delivered at their retry, on a new connection
      assert.is_true(H.wait_for(function()
        local got = by_rcpt(sink.messages())
        return got["b@x.test"] == 1 and (got["dslow20000-a@x.test"] or 0) >= 1
      end, 20))
      H.stop_mta(mta)
    end, 60)
  end)

  it("sends a message whose memory copy the spool's cache drops while the delivery waits", function()
    with_sink(nil, function(sink)
      -- a 400 kB cache keeps messages of up to 50 kB: ten of the 40 kB
      -- messages below fill it, and the eleventh pushes the first one out
      local mta, port = relay_mta(dir, sink.port, nil, nil, { cache_bytes = "400k" })
      local body = "Subject: big\r\n\r\n" .. string.rep(string.rep("x", 78) .. "\r\n", 500)
      -- every delivery waits 1.5 s for its RCPT reply, its message already
      -- read: the stores meanwhile fill the cache past its size
      for i = 1, 13 do assert.equal(250, (H.send(port, { to = { "slow1500-m" .. i .. "@x.test" }, body = body }))) end
      assert.is_true(H.wait_for(function() return #sink.messages() == 13 end, 20))
      for i = 1, 13 do assert.equal(1, by_rcpt(sink.messages())["slow1500-m" .. i .. "@x.test"]) end
      -- every body arrived whole
      local line = string.rep("x", 78)
      for _, m in ipairs(sink.messages()) do assert.equal(500, select(2, m.data:gsub(line, ""))) end
      -- one attempt each: none failed on a message closed under it
      assert.equal("", H.log("transport smtp failed"))
      assert.equal("", H.log("deferred"))
      H.stop_mta(mta)
    end)
  end)

  it("never opens more than max_connections to a destination", function()
    with_sink(nil, function(sink)
      local mta, port = relay_mta(dir, sink.port, { max_connections = 3 })
      local sched = require "moonpost.runtime.sched"
      local done = 0
      for s = 1, 10 do
        sched.spawn(function()
          for i = 1, 6 do assert(H.send(port, { to = { "c" .. s .. "-" .. i .. "@x.test" } }) == 250) end
          done = done + 1
        end)
      end
      assert.is_true(H.wait_for(function() return done == 10 and #sink.messages() == 60 end, 30))
      local peak = 0
      for _, ev in ipairs(sink.events("connect")) do
        if ev.conn > 1 and ev.open > peak then peak = ev.open end -- conn 1: the sink's own self-test
      end
      assert.is_true(peak <= 3, "peak " .. peak)
      assert.is_true(peak >= 2, "the pool should use parallel connections, peak " .. peak)
      H.stop_mta(mta)
    end)
  end)

  for _, case in ipairs({
    { "dropdata1-x", "drops the connection after the data", "connection lost" },
    { "garbage1-x", "answers with garbage", "protocol error" },
    { "stall1-x", "stalls", "timeout" },
  }) do
    it("retries, loses nothing and logs why when the server " .. case[2], function()
      with_sink(nil, function(sink)
        local mta, port = relay_mta(dir, sink.port)
        assert.equal(250, (H.send(port, { to = { case[1] .. "@x.test" }, body = "Subject: " .. case[1] .. "\r\n\r\nx\r\n" })))
        assert.is_true(H.wait_for(function() return by_rcpt(sink.messages())[case[1] .. "@x.test"] == 1 end, 20))
        assert.truthy(H.log("deferred"):find(case[3], 1, true), H.log("deferred"))
        assert.is_true(H.wait_for(function() return mta.spool:count() == 0 end, 5))
        H.stop_mta(mta)
      end, 60)
    end)
  end

  it("relays every message to smtp-sink", function()
    H.run(function()
      local sport = H.free_port()
      -- smtp-sink writes as nobody: a directory of its own it can reach
      local sinkdir = H.tmpdir("moonpost-smtpsink")
      require("luv").fs_chmod(sinkdir, 511)
      local handle, pid
      local done = false
      handle, pid = require("luv").spawn("smtp-sink", { args = { "-u", "nobody", "-d", sinkdir .. "/%M%S.", "127.0.0.1:" .. sport, "100" } },
        function() done = true handle:close() end)
      assert(handle, pid)
      H.wait_for(function() local p = H.connect(sport, nil, 1) if p then p:close() return true end end, 10)
      local mta, port = relay_mta(dir, sport)
      local code, out, err = H.exec("smtp-source", { "-d", "-s", "10", "-m", "500", "-l", "500",
        "-f", "s@src.test", "-t", "r@dst.test", "127.0.0.1:" .. port }, { timeout = 120 })
      assert.equal(0, code, out .. err)
      assert.is_true(H.wait_for(function() return mta.spool:count() == 0 end, 60))
      H.stop_mta(mta)
      require("luv").kill(pid, "sigterm")
      H.wait_for(function() return done end, 5)
      local n = #H.ls(sinkdir)
      H.rm_rf(sinkdir)
      assert.equal(500, n)
    end, 180)
  end)
end)

describe("delivery to several domains", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-domains") end)
  after_each(function() H.rm_rf(dir) end)

  it("settles what one domain delivered before the next domain's transport is called", function()
    H.run(function()
      local sched = require "moonpost.runtime.sched"
      local events, dsns = {}, {}
      local waiting, release, at_b, done_at_b = false, false, nil, nil
      local function deliver_all(rcpts, extra)
        local out = {}
        for _, r in ipairs(rcpts) do
          out[r.index] = { status = "delivered", text = "2.0.0 ok", final = extra and extra.final }
        end
        return out
      end
      local mta, port = H.start_mta({}, function(m)
        m:add_transport { name = "local", domains = { "a.test" }, deliver = function(_, _, rcpts)
          return deliver_all(rcpts, { final = true })
        end }
        m:add_transport { name = "remote", deliver = function(env, body, rcpts)
          if rcpts[1].domain == "sender.test" then
            dsns[#dsns + 1] = { data = type(body) == "string" and body or body:tostring(), while_b_waits = waiting }
          elseif rcpts[1].domain == "b.test" then
            -- x@a.test is settled by now: its event fired and its DSN is queued
            waiting = true
            at_b = { unpack(events) }
            done_at_b = env.rcpt[1].done
            while not release do sched.sleep(0.02) end
            waiting = false
          end
          return deliver_all(rcpts)
        end }
        m:on("delivery_delivered", function(_, r) events[#events + 1] = r.address end)
      end, { spool = { dir = dir .. "/spool", min_free = 0 }, queue = { retry = { "1s" } } })
      assert.equal(250, (H.send(port, { from = "origin@sender.test", to = { "x@a.test", "y@b.test" },
        rcpt_params = "NOTIFY=SUCCESS" })))
      assert.is_true(H.wait_for(function() return waiting end, 10), "b.test was not tried")
      assert.same({ "x@a.test" }, at_b)
      assert.is_true(done_at_b)
      -- x's delivered DSN goes out while b.test's delivery still runs
      assert.is_true(H.wait_for(function() return #dsns == 1 end, 10), "no DSN for x@a.test")
      assert.is_true(dsns[1].while_b_waits)
      local d = H.parse_dsn(dsns[1].data)
      assert.equal(1, #d.recipients)
      assert.equal("rfc822; x@a.test", d.recipients[1]["Final-Recipient"])
      assert.equal("delivered", d.recipients[1]["Action"])
      release = true
      assert.is_true(H.wait_for(function() return mta.spool:count() == 0 end, 10))
      -- each recipient once: in the events and in the log
      table.sort(events)
      assert.same({ "origin@sender.test", "x@a.test", "y@b.test" }, events)
      assert.equal(1, H.count(H.log("to=<x@a.test> delivered"), "delivered"))
      assert.equal(1, #dsns)
      H.stop_mta(mta)
    end)
  end)
end)
