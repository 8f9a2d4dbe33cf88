-- Regressions for defects found in review: each case failed before its fix.
local H = require "helpers"
local sched = require "moonpost.runtime.sched"
local smtp = require "moonpost.core.smtp"

local function server(opts, setup, new_opts)
  local got = {}
  local mta, port = H.start_mta(opts, function(mta, moonpost)
    mta:on("smtp_server_message_received", function(txn, msg)
      got[#got + 1] = { txn = txn, data = msg:tostring() }
    end)
    if setup then setup(mta, moonpost) end
  end, new_opts)
  return mta, port, got
end

describe("review fixes", function()
  it("RCPT between BDAT chunks is refused with 503 5.5.1 (the data hook saw the final list)", function()
    H.run(function()
      local seen
      local mta, port, got = server(nil, function(mta)
        mta:on("smtp_server_data", function(txn) seen = #txn.recipients end)
      end)
      local p = H.connect(port)
      p:script("S: 220\nC: EHLO x\nS: 250\nC: MAIL FROM:<a@b.c>\nS: 250\nC: RCPT TO:<c@d.e>\nS: 250")
      p:send("BDAT 6\r\nab\r\n\r\n")
      p:expect(250)
      p:cmd("RCPT TO:<late@d.e>")
      p:expect(503, "5.5.1", "RCPT after BDAT")
      p:send("BDAT 4 LAST\r\nhi\r\n")
      p:expect(250, "2.0.0", "queued")
      p:close()
      assert.equal(1, seen)
      assert.equal(1, #got[1].txn.recipients)
      H.stop_mta(mta)
    end)
  end)

  it("does not count a transparency dot in the 1000-octet line limit", function()
    local line = ".." .. string.rep("a", 997) -- 998 octets of text after unstuffing
    local p = smtp.parser()
    p:push("DATA\r\n")
    p:next()
    p:begin_data()
    p:push(line .. "\r\n.\r\n")
    assert.same({ "data", 0 }, { p:next() })
    p:close()
    H.run(function()
      local mta, port, got = server()
      assert.equal(250, (H.send(port, { body = "Subject: x\r\n\r\n" .. line .. "\r\n" })))
      assert.equal(1, #got)
      H.stop_mta(mta)
    end)
  end)

  it("reads a BDAT chunk that is refused before EHLO or after a 554 greeting", function()
    H.run(function()
      local mta, port = server()
      local p = H.connect(port)
      p:expect(220)
      p:send("BDAT 12 LAST\r\nHELP\r\nHELP\r\n")
      p:expect(503, "5.5.1")
      p:cmd("NOOP")
      p:expect(250) -- the HELPs were chunk data, not commands
      p:close()
      H.stop_mta(mta)
      local moonpost = require "moonpost"
      mta, port = server(nil, function(m) m:on("smtp_server_connect", function() return moonpost.reject() end) end)
      p = H.connect(port)
      p:expect(554, "5.7.1") -- reject() defaults to 550: a greeting can only be 554
      p:send("BDAT 6\r\nNOOP\r\n")
      p:expect(503, "5.5.1")
      p:cmd("QUIT")
      p:expect(221)
      p:close()
      H.stop_mta(mta)
    end)
  end)

  it("keeps a hostile HELO name out of the Received header's structure", function()
    H.run(function()
      local mta, port, got = server()
      local p = H.connect(port)
      p:script("S: 220\nC: EHLO evil;by\255\254.example\nS: 250\nC: MAIL FROM:<a@b.c>\nS: 250\nC: RCPT TO:<r@b.c>\nS: 250\nC: DATA\nS: 354\nC: x\nC: .\nS: 250")
      p:close()
      local first = got[1].data:match("^Received: from ([^\r]*)\r\n")
      assert.equal("[127.0.0.1] (helo=evil?by??.example)", first)
      assert.falsy(got[1].data:find("[\128-\255]"))
      H.stop_mta(mta)
    end)
  end)

  it("takes the HELO name after leading blanks", function()
    H.run(function()
      local mta, port, got = server()
      local p = H.connect(port)
      p:script("S: 220\nC: EHLO \tfoo.example\nS: 250\nC: HELO   \nS: 501 5.5.4\nC: MAIL FROM:<a@b.c>\nS: 250\nC: RCPT TO:<r@b.c>\nS: 250\nC: DATA\nS: 354\nC: x\nC: .\nS: 250")
      p:close()
      assert.equal("foo.example", got[1].txn.conn.helo)
      H.stop_mta(mta)
    end)
  end)

  it("sched.wait() with a zero or negative timeout always returns", function()
    H.run(function()
      for _ = 1, 1000 do
        assert.same({ nil, "timeout" }, { sched.wait(0) })
      end
      assert.same({ nil, "timeout" }, { sched.wait(-1) })
    end, 20)
  end)

  it("sched.wait() filed from inside a timer tick still times out", function()
    -- each wait is filed while the wheel processes a tick; about one in 25
    -- lands on a slot boundary, which used to lose the task forever
    H.run(function()
      for _ = 1, 120 do
        assert.same({ nil, "timeout" }, { sched.wait(0.001) })
      end
    end, 20)
  end)

  it("frees a large input buffer once it is consumed", function()
    local p = smtp.parser()
    p:push("NOOP " .. string.rep("x", 100) .. "\r\n" .. string.rep("NOOP\r\n", 200000))
    assert.is_true(p:capacity() > 65536)
    while p:next() do end
    assert.equal(0, p:capacity())
    p:close()
  end)

  it("rejects limits that do not convert exactly", function()
    assert.has_error(function() smtp.parser({ max_size = math.huge }) end)
    assert.has_error(function() smtp.parser({ max_size = 1.5 }) end)
    assert.has_error(function() smtp.parser({ text_line = 2 ^ 64 }) end)
  end)

  it("refuses max_message_size = 0 and zero timeouts at load", function()
    local accept = require "moonpost.accept"
    assert.has_error(function() accept.smtp { max_message_size = 0 } end)
    assert.has_error(function() accept.smtp { command_timeout = 0 } end)
    assert.has_error(function() accept.smtp { data_timeout = "0s" } end)
  end)

  it("refuses a host name in listen at load, naming it", function()
    local accept = require "moonpost.accept"
    local ok, err = pcall(accept.smtp, { listen = "localhost:25" })
    assert.is_false(ok)
    assert.matches("expected an IP address, not a host name", err)
  end)

  it("reports 'shutdown' for sessions closed by stop()", function()
    H.run(function()
      local reasons = {}
      local mta, port = server(nil, function(m)
        m:on("smtp_server_disconnect", function(_, why) reasons[#reasons + 1] = why end)
      end)
      local p = H.connect(port)
      p:script("S: 220\nC: EHLO x\nS: 250")
      mta:stop(0)
      p:expect(421, "4.3.2", "mx.test")
      p:close()
      sched.sleep(0.05)
      assert.same({ "shutdown" }, reasons)
    end)
  end)

  it("calls every stop() callback, also for a second stop()", function()
    H.run(function()
      local mta = server()
      local calls = 0
      mta:stop(0, function() calls = calls + 1 end)
      mta:stop(0, function() calls = calls + 1 end)
      sched.sleep(0.05)
      assert.equal(2, calls)
    end)
  end)

  it("sends no enhanced codes when ENHANCEDSTATUSCODES is off", function()
    H.run(function()
      local mta, port = server({ extensions = { enhancedstatuscodes = false } })
      local p = H.connect(port)
      p:expect(220)
      p:cmd("EHLO x")
      assert.falsy(p:expect(250):find("ENHANCEDSTATUSCODES", 1, true))
      p:cmd("MAIL FROM:<a@b.c>")
      local c, e, t = p:reply()
      assert.equal(250, c)
      assert.is_nil(e)
      assert.equal("Ok", t)
      p:close()
      H.stop_mta(mta)
    end)
  end)

  it("keeps CR out of a verdict's reply text", function()
    local moonpost = require "moonpost"
    assert.equal("bad  text", moonpost.reject(550, "5.7.1", "bad\r text").text)
    assert.equal("a \nb", moonpost.reject(550, "5.7.1", "a\r\nb").text)
  end)

  it("syncs state records soon even when no mail arrives", function()
    H.run(function()
      local dir = H.tmpdir()
      local delivered = false
      local mta, port = server(nil, function(m)
        m:set_transport(function(_, _, rcpts)
          delivered = true
          return { [rcpts[1].index] = { status = "delivered" } }
        end)
      end, { spool = { dir = dir .. "/spool", min_free = 0 } })
      assert.equal(250, (H.send(port)))
      assert.is_true(H.wait_for(function() return delivered end))
      local batches = mta.spool.stats.batches
      assert.is_true(H.wait_for(function() return mta.spool.stats.batches > batches end, 2))
      H.stop_mta(mta)
      H.rm_rf(dir)
    end)
  end)
end)
