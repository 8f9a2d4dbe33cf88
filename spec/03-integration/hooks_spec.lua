-- Hooks at every stage: verdicts with any code and text, chains in
-- registration order, and yielding calls inside hooks.
local H = require "helpers"
local sched = require "moonpost.runtime.sched"
local uv = require "luv"

local function server(setup, opts)
  local got = {}
  local mta, port = H.start_mta(opts, function(mta, moonpost)
    if setup then setup(mta, moonpost) end
    mta:on("smtp_server_message_received", function(txn, msg)
      got[#got + 1] = { txn = txn, size = msg:size() }
    end)
  end)
  return mta, port, got
end

local ENVELOPE = "S: 220\nC: EHLO x\nS: 250\nC: MAIL FROM:<a@b.c>\nS: 250\nC: RCPT TO:<r@b.c>\nS: 250\n"

describe("smtp server hooks", function()
  it("smtp_server_connect: reject gives the code, then only QUIT and NOOP work", function()
    H.run(function()
      local seen
      local mta, port = server(function(mta, moonpost)
        mta:on("smtp_server_connect", function(conn)
          seen = conn
          return moonpost.reject(554, "5.7.1", "No SMTP service for you")
        end)
      end)
      local p = H.connect(port)
      p:script([[
        S: 554 5.7.1 No SMTP service for you
        C: EHLO x
        S: 503 5.5.1
        C: NOOP
        S: 250
        C: QUIT
        S: 221
      ]])
      p:close()
      assert.equal("127.0.0.1", seen.remote_ip)
      assert.is_number(seen.remote_port)
      assert.equal("127.0.0.1", seen.local_ip)
      assert.equal(port, seen.local_port)
      H.stop_mta(mta)
    end)
  end)

  it("smtp_server_connect: tempfail gives 421 and closes", function()
    H.run(function()
      local mta, port = server(function(mta, moonpost)
        mta:on("smtp_server_connect", function() return moonpost.tempfail(421, "4.3.2", "Busy") end)
      end)
      local p = H.connect(port)
      p:expect(421, "4.3.2", "Busy")
      assert.is_true(p:closed())
      p:close()
      H.stop_mta(mta)
    end)
  end)

  it("smtp_server_ehlo: can reject a name; the client may try again", function()
    H.run(function()
      local mta, port = server(function(mta, moonpost)
        mta:on("smtp_server_ehlo", function(conn, name, is_ehlo)
          assert.is_table(conn)
          if name == "bad.example" then return moonpost.reject(550, "5.7.1", "Bad HELO " .. tostring(is_ehlo)) end
        end)
      end)
      local p = H.connect(port)
      p:script([[
        S: 220
        C: EHLO bad.example
        S: 550 5.7.1 Bad HELO true
        C: MAIL FROM:<a@b.c>
        S: 503 5.5.1
        C: HELO good.example
        S: 250
        C: MAIL FROM:<a@b.c>
        S: 250
      ]])
      p:close()
      H.stop_mta(mta)
    end)
  end)

  it("smtp_server_mail_from and smtp_server_rcpt_to: reject, tempfail, accept with custom text", function()
    H.run(function()
      local mta, port, got = server(function(mta, moonpost)
        mta:on("smtp_server_mail_from", function(txn, sender)
          assert.equal(txn.sender, sender)
          if sender.domain == "spam.example" then return moonpost.reject(550, "5.7.1", "Go away") end
          txn.notes.checked = true
        end)
        mta:on("smtp_server_rcpt_to", function(txn, rcpt)
          assert.is_true(txn.notes.checked)
          if rcpt["local"] == "unknown" then return moonpost.reject(550, "5.1.1", "No such user") end
          if rcpt["local"] == "busy" then return moonpost.tempfail(450, "4.2.1", "Mailbox busy") end
          if rcpt["local"] == "vip" then return moonpost.accept(250, "2.1.5", "Welcome, VIP") end
        end)
        -- After an accept verdict the rest of the chain does not run.
        mta:on("smtp_server_rcpt_to", function(_, rcpt)
          if rcpt["local"] == "vip" then error("must not run") end
        end)
      end)
      local p = H.connect(port)
      p:script([[
        S: 220
        C: EHLO x
        S: 250
        C: MAIL FROM:<x@spam.example>
        S: 550 5.7.1 Go away
        C: MAIL FROM:<x@good.example>
        S: 250 2.1.0
        C: RCPT TO:<unknown@b.c>
        S: 550 5.1.1 No such user
        C: RCPT TO:<busy@b.c>
        S: 450 4.2.1 Mailbox busy
        C: RCPT TO:<vip@b.c>
        S: 250 2.1.5 Welcome, VIP
        C: RCPT TO:<normal@b.c>
        S: 250 2.1.5 Ok
        C: DATA
        S: 354
        C: x
        C: .
        S: 250
      ]])
      p:close()
      assert.equal(2, #got[1].txn.recipients)
      assert.equal("vip@b.c", got[1].txn.recipients[1].address)
      H.stop_mta(mta)
    end)
  end)

  it("smtp_server_data and smtp_server_message_received: verdicts replace the reply", function()
    H.run(function()
      local n = 0
      local mta, port = H.start_mta({}, function(mta, moonpost)
        mta:on("smtp_server_data", function(txn)
          if #txn.recipients > 1 then return moonpost.reject(554, "5.7.1", "One recipient only") end
        end)
        mta:on("smtp_server_message_received", function(txn, msg)
          n = n + 1
          assert.equal(txn.size, msg:size())
          if n == 1 then return moonpost.tempfail(451, "4.3.0", "Disk trouble") end
          if n == 2 then return moonpost.reject(550, "5.7.1", "Content rejected") end
          return moonpost.accept(250, "2.0.0", "Thanks\nsecond line")
        end)
      end)
      local p = H.connect(port)
      p:script(ENVELOPE .. [[
        C: RCPT TO:<second@b.c>
        S: 250
        C: DATA
        S: 554 5.7.1 One recipient only
        C: MAIL FROM:<a@b.c>
        S: 250
      ]])
      for _, expect in ipairs({ "451 4.3.0 Disk trouble", "550 5.7.1 Content rejected", "250 2.0.0 Thanks" }) do
        p:script("C: RCPT TO:<r@b.c>\nS: 250\nC: DATA\nS: 354\nC: body\nC: .\nS: " .. expect
          .. "\nC: MAIL FROM:<a@b.c>\nS: 250")
      end
      -- the first BDAT meets the same verdict; its chunk is read all the same
      p:script([[
        C: RCPT TO:<r@b.c>
        S: 250
        C: RCPT TO:<s@b.c>
        S: 250
        C: BDAT 6 LAST
        C: body
        S: 554 5.7.1 One recipient only
        C: MAIL FROM:<a@b.c>
        S: 250
      ]])
      p:close()
      assert.equal(3, n)
      H.stop_mta(mta)
    end)
  end)

  it("hooks may call yielding APIs as straight-line code; other sessions go on meanwhile", function()
    H.run(function()
      local mta, port = server(function(mta, moonpost)
        mta:on("smtp_server_rcpt_to", function(_, rcpt)
          if rcpt["local"] == "slow" then
            moonpost.sleep(0.3)
            return moonpost.tempfail(451, "4.7.1", "Slept well")
          end
        end)
      end)
      local slow_done
      local t0 = uv.now()
      sched.spawn(function()
        local p = H.connect(port)
        p:script("S: 220\nC: EHLO x\nS: 250\nC: MAIL FROM:<a@b.c>\nS: 250\nC: RCPT TO:<slow@b.c>\nS: 451 4.7.1 Slept well")
        p:close()
        slow_done = uv.now()
      end)
      -- a second session is served while the first one's hook sleeps
      local q = H.connect(port)
      q:script(ENVELOPE)
      local fast_done = uv.now()
      q:close()
      while not slow_done do sched.sleep(0.02) end
      assert.is_true(fast_done < slow_done)
      assert.is_true(slow_done - t0 >= 280)
      H.stop_mta(mta)
    end)
  end)

  it("smtp_server_disconnect reports why a session ended", function()
    H.run(function()
      local reasons = {}
      local mta, port = server(function(mta)
        mta:on("smtp_server_disconnect", function(conn, reason)
          reasons[#reasons + 1] = reason
          assert.equal(reason, conn.closed_reason)
        end)
      end, { command_timeout = 0.2 })
      local p = H.connect(port)
      p:script("S: 220\nC: QUIT\nS: 221")
      p:close()
      p = H.connect(port)
      p:expect(220)
      p:expect(421, "4.4.2")
      p:close()
      sched.sleep(0.05)
      assert.same({ "quit", "timeout" }, reasons)
      H.stop_mta(mta)
    end)
  end)

  it("an error in a message_received hook answers 421 4.3.0 and is logged with a traceback", function()
    H.run(function()
      local mta, port = server(function(mta)
        mta:on("smtp_server_message_received", function() error("storage exploded") end)
      end)
      local p = H.connect(port)
      p:script(ENVELOPE .. "C: DATA\nS: 354\nC: x\nC: .\nS: 421 4.3.0")
      assert.is_true(p:closed())
      p:close()
      local log = H.log("storage exploded")
      assert.truthy(log:find("internal error", 1, true))
      assert.truthy(log:find("stack traceback", 1, true))
      H.stop_mta(mta)
    end)
  end)
end)

describe("moonpost verdicts", function()
  local moonpost = require "moonpost"
  it("have defaults and check their codes", function()
    local v = moonpost.reject()
    assert.same({ 550, "5.7.1" }, { v.code, v.enhanced })
    assert.equal(451, moonpost.tempfail().code)
    assert.equal("4.7.1", moonpost.tempfail().enhanced)
    assert.equal(250, moonpost.accept().code)
    assert.equal("5.7.1", moonpost.reject(554).enhanced)
    assert.equal("text only", moonpost.reject("text only").text)
    assert.equal(421, moonpost.tempfail({ code = 421, enhanced = "4.3.2", text = "bye" }).code)
    assert.has_error(function() moonpost.reject(450) end)
    assert.has_error(function() moonpost.tempfail(550) end)
    assert.has_error(function() moonpost.reject(550, "4.1.1") end)
    assert.has_error(function() moonpost.reject(550, "5.1") end)
    assert.has_error(function() moonpost.accept(250, "2.0.0", 42) end)
    assert.is_true(moonpost.is_verdict(moonpost.accept()))
    assert.is_false(moonpost.is_verdict({ code = 250 }))
  end)
end)
