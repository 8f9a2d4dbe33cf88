-- The SMTP server session over real loopback sockets, driven by a scripted
-- peer: every limit and error with its reply code and enhanced status code.
local H = require "helpers"
local sched = require "moonpost.runtime.sched"

-- Start a server whose message_received hook keeps what arrives.
local function server(opts, setup)
  local got = {}
  local mta, port = H.start_mta(opts, function(mta, moonpost)
    mta:on("smtp_server_message_received", function(txn, msg)
      got[#got + 1] = { txn = txn, data = msg:tostring() }
    end)
    if setup then setup(mta, moonpost) end
  end)
  return mta, port, got
end

-- The message as the client sent it: without our Received header, and
-- without the header section when there is one.
local function body_of(m)
  local content = m.data:match("^Received: .-%+0000\r\n(.*)$") or m.data
  return content:match("\r\n\r\n(.*)$") or content
end

describe("smtp server session", function()
  it("greets, lists the extensions and accepts a message", function()
    H.run(function()
      local mta, port, got = server()
      local p = H.connect(port)
      p:expect(220, nil, "mx.test ESMTP Moonpost")
      p:cmd("EHLO client.test")
      local t = p:expect(250)
      for _, ext in ipairs({ "PIPELINING", "SIZE 52428800", "8BITMIME", "ENHANCEDSTATUSCODES",
        "SMTPUTF8", "CHUNKING", "DSN" }) do
        assert.truthy(t:find("\n" .. ext .. "\n", 1, true) or t:find("\n" .. ext .. "$"), ext)
      end
      p:script([[
        C: MAIL FROM:<sender@client.test>
        S: 250 2.1.0
        C: RCPT TO:<rcpt@mx.test>
        S: 250 2.1.5
        C: DATA
        S: 354
        C: Subject: hello
        C:
        C: body line
        C: .
        S: 250 2.0.0 Ok: queued as
        C: QUIT
        S: 221 2.0.0
      ]])
      assert.is_true(p:closed())
      p:close()
      assert.equal(1, #got)
      assert.equal("sender@client.test", got[1].txn.sender.address)
      assert.equal("rcpt@mx.test", got[1].txn.recipients[1].address)
      assert.equal("body line\r\n", body_of(got[1]))
      H.stop_mta(mta)
    end)
  end)

  it("prepends an RFC 5321 Received header with the protocol keyword", function()
    H.run(function()
      local mta, port, got = server()
      local p = H.connect(port)
      p:script([[
        S: 220
        C: EHLO client.test
        S: 250
        C: MAIL FROM:<a@client.test>
        S: 250
        C: RCPT TO:<b@mx.test>
        S: 250
        C: DATA
        S: 354
        C: Subject: x
        C: .
        S: 250
        C: HELO old.client
        S: 250 mx.test
        C: MAIL FROM:<a@client.test>
        S: 250
        C: RCPT TO:<b@mx.test>
        S: 250
        C: DATA
        S: 354
        C: Subject: y
        C: .
        S: 250
      ]])
      p:close()
      local r1 = got[1].data
      assert.matches("^Received: from client%.test %(%[127%.0%.0%.1%]%)\r\n\tby mx%.test %(Moonpost%) with ESMTP id %x+\r\n\tfor <b@mx%.test>;\r\n\t%a%a%a, %d%d %a%a%a %d%d%d%d %d%d:%d%d:%d%d %+0000\r\nSubject: x\r\n$", r1)
      assert.matches("with SMTP id " .. got[2].txn.id, got[2].data)
      -- the From part follows the session's latest HELO
      assert.matches("^Received: from old%.client %(%[127%.0%.0%.1%]%)\r\n", got[2].data)
      assert.truthy(got[1].data:find(got[1].txn.id, 1, true))
      H.stop_mta(mta)
    end)
  end)

  it("shows a HELO name that is not a domain as a cleaned comment, message by message", function()
    -- one transaction of the transcript
    local function message(subject)
      return "C: MAIL FROM:<a@client.test>\nS: 250\nC: RCPT TO:<b@mx.test>\nS: 250\nC: DATA\nS: 354\n"
        .. "C: Subject: " .. subject .. "\nC: .\nS: 250\n"
    end
    H.run(function()
      local mta, port, got = server()
      local p = H.connect(port)
      p:script("S: 220\nC: EHLO bad<name>(x)\nS: 250\n" .. message("x") .. message("y")
        .. "C: EHLO good.client\nS: 250\n" .. message("z"))
      p:close()
      for i = 1, 2 do
        assert.matches("^Received: from %[127%.0%.0%.1%] %(helo=bad%?name%?%?x%?%)\r\n", got[i].data)
      end
      assert.matches("^Received: from good%.client %(%[127%.0%.0%.1%]%)\r\n", got[3].data)
      H.stop_mta(mta)
    end)
  end)

  it("answers commands out of sequence with 503 5.5.1 and 554 5.5.1", function()
    H.run(function()
      local mta, port = server()
      local p = H.connect(port)
      p:script([[
        S: 220
        C: MAIL FROM:<a@b.c>
        S: 503 5.5.1
        C: RCPT TO:<a@b.c>
        S: 503 5.5.1
        C: DATA
        S: 503 5.5.1
        C: EHLO x
        S: 250
        C: RCPT TO:<a@b.c>
        S: 503 5.5.1 need MAIL
        C: DATA
        S: 503 5.5.1
        C: MAIL FROM:<a@b.c>
        S: 250
        C: MAIL FROM:<a@b.c>
        S: 503 5.5.1 nested MAIL
        C: DATA
        S: 554 5.5.1 no valid recipients
        C: RSET
        S: 250 2.0.0
        C: RCPT TO:<x@y.z>
        S: 503 5.5.1
      ]])
      p:close()
      H.stop_mta(mta)
    end)
  end)

  it("answers unknown commands, syntax errors and bad parameters with their codes", function()
    H.run(function()
      local mta, port = server({ max_errors = 100 })
      local p = H.connect(port)
      p:script([[
        S: 220
        C: EHLO
        S: 501 5.5.4
        C: FOO bar
        S: 500 5.5.2 not recognized
        C:
        S: 500 5.5.2
        C: EHLO x
        S: 250
        C: MAIL <a@b.c>
        S: 501 5.5.2
        C: MAIL FROM:<a..b@c.d>
        S: 553 5.1.7
        C: MAIL FROM:<a@b.c> SIZE=abc
        S: 501 5.5.4
        C: MAIL FROM:<a@b.c> XFOO=1
        S: 555 5.5.4 Unsupported parameter XFOO
        C: MAIL FROM:<a@b.c> BODY=BINARYMIME
        S: 555 5.5.4
        C: MAIL FROM:<a@b.c> NOTIFY=NEVER
        S: 555 5.5.4
        C: MAIL FROM:<a@b.c> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=env+2B1
        S: 250 2.1.0
        C: RCPT TO:<bad@@x>
        S: 553 5.1.3
        C: RCPT TO:<a@b.c> RET=FULL
        S: 555 5.5.4
        C: RCPT TO:<a@b.c> NOTIFY=NEVER,DELAY
        S: 501 5.5.4
        C: RCPT TO:<ü@b.c>
        S: 553 5.6.7
        C: DATA extra
        S: 501 5.5.4
        C: RSET now
        S: 501 5.5.4
        C: QUIT now
        S: 501 5.5.4
        C: VRFY
        S: 501 5.5.4
        C: VRFY someone
        S: 252 2.0.0
        C: EXPN list
        S: 502 5.5.1
        C: HELP
        S: 214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP
        C: NOOP anything
        S: 250 2.0.0
        C: AUTH PLAIN
        S: 502 5.5.1
        C: STARTTLS
        S: 502 5.5.1
      ]])
      p:close()
      H.stop_mta(mta)
    end)
  end)

  it("takes a raw UTF-8 ORCPT only in an SMTPUTF8 transaction (553 5.6.7 otherwise)", function()
    H.run(function()
      local mta, port, got = server()
      local p = H.connect(port)
      local raw = "utf-8;j\xc3\xb6@b.c"
      p:script(table.concat({
        "S: 220", "C: EHLO x", "S: 250",
        "C: MAIL FROM:<a@b.c>", "S: 250 2.1.0",
        "C: RCPT TO:<r@b.c> ORCPT=" .. raw, "S: 553 5.6.7 Non-ASCII ORCPT needs SMTPUTF8",
        "C: RCPT TO:<r@b.c> ORCPT=utf-8;j\\x{F6}@b.c", "S: 250 2.1.5",
        "C: RSET", "S: 250",
        "C: MAIL FROM:<a@b.c> SMTPUTF8", "S: 250 2.1.0",
        "C: RCPT TO:<r@b.c> ORCPT=" .. raw, "S: 250 2.1.5",
        "C: DATA", "S: 354",
      }, "\n"))
      p:send("Subject: x\r\n\r\nx\r\n.\r\n")
      p:expect(250)
      p:close()
      assert.is_true(H.wait_for(function() return #got == 1 end, 5))
      assert.equal(raw, got[1].txn.recipients[1].orcpt)
      H.stop_mta(mta)
    end)
  end)

  it("refuses an ENVID or ORCPT whose xtext stands for a control character with 501 5.5.4", function()
    H.run(function()
      local mta, port, got = server()
      local p = H.connect(port)
      p:script([[
        S: 220
        C: EHLO x
        S: 250
        C: MAIL FROM:<a@b.c> ENVID=x+0D+0AX-Injected:+20yes
        S: 501 5.5.4 ENVID must be printable US-ASCII: no control character (xtext +00 to +1F, +7F)
        C: MAIL FROM:<a@b.c> ENVID=x+7F
        S: 501 5.5.4 ENVID must be printable US-ASCII
        C: MAIL FROM:<a@b.c> ENVID=QQ+20314159
        S: 250 2.1.0
        C: RCPT TO:<r@b.c> ORCPT=rfc822;r@b.c+0D+0AAction:+20delivered
        S: 501 5.5.4 ORCPT address must be printable: no control character (xtext +00 to +1F, +7F)
        C: RCPT TO:<r@b.c> NOTIFY=FAILURE ORCPT=rfc822;r+2Bx@b.c
        S: 250 2.1.5
        C: DATA
        S: 354
      ]])
      p:send("Subject: x\r\n\r\nx\r\n.\r\n")
      p:expect(250)
      p:close()
      assert.is_true(H.wait_for(function() return #got == 1 end, 5))
      assert.equal("QQ+20314159", got[1].txn.envid)
      assert.equal("rfc822;r+2Bx@b.c", got[1].txn.recipients[1].orcpt)
      H.stop_mta(mta)
    end)
  end)

  it("takes domain literals by default; with domain_literals = false only those in local_domains", function()
    H.run(function()
      local mta, port = server()
      local p = H.connect(port)
      p:script([[
        S: 220
        C: EHLO x
        S: 250
        C: MAIL FROM:<a@b.c>
        S: 250
        C: RCPT TO:<u@[127.0.0.2]>
        S: 250 2.1.5
        C: RCPT TO:<u@[IPv6:::1]>
        S: 250 2.1.5
      ]])
      p:close()
      H.stop_mta(mta)
      mta, port = server({ domain_literals = false, local_domains = { "[192.0.2.1]" } })
      p = H.connect(port)
      p:script([[
        S: 220
        C: EHLO x
        S: 250
        C: MAIL FROM:<a@b.c>
        S: 250
        C: RCPT TO:<u@[127.0.0.2]>
        S: 550 5.7.1 Domain literals are not accepted here
        C: RCPT TO:<u@[IPv6:::1]>
        S: 550 5.7.1 Domain literals are not accepted here
        C: RCPT TO:<u@[192.0.2.1]>
        S: 250 2.1.5
        C: RCPT TO:<u@example.org>
        S: 250 2.1.5
      ]])
      p:close()
      H.stop_mta(mta)
    end)
  end)

  it("rejects ESMTP parameters after HELO with 555 5.5.4", function()
    H.run(function()
      local mta, port = server()
      local p = H.connect(port)
      p:script([[
        S: 220
        C: HELO x
        S: 250
        C: MAIL FROM:<a@b.c> SIZE=10
        S: 555 5.5.4
        C: MAIL FROM:<a@b.c>
        S: 250
      ]])
      p:close()
      H.stop_mta(mta)
    end)
  end)

  it("rejects a command line over 512 octets with 500 5.5.2 and keeps the session", function()
    H.run(function()
      local mta, port = server()
      local p = H.connect(port)
      p:expect(220)
      p:cmd("NOOP " .. string.rep("x", 600))
      p:expect(500, "5.5.2", "too long")
      p:cmd("NOOP " .. string.rep("x", 505))
      p:expect(250)
      p:cmd("EHLO x")
      p:expect(250)
      -- MAIL gets the ESMTP parameter allowance: this line is parsed, not refused
      p:cmd("MAIL FROM:<a@b.c> ENVID=" .. string.rep("x", 100) .. " AUTH=" .. string.rep("y", 500))
      p:expect(555, "5.5.4", "AUTH")
      p:close()
      H.stop_mta(mta)
    end)
  end)

  it("rejects NUL and bare CR inside commands", function()
    H.run(function()
      local mta, port = server()
      local p = H.connect(port)
      p:expect(220)
      p:send("NO\0OP\r\n")
      p:expect(500, "5.5.2", "bad character")
      p:send("NO\rOP\r\n")
      p:expect(500, "5.5.2")
      p:send("NOOP\n")
      p:expect(250)
      p:close()
      H.stop_mta(mta)
    end)
  end)

  it("enforces max_recipients with 452 4.5.3", function()
    H.run(function()
      local mta, port, got = server({ max_recipients = 3 })
      local p = H.connect(port)
      p:expect(220)
      p:cmd("EHLO x") p:expect(250)
      p:cmd("MAIL FROM:<a@b.c>") p:expect(250)
      for i = 1, 3 do
        p:cmd("RCPT TO:<r" .. i .. "@b.c>")
        p:expect(250, "2.1.5")
      end
      p:cmd("RCPT TO:<r4@b.c>")
      p:expect(452, "4.5.3")
      p:cmd("DATA") p:expect(354)
      p:send("x\r\n.\r\n") p:expect(250)
      p:close()
      assert.equal(3, #got[1].txn.recipients)
      H.stop_mta(mta)
    end)
  end)

  it("enforces the message size: SIZE at MAIL and while streaming, 552 5.3.4", function()
    H.run(function()
      local mta, port, got = server({ max_message_size = 1000 })
      local p = H.connect(port)
      p:expect(220)
      p:cmd("EHLO x")
      assert.truthy(p:expect(250):find("SIZE 1000", 1, true))
      p:cmd("MAIL FROM:<a@b.c> SIZE=1001")
      p:expect(552, "5.3.4")
      p:cmd("MAIL FROM:<a@b.c> SIZE=500") p:expect(250)
      p:cmd("RCPT TO:<r@b.c>") p:expect(250)
      p:cmd("DATA") p:expect(354)
      p:send(string.rep("0123456789abcdef\r\n", 100) .. ".\r\n")
      p:expect(552, "5.3.4")
      -- the session goes on, the transaction is gone
      p:cmd("RCPT TO:<r@b.c>") p:expect(503, "5.5.1")
      p:cmd("MAIL FROM:<a@b.c>") p:expect(250)
      p:cmd("RCPT TO:<r@b.c>") p:expect(250)
      p:cmd("DATA") p:expect(354)
      p:send("small\r\n.\r\n") p:expect(250)
      p:close()
      assert.equal(1, #got)
      H.stop_mta(mta)
    end)
  end)

  it("rejects a message with a line over 1000 octets with 550 5.6.0", function()
    H.run(function()
      local mta, port, got = server()
      local p = H.connect(port)
      p:script("S: 220\nC: EHLO x\nS: 250\nC: MAIL FROM:<a@b.c>\nS: 250\nC: RCPT TO:<r@b.c>\nS: 250\nC: DATA\nS: 354")
      p:send(string.rep("x", 999) .. "\r\n.\r\n")
      p:expect(550, "5.6.0", "longer than 1000")
      p:close()
      assert.equal(0, #got)
      H.stop_mta(mta)
    end)
  end)

  it("disconnects after max_errors with 421 4.7.0", function()
    H.run(function()
      local mta, port = server({ max_errors = 3 })
      local p = H.connect(port)
      p:expect(220)
      p:cmd("BAD1") p:expect(500)
      p:cmd("BAD2") p:expect(500)
      p:cmd("BAD3") p:expect(421, "4.7.0", "too many errors")
      assert.is_true(p:closed())
      p:close()
      H.stop_mta(mta)
    end)
  end)

  it("closes an idle session at the command timeout with 421 4.4.2", function()
    H.run(function()
      local mta, port = server({ command_timeout = 0.3 })
      local p = H.connect(port)
      p:expect(220)
      p:cmd("EHLO x") p:expect(250)
      p:expect(421, "4.4.2", "timeout")
      assert.is_true(p:closed())
      p:close()
      H.stop_mta(mta)
    end)
  end)

  -- command_timeout is the time for a whole line: trickled octets do not
  -- restart it (a session held for days one byte at a time otherwise)
  it("closes a session that trickles a command line at the command timeout, for commands and AUTH", function()
    H.run(function()
      local mta, port = server({ command_timeout = 0.5,
        auth = { allow_plaintext = true, check = function() return false end } })
      for _, auth in ipairs({ false, true }) do
        local p = H.connect(port)
        p:expect(220)
        p:cmd("EHLO x") p:expect(250)
        if auth then
          p:cmd("AUTH LOGIN") p:expect(334)
        end
        -- 2.4 s of one octet every 0.08 s, never a whole line
        for _ = 1, 30 do
          if not pcall(p.send, p, "z") then break end
          sched.sleep(0.08)
        end
        pcall(p.send, p, "\r\n")
        -- the first reply is the timeout, not an answer to the trickled line
        p:expect(421, "4.4.2", "timeout")
        assert.is_true(p:closed())
        p:close()
      end
      H.stop_mta(mta)
    end)
  end)

  it("closes a stalled DATA at the data timeout with 421 4.4.2 and delivers nothing", function()
    H.run(function()
      local mta, port, got = server({ data_timeout = 0.3, command_timeout = 30 })
      local p = H.connect(port)
      p:script("S: 220\nC: EHLO x\nS: 250\nC: MAIL FROM:<a@b.c>\nS: 250\nC: RCPT TO:<r@b.c>\nS: 250\nC: DATA\nS: 354")
      p:send("partial line")
      p:expect(421, "4.4.2")
      assert.is_true(p:closed())
      p:close()
      assert.equal(0, #got)
      H.stop_mta(mta)
    end)
  end)

  it("handles pipelined command groups split at every byte boundary", function()
    H.run(function()
      local mta, port, got = server()
      local group = "MAIL FROM:<a@b.c>\r\nRCPT TO:<r1@b.c>\r\nRCPT TO:<r2@b.c>\r\nDATA\r\n"
      local p = H.connect(port)
      p:expect(220)
      p:cmd("EHLO x") p:expect(250)
      for cut = 0, #group do
        p:send(group:sub(1, cut))
        sched.sleep(0.002)
        p:send(group:sub(cut + 1))
        p:expect(250, "2.1.0")
        p:expect(250, "2.1.5")
        p:expect(250, "2.1.5")
        p:expect(354)
        p:send("cut " .. cut .. "\r\n.\r\n")
        p:expect(250, "2.0.0")
      end
      p:close()
      assert.equal(#group + 1, #got)
      for i, m in ipairs(got) do
        assert.equal(2, #m.txn.recipients)
        assert.equal("cut " .. (i - 1) .. "\r\n", m.data:match("\r\n\r\n?(cut %d+\r\n)$")
          or m.data:match("(cut %d+\r\n)$"))
      end
      H.stop_mta(mta)
    end)
  end)

  it("answers a whole pipelined group in one batch, in order", function()
    H.run(function()
      local mta, port, got = server()
      local p = H.connect(port)
      p:expect(220)
      p:send("EHLO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<bad>\r\nRCPT TO:<ok@b.c>\r\nDATA\r\n")
      p:expect(250)
      p:expect(250, "2.1.0")
      p:expect(553, "5.1.3")
      p:expect(250, "2.1.5")
      p:expect(354)
      p:send("x\r\n.\r\nMAIL FROM:<c@d.e>\r\nRCPT TO:<f@g.h>\r\nDATA\r\n")
      p:expect(250, "2.0.0")
      p:expect(250)
      p:expect(250)
      p:expect(354)
      p:send("y\r\n.\r\nQUIT\r\n")
      p:expect(250)
      p:expect(221)
      p:close()
      assert.equal(2, #got)
      H.stop_mta(mta)
    end)
  end)

  it("ends DATA on CRLF.CRLF split across reads", function()
    H.run(function()
      local mta, port, got = server()
      local p = H.connect(port)
      p:script("S: 220\nC: EHLO x\nS: 250")
      local ends = { { "body\r", "\n.\r\n" }, { "body\r\n", ".\r\n" }, { "body\r\n.", "\r\n" },
        { "body\r\n.\r", "\n" } }
      for _, e in ipairs(ends) do
        p:script("C: MAIL FROM:<a@b.c>\nS: 250\nC: RCPT TO:<r@b.c>\nS: 250\nC: DATA\nS: 354")
        p:send(e[1])
        sched.sleep(0.02)
        p:send(e[2])
        p:expect(250, "2.0.0")
      end
      p:close()
      assert.equal(4, #got)
      for _, m in ipairs(got) do assert.equal("body\r\n", body_of(m)) end
      H.stop_mta(mta)
    end)
  end)

  local smuggling = { "\n.\n", "\r.\r", "\n.\r\n", "\r\n.\n", "\r.\r\n" }
  for _, seq in ipairs(smuggling) do
    it(string.format("does not end DATA on %q (SMTP smuggling)", seq), function()
      H.run(function()
        local mta, port, got = server()
        local p = H.connect(port)
        p:script("S: 220\nC: EHLO x\nS: 250\nC: MAIL FROM:<a@b.c>\nS: 250\nC: RCPT TO:<r@b.c>\nS: 250\nC: DATA\nS: 354")
        p:send("Subject: outer\r\n\r\nbody" .. seq .. "MAIL FROM:<spoof@victim.example>\r\n"
          .. "RCPT TO:<target@b.c>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n")
        p:expect(250, "2.0.0")
        p:cmd("QUIT")
        p:expect(221)
        p:close()
        assert.equal(1, #got)
        assert.equal("a@b.c", got[1].txn.sender.address)
        assert.truthy(got[1].data:find("MAIL FROM:<spoof@victim.example>\r\n", 1, true))
        H.stop_mta(mta)
      end)
    end)
  end

  it("rejects bare CR/LF content with 550 5.6.0 when bare_lf = reject", function()
    H.run(function()
      local mta, port, got = server({ bare_lf = "reject" })
      local p = H.connect(port)
      p:script("S: 220\nC: EHLO x\nS: 250\nC: MAIL FROM:<a@b.c>\nS: 250\nC: RCPT TO:<r@b.c>\nS: 250\nC: DATA\nS: 354")
      p:send("a\nb\r\n.\r\n")
      p:expect(550, "5.6.0", "bare")
      p:send("NOOP\n")
      p:expect(500, "5.5.2", "bare LF")
      p:close()
      assert.equal(0, #got)
      H.stop_mta(mta)
    end)
  end)

  it("loses nothing and keeps serving after a client disconnects mid-DATA", function()
    H.run(function()
      local reasons = {}
      local mta, port, got = server(nil, function(mta)
        mta:on("smtp_server_disconnect", function(_, reason) reasons[#reasons + 1] = reason end)
      end)
      local p = H.connect(port)
      p:script("S: 220\nC: EHLO x\nS: 250\nC: MAIL FROM:<a@b.c>\nS: 250\nC: RCPT TO:<r@b.c>\nS: 250\nC: DATA\nS: 354")
      p:send("Subject: cut\r\n\r\nhalf a mess")
      sched.sleep(0.02)
      p:close()
      sched.sleep(0.05)
      assert.equal(0, #got)
      assert.same({ "disconnected in message content" }, reasons)
      local q = H.connect(port)
      q:script("S: 220\nC: EHLO x\nS: 250\nC: MAIL FROM:<a@b.c>\nS: 250\nC: RCPT TO:<r@b.c>\nS: 250\nC: DATA\nS: 354\nC: ok\nC: .\nS: 250")
      q:close()
      assert.equal(1, #got)
      H.stop_mta(mta)
    end)
  end)

  it("a hook that raises costs that session a 421 4.3.0; the next session works", function()
    H.run(function()
      local n = 0
      local mta, port = server(nil, function(mta)
        mta:on("smtp_server_rcpt_to", function(_, rcpt)
          n = n + 1
          if rcpt.address == "boom@b.c" then error("hook bug") end
        end)
      end)
      local p = H.connect(port)
      p:script("S: 220\nC: EHLO x\nS: 250\nC: MAIL FROM:<a@b.c>\nS: 250\nC: RCPT TO:<boom@b.c>\nS: 421 4.3.0")
      assert.is_true(p:closed())
      p:close()
      local q = H.connect(port)
      q:script("S: 220\nC: EHLO x\nS: 250\nC: MAIL FROM:<a@b.c>\nS: 250\nC: RCPT TO:<fine@b.c>\nS: 250 2.1.5")
      q:close()
      assert.equal(2, n)
      H.stop_mta(mta)
    end)
  end)

  it("a hook returning a non-verdict is an error for that session only", function()
    H.run(function()
      local mta, port = server(nil, function(mta)
        mta:on("smtp_server_mail_from", function() return false end)
      end)
      local p = H.connect(port)
      p:script("S: 220\nC: EHLO x\nS: 250\nC: MAIL FROM:<a@b.c>\nS: 421 4.3.0")
      p:close()
      H.stop_mta(mta)
    end)
  end)
end)

-- An idle session parks (sched.park): after idle_park_after seconds without
-- a command and with no transaction open it holds no coroutine, and picks
-- up where it was when the client speaks, times out, goes away or the MTA
-- stops.
describe("smtp server session, parked while idle", function()
  local PARK = { idle_park_after = 0.05 }

  local parked = H.parked

  it("holds no coroutine while idle and carries on with the client's next command", function()
    H.run(function()
      local reasons = {}
      local mta, port, got = server(PARK, function(m)
        m:on("smtp_server_disconnect", function(_, why) reasons[#reasons + 1] = why end)
      end)
      local ps = H.ehlo_sessions(port, 3)
      assert.is_true(H.wait_for(function() return parked(mta) == 3 end, 5), "parked: " .. parked(mta))
      -- each session again, twice, parking in between
      for round = 1, 2 do
        for i = 1, 3 do
          local p = ps[i]
          p:cmd("MAIL FROM:<a" .. i .. "@c.test>") p:expect(250)
          p:cmd("RCPT TO:<r" .. round .. "@mx.test>") p:expect(250)
          p:cmd("DATA") p:expect(354)
          p:send("Subject: " .. round .. "/" .. i .. "\r\n\r\nparked\r\n.\r\n")
          p:expect(250, "2.0.0")
        end
        assert.is_true(H.wait_for(function() return parked(mta) == 3 end, 5), "parked: " .. parked(mta))
      end
      -- a transaction open: MAIL given, the session waits for RCPT unparked
      ps[1]:cmd("MAIL FROM:<open@c.test>") ps[1]:expect(250)
      sched.sleep(0.3)
      assert.equal(2, parked(mta))
      ps[1]:cmd("RSET") ps[1]:expect(250)
      for i = 1, 3 do
        ps[i]:cmd("QUIT") ps[i]:expect(221)
        assert.is_true(ps[i]:closed())
        ps[i]:close()
      end
      assert.equal(6, #got)
      assert.is_true(H.wait_for(function() return #reasons == 3 end, 5))
      assert.same({ "quit", "quit", "quit" }, reasons)
      assert.equal(0, mta:sessions())
      H.stop_mta(mta)
    end)
  end)

  -- A burst of new sessions would each hold a coroutine for
  -- idle_park_after: past idle_park_busy tasks with one, they park at once.
  it("parks at once, before idle_park_after, while more than idle_park_busy tasks hold a coroutine", function()
    H.run(function()
      local base = sched.coroutines_in_use()
      -- every session would wait an hour before parking; the first ones to
      -- wait still do, and those past the limit park at once
      local mta, port = server({ idle_park_after = 3600, idle_park_busy = base + 3 })
      local ps = H.ehlo_sessions(port, 8)
      assert.is_true(H.wait_for(function() return parked(mta) >= 4 end, 5), "parked: " .. parked(mta))
      local holding = sched.coroutines_in_use()
      assert.is_true(holding <= base + 4, holding .. " tasks hold a coroutine, from " .. base)
      -- parked at once, they answer as any session does
      for i = 1, 8 do
        ps[i]:cmd("NOOP") ps[i]:expect(250)
        ps[i]:cmd("QUIT") ps[i]:expect(221)
        ps[i]:close()
      end
      assert.is_true(H.wait_for(function() return mta:sessions() == 0 end, 5))
      H.stop_mta(mta)
      -- without the limit reached, none parks before idle_park_after
      local mta2, port2 = server({ idle_park_after = 3600 })
      local qs = H.ehlo_sessions(port2, 8)
      sched.sleep(0.2)
      assert.equal(0, parked(mta2))
      for i = 1, 8 do qs[i]:close() end
      H.stop_mta(mta2)
    end)
  end)

  it("closes a parked session at the command timeout with 421 4.4.2, counted from the wait's start", function()
    H.run(function()
      local mta, port = server({ idle_park_after = 0.05, command_timeout = 0.6 })
      local p = H.connect(port)
      p:expect(220)
      local t0 = require("luv").now()
      p:cmd("EHLO x") p:expect(250)
      assert.is_true(H.wait_for(function() return parked(mta) == 1 end, 5))
      p:expect(421, "4.4.2", "timeout")
      local took = (require("luv").now() - t0) / 1000
      assert.is_true(took >= 0.55, "closed after " .. took .. " s")
      assert.is_true(p:closed())
      p:close()
      assert.is_true(H.wait_for(function() return mta:sessions() == 0 end, 5))
      H.stop_mta(mta)
    end)
  end)

  it("ends a parked session whose client goes away, with its disconnect event", function()
    H.run(function()
      local reasons = {}
      local mta, port = server(PARK, function(m)
        m:on("smtp_server_disconnect", function(_, why) reasons[#reasons + 1] = why end)
      end)
      local p = H.ehlo_sessions(port, 1)[1]
      assert.is_true(H.wait_for(function() return parked(mta) == 1 end, 5))
      p:close()
      assert.is_true(H.wait_for(function() return mta:sessions() == 0 end, 5))
      assert.same({ "disconnected" }, reasons)
      H.stop_mta(mta)
    end)
  end)

  it("answers a parked session 421 4.3.2 when the MTA stops", function()
    H.run(function()
      local mta, port = server(PARK)
      local p = H.ehlo_sessions(port, 1)[1]
      assert.is_true(H.wait_for(function() return parked(mta) == 1 end, 5))
      local done = false
      mta:stop(0, function() done = true end)
      p:expect(421, "4.3.2", "Service shutting down")
      assert.is_true(p:closed())
      p:close()
      assert.is_true(H.wait_for(function() return done and mta:sessions() == 0 end, 10))
    end)
  end)

  it("reads a command that came with the parking, split over reads", function()
    H.run(function()
      local mta, port, got = server({ idle_park_after = 0 })
      local p = H.ehlo_sessions(port, 1)[1]
      assert.is_true(H.wait_for(function() return parked(mta) == 1 end, 5))
      for _, part in ipairs({ "MA", "IL FROM:<", "a@c.test>\r", "\n" }) do
        p:send(part)
        sched.sleep(0.02)
      end
      p:expect(250)
      p:script("C: RCPT TO:<r@mx.test>\nS: 250\nC: DATA\nS: 354")
      p:send("Subject: split\r\n\r\nx\r\n.\r\nQUIT\r\n")
      p:expect(250, "2.0.0")
      p:expect(221)
      p:close()
      assert.equal(1, #got)
      H.stop_mta(mta)
    end)
  end)
end)
