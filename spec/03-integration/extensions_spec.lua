-- CHUNKING (BDAT), DSN, SMTPUTF8, extension switches, IPv6 listeners and
-- the connection cap.
local H = require "helpers"
local sched = require "moonpost.runtime.sched"

local function server(opts)
  local got = {}
  local mta, port = H.start_mta(opts, function(mta)
    mta:on("smtp_server_message_received", function(txn, msg)
      got[#got + 1] = { txn = txn, data = msg:tostring() }
    end)
  end)
  return mta, port, got
end

local function content(m)
  return m.data:match("^Received: .-%+0000\r\n(.*)$")
end

describe("CHUNKING", function()
  it("receives a message in BDAT chunks, pipelined, with no dot handling", function()
    H.run(function()
      local mta, port, got = server()
      local p = H.connect(port)
      p:script("S: 220\nC: EHLO x\nS: 250")
      local part1 = "Subject: chunked\r\n\r\n.not stuffed\r\n"
      local part2 = ".\r\nend\r\n"
      p:send("MAIL FROM:<a@b.c>\r\nRCPT TO:<r@b.c>\r\nBDAT " .. #part1 .. "\r\n" .. part1
        .. "BDAT " .. #part2 .. " LAST\r\n" .. part2)
      p:expect(250, "2.1.0")
      p:expect(250, "2.1.5")
      p:expect(250, "2.0.0", #part1 .. " octets received")
      p:expect(250, "2.0.0", "queued as")
      p:close()
      assert.equal(1, #got)
      assert.equal(part1 .. part2, content(got[1]))
      H.stop_mta(mta)
    end)
  end)

  it("BDAT 0 LAST ends a message; BDAT out of sequence is read, then answered 503", function()
    H.run(function()
      local mta, port, got = server()
      local p = H.connect(port)
      p:script("S: 220\nC: EHLO x\nS: 250")
      -- no transaction: the 10 octets must still be consumed
      p:send("BDAT 10\r\nRSET\r\nXXXX")
      p:expect(503, "5.5.1")
      p:cmd("NOOP")
      p:expect(250)
      p:script("C: MAIL FROM:<a@b.c>\nS: 250\nC: RCPT TO:<r@b.c>\nS: 250")
      p:send("BDAT 5\r\nhello")
      p:expect(250)
      p:cmd("DATA")
      p:expect(503, "5.5.1", "BDAT")
      p:cmd("BDAT 0 LAST")
      p:expect(250, "2.0.0", "queued")
      p:close()
      assert.equal("hello", content(got[1]))
      H.stop_mta(mta)
    end)
  end)

  it("closes the session on a BDAT without a usable size (the input cannot be framed)", function()
    H.run(function()
      local mta, port = server()
      for _, bad in ipairs({ "BDAT", "BDAT x LAST", "BDAT 10 FIRST", "BDAT 1234567890123456 LAST" }) do
        local p = H.connect(port)
        p:script("S: 220\nC: EHLO x\nS: 250\nC: " .. bad .. "\nS: 501 5.5.4")
        p:cmd("HELP")
        assert.is_true(p:closed(), bad)
        p:close()
      end
      H.stop_mta(mta)
    end)
  end)

  -- A BDAT line refused before it is parsed (a NUL, a bare LF under
  -- bare_lf = "reject", over the line limit) does not frame its chunk: the
  -- chunk is content and must never run as commands.
  it("closes the session on a BDAT line it refuses, so the chunk is not run as commands", function()
    H.run(function()
      local mta, port, got = server({ bare_lf = "reject" })
      local chunk = "RSET\r\nMAIL FROM:<chunk@evil.test>\r\nRCPT TO:<victim@b.c>\r\n"
      for _, line in ipairs({ "BDAT " .. #chunk .. " LAST\n", "BDAT " .. #chunk .. " LAST\0\r\n",
        "BDAT " .. #chunk .. " LAST" .. string.rep(" ", 600) .. "\r\n",
        "bdat " .. #chunk .. " LAST" .. string.rep(" ", 20000) .. "\r\n" }) do
        local p = H.connect(port)
        p:script("S: 220\nC: EHLO x\nS: 250\nC: MAIL FROM:<a@b.c>\nS: 250\nC: RCPT TO:<r@b.c>\nS: 250")
        p:send(line .. chunk)
        p:expect(500, "5.5.2")
        -- nothing of the chunk was answered: the connection is closed
        assert.is_true(p:closed(), line:sub(1, 20))
        p:close()
      end
      -- a too-long line of another command still gets its 500 and the session goes on
      local p = H.connect(port)
      p:script("S: 220\nC: EHLO x\nS: 250")
      p:cmd("NOOP " .. string.rep("n", 600))
      p:expect(500, "5.5.2")
      p:script("C: NOOP\nS: 250")
      p:close()
      assert.equal(0, #got)
      H.stop_mta(mta)
    end)
  end)

  it("rejects an oversized message with 552 5.3.4 and fails the transaction", function()
    H.run(function()
      local mta, port, got = server({ max_message_size = 100 })
      local p = H.connect(port)
      p:script([[
        S: 220
        C: EHLO x
        S: 250
        C: MAIL FROM:<a@b.c>
        S: 250
        C: RCPT TO:<r@b.c>
        S: 250
      ]])
      p:send("BDAT 150 LAST\r\n" .. string.rep("z", 150))
      p:expect(552, "5.3.4")
      -- the transaction failed as a whole (RFC 3030)
      p:cmd("BDAT 1 LAST")
      p:send("z")
      p:expect(503, "5.5.1")
      p:close()
      assert.equal(0, #got)
      H.stop_mta(mta)
    end)
  end)

  it("is not offered and refused when switched off", function()
    H.run(function()
      local mta, port = server({ extensions = { chunking = false } })
      local p = H.connect(port)
      p:expect(220)
      p:cmd("EHLO x")
      assert.falsy(p:expect(250):find("CHUNKING", 1, true))
      p:script("C: MAIL FROM:<a@b.c>\nS: 250\nC: RCPT TO:<r@b.c>\nS: 250")
      p:send("BDAT 3 LAST\r\nabc")
      p:expect(503, "5.5.1", "not enabled")
      p:close()
      H.stop_mta(mta)
    end)
  end)
end)

describe("DSN", function()
  it("keeps RET, ENVID, NOTIFY and ORCPT with the envelope", function()
    H.run(function()
      local mta, port, got = server()
      local p = H.connect(port)
      p:script([[
        S: 220
        C: EHLO x
        S: 250
        C: MAIL FROM:<bounce@b.c> RET=HDRS ENVID=QQ314159
        S: 250
        C: RCPT TO:<r1@b.c> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;r1+40b.c
        S: 250
        C: RCPT TO:<r2@b.c> NOTIFY=NEVER
        S: 250
        C: RCPT TO:<r3@b.c>
        S: 250
        C: DATA
        S: 354
        C: x
        C: .
        S: 250
      ]])
      p:close()
      local txn = got[1].txn
      assert.equal("HDRS", txn.ret)
      assert.equal("QQ314159", txn.envid)
      assert.equal("SUCCESS,DELAY", txn.recipients[1].notify)
      assert.equal("rfc822;r1+40b.c", txn.recipients[1].orcpt)
      assert.equal("NEVER", txn.recipients[2].notify)
      assert.is_nil(txn.recipients[3].notify)
      H.stop_mta(mta)
    end)
  end)

  it("refuses DSN parameters when DSN is switched off", function()
    H.run(function()
      local mta, port = server({ extensions = { dsn = false } })
      local p = H.connect(port)
      p:expect(220)
      p:cmd("EHLO x")
      assert.falsy(p:expect(250):find("DSN", 1, true))
      p:script("C: MAIL FROM:<a@b.c> RET=FULL\nS: 555 5.5.4\nC: MAIL FROM:<a@b.c>\nS: 250\nC: RCPT TO:<r@b.c> NOTIFY=NEVER\nS: 555 5.5.4")
      p:close()
      H.stop_mta(mta)
    end)
  end)
end)

describe("SMTPUTF8", function()
  it("accepts UTF-8 addresses with SMTPUTF8 and marks the transaction", function()
    H.run(function()
      local mta, port, got = server()
      local p = H.connect(port)
      p:script([[
        S: 220
        C: EHLO x
        S: 250
        C: MAIL FROM:<José@ejemplo.es>
        S: 553 5.6.7
        C: MAIL FROM:<José@ejemplo.es> SMTPUTF8
        S: 250
        C: RCPT TO:<用户@例子.广告>
        S: 250
        C: DATA
        S: 354
        C: Subject: ünïcödé
        C:
        C: ✓
        C: .
        S: 250
      ]])
      p:close()
      local txn = got[1].txn
      assert.is_true(txn.smtputf8)
      assert.equal("José@ejemplo.es", txn.sender.address)
      assert.equal("用户@例子.广告", txn.recipients[1].address)
      assert.matches("with UTF8SMTP id", got[1].data)
      H.stop_mta(mta)
    end)
  end)

  it("refuses the SMTPUTF8 parameter when the extension is off", function()
    H.run(function()
      local mta, port = server({ extensions = { smtputf8 = false } })
      local p = H.connect(port)
      p:script("S: 220\nC: EHLO x\nS: 250\nC: MAIL FROM:<a@b.c> SMTPUTF8\nS: 555 5.5.4")
      p:close()
      H.stop_mta(mta)
    end)
  end)
end)

describe("listeners", function()
  it("listen on IPv6 loopback", function()
    H.run(function()
      local mta, port, got = server({ listen = "[::1]:0" })
      assert.equal("::1", mta:addresses()[1].host)
      local p = assert(H.connect(port, "::1"))
      p:script("S: 220\nC: EHLO x\nS: 250\nC: MAIL FROM:<a@b.c>\nS: 250\nC: RCPT TO:<r@b.c>\nS: 250\nC: DATA\nS: 354\nC: v6\nC: .\nS: 250")
      p:close()
      assert.equal("::1", got[1].txn.conn.remote_ip)
      assert.matches("from x %(%[IPv6:::1%]%)", got[1].data)
      H.stop_mta(mta)
    end)
  end)

  it("listen on several addresses at once", function()
    H.run(function()
      local mta = H.start_mta({ listen = { "127.0.0.1:0", "[::1]:0" } })
      local a = mta:addresses()
      assert.equal(2, #a)
      for _, addr in ipairs(a) do
        local p = assert(H.connect(addr.port, addr.host))
        p:expect(220)
        p:close()
      end
      H.stop_mta(mta)
    end)
  end)

  it("refuse connections over max_connections with 421 4.7.0", function()
    H.run(function()
      local mta, port = server({ max_connections = 2 })
      local a, b = H.connect(port), H.connect(port)
      a:expect(220)
      b:expect(220)
      local c = H.connect(port)
      c:expect(421, "4.7.0", "too many connections")
      assert.is_true(c:closed())
      c:close()
      a:cmd("QUIT") a:expect(221) a:close()
      sched.sleep(0.05)
      local d = H.connect(port)
      d:expect(220)
      d:close()
      b:close()
      H.stop_mta(mta)
    end)
  end)

  it("fail to start on an address in use, naming it", function()
    H.run(function()
      local mta, port = H.start_mta({})
      local moonpost = require "moonpost"
      local accept = require "moonpost.accept"
      local m2 = moonpost.new { hostname = "x" }
      m2:use(accept.smtp { listen = "127.0.0.1:" .. port })
      local ok, err = m2:start()
      assert.is_nil(ok)
      assert.matches("cannot listen on 127.0.0.1:" .. port, err)
      assert.matches("EADDRINUSE", err)
      H.stop_mta(mta)
    end)
  end)
end)
