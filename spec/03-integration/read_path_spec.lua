-- Plaintext input read in C straight into the parser (smtp.read_start):
-- no Lua string per chunk. These specs hold it to what luv's reading did:
-- every session's octets reach its own parser, reading pauses at
-- input_high_water and resumes, and a session that ends lets go of its
-- reader. (The session, TLS and client specs run over this path too.)
local H = require "helpers"
local sched = require "moonpost.runtime.sched"
local smtp = require "moonpost.core.smtp"

describe("reading in C", function()
  it("keeps 60 sessions' input apart while they come and go, and lets go of every reader", function()
    H.run(function()
      local mta, port = H.start_mta()
      local base = smtp.readers()
      local peers = {}
      for i = 1, 60 do
        local p = H.connect(port)
        p:expect(220)
        p:cmd("EHLO c" .. i .. ".test")
        p:expect(250)
        peers[i] = p
      end
      -- a reader for each session and one for each peer's replies
      assert.equal(base + 120, smtp.readers())
      -- every peer names itself in a command only its session sees
      local function round()
        for i, p in pairs(peers) do p:cmd("MAIL FROM:<p" .. i .. "@c.test>") end
        for i, p in pairs(peers) do
          p:expect(250, "2.1.0")
          p:cmd("RSET")
          p:expect(250)
          -- a second MAIL in the same transaction would be refused: the
          -- RSET reached this session, not another
          p:cmd("MAIL FROM:<again" .. i .. "@c.test>")
          p:expect(250, "2.1.0")
          p:cmd("RSET")
          p:expect(250)
        end
      end
      round()
      -- leave in an order that empties slots all over the table (every
      -- third, then every second of the rest), checking the others each time
      for _, step in ipairs({ 3, 2 }) do
        for i = 1, 60, step do
          local p = peers[i]
          if p then
            p:cmd("QUIT")
            p:expect(221)
            p:close()
            peers[i] = nil
          end
        end
        round()
      end
      for i, p in pairs(peers) do
        p:close()
        peers[i] = nil
      end
      assert.is_true(H.wait_for(function() return smtp.readers() == base end, 5),
        "readers left: " .. smtp.readers() - base)
      H.stop_mta(mta)
    end)
  end)

  it("stops reading past input_high_water while the session is busy, then reads the rest", function()
    H.run(function()
      local during
      local mta, port = H.start_mta({ input_high_water = 4096 }, function(mta)
        mta:on("smtp_server_mail_from", function()
          sched.sleep(0.3)
          during = smtp.readers()
        end)
      end)
      local base = smtp.readers()
      local p = H.connect(port)
      p:expect(220)
      p:cmd("EHLO c.test")
      p:expect(250)
      assert.equal(base + 2, smtp.readers())
      -- MAIL, whose hook takes 0.3 s, and 2000 NOOPs behind it: 12 kB
      -- that arrive while the session waits
      p:send("MAIL FROM:<a@c.test>\r\n" .. string.rep("NOOP\r\n", 2000))
      p:expect(250, "2.1.0")
      for i = 1, 2000 do
        local code = p:reply()
        assert.equal(250, code, "NOOP " .. i)
      end
      -- the session's reader was let go while more than 4096 octets
      -- waited in its parser (the peer's stayed)
      assert.equal(base + 1, during)
      -- and reading resumed: the session still answers
      p:cmd("QUIT")
      p:expect(221)
      p:close()
      assert.is_true(H.wait_for(function() return smtp.readers() == base end, 5))
      H.stop_mta(mta)
    end)
  end)

  it("reads through luv after STARTTLS: the ciphertext goes to TLS, not to the parser", function()
    H.run(function()
      local d = H.certs()
      local mta, port = H.start_mta({ tls = { cert = d .. "/mx.pem", key = d .. "/mx.key" } })
      local base = smtp.readers()
      local p = H.connect(port)
      p:expect(220)
      p:cmd("EHLO c.test")
      p:expect(250)
      assert.equal(base + 2, smtp.readers())
      p:cmd("STARTTLS")
      p:expect(220)
      assert.truthy(p:starttls("mx.test.example"))
      -- neither side reads in C once TLS is on
      assert.equal(base, smtp.readers())
      p:cmd("EHLO c.test")
      p:expect(250)
      p:cmd("MAIL FROM:<a@c.test>")
      p:expect(250, "2.1.0")
      p:cmd("QUIT")
      p:expect(221)
      p:close()
      H.stop_mta(mta)
    end)
  end)
end)
