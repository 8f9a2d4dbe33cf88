-- The outbound SMTP client (runtime/client.lua) against scripted peers on
-- loopback that misbehave the way a hostile server, or someone on the path,
-- can: replies injected before TLS, replies dripped a line at a time.
local H = require "helpers"
local uv = require "luv"
local sched = require "moonpost.runtime.sched"
local stream = require "moonpost.runtime.stream"
local client = require "moonpost.runtime.client"
local tls = require "moonpost.runtime.tls"

local function timeouts(o)
  local t = { connect = 3, greeting = 3, ehlo = 3, mail = 3, rcpt = 3, data = 3, block = 3, done = 3, quit = 1 }
  for k, v in pairs(o or {}) do t[k] = v end
  return t
end

-- serve(handler) -> server, port: handler(s, P) runs in a task for each
-- connection; P.line() reads a line (recorded in P.got), P.send() writes,
-- P.data() reads a DATA section up to its lone dot.
local function serve(handler)
  local got, conns, active = {}, 0, 0
  local server, port = H.listen(function(tcp)
    conns = conns + 1
    local s = stream.new(tcp)
    active = active + 1
    sched.spawn(function()
      local P = { got = got, n = conns }
      function P.line(t)
        local l, e = s:receive("*l", t or 5)
        if l then got[#got + 1] = l end
        return l, e
      end
      function P.send(d) return s:send(d, 5) end
      function P.data()
        while true do
          local l = s:receive("*l", 5)
          if not l or l == "." then return end
        end
      end
      local ok, e = pcall(handler, s, P)
      if not ok then io.stderr:write("peer: " .. tostring(e) .. "\n") end
      s:close()
      active = active - 1
    end)
  end)
  -- stop(): once every connection's task has ended
  local function stop()
    H.wait_for(function() return active == 0 end, 10)
    server:close()
  end
  return stop, port, got
end

-- deliver(port, pool_opts [, env_fields [, body]]) -> the result of the
-- message's first recipient (b@remote.test, the only one of the transaction)
local function deliver(port, extra, fields, body)
  local o = { name = "peer-spec", helo = "client.test", timeouts = timeouts(extra and extra.timeouts),
    max_connections = 1, max_messages = 10, idle_timeout = 1, pipelining = true }
  for k, v in pairs(extra or {}) do if k ~= "timeouts" then o[k] = v end end
  local pool = client.pool(o)
  local env = { id = "t", from = "a@client.test", rcpt = { { a = "b@remote.test" } } }
  for k, v in pairs(fields or {}) do env[k] = v end
  local res = pool:deliver(env, body or "Subject: x\r\n\r\nhello\r\n", { { index = 1, address = "b@remote.test" } },
    { { host = "127.0.0.1", port = port } })
  pool:close()
  return res[1]
end

-- The commands after EHLO: 250 to each, 354 to DATA and `final` (a reply,
-- or more) after the data, until QUIT or silence.
local function transactions(P, final)
  while true do
    local l = P.line(3)
    if not l or l == "QUIT" then return P.send("221 bye\r\n") end
    if l == "DATA" then
      P.send("354 go\r\n")
      P.data()
      P.send(final)
    else
      P.send("250 ok\r\n")
    end
  end
end

-- A plain server offering these EHLO keywords, answering `final` (by
-- default 250) to the end of each message.
local function plain(keywords, final)
  return function(_, P)
    P.send("220 mx ESMTP\r\n")
    P.line()
    local ext = { "250-mx" }
    for _, k in ipairs(keywords) do ext[#ext + 1] = "250-" .. k end
    ext[#ext + 1] = "250 HELP"
    P.send(table.concat(ext, "\r\n") .. "\r\n")
    transactions(P, final or "250 2.0.0 queued\r\n")
  end
end

-- A server that offers STARTTLS, and after its 220 someone adds plaintext
-- replies for everything the client will say inside TLS; inside TLS the
-- real server refuses the message.
local function injected(sctx)
  return function(s, P)
    P.send("220 mx ESMTP\r\n")
    P.line()
    P.send("250-mx\r\n250 STARTTLS\r\n")
    local l = P.line()
    if l ~= "STARTTLS" then
      -- the plaintext retry of an opportunistic client
      P.send("250 ok\r\n250 ok\r\n354 go\r\n")
      P.data()
      P.send("554 5.7.1 refused in plaintext too\r\n")
      return
    end
    P.send("220 go ahead\r\n250 mx\r\n250 ok\r\n250 ok\r\n354 go\r\n250 2.0.0 queued (INJECTED)\r\n")
    if not s:starttls(sctx:new(), 5) then return end
    P.line()
    P.send("250-mx\r\n250 PIPELINING\r\n")
    transactions(P, "554 5.7.1 rejected: spam\r\n")
  end
end

describe("the SMTP client against a hostile peer", function()
  local d
  before_each(function() d = H.certs() end)

  for _, policy in ipairs({ "verify", "required", "opportunistic" }) do
    it("never reads plaintext sent after the 220 to STARTTLS as a reply inside TLS (" .. policy .. ")", function()
      local sctx = assert(require("moonpost.core.tls").context({ server = true,
        certs = { { cert = d .. "/mx.pem", key = d .. "/mx.key" } } }))
      H.run(function()
        local stop, port, got = serve(injected(sctx))
        local res = deliver(port, { tls = tls.client_policy("t", { policy = policy, ca_file = d .. "/ca.pem",
          name = "mx.test.example", broken_ttl = 0 }) })
        stop()
        -- the injected "250 queued" must not count: the real server refused
        assert.are_not.equal("delivered", res.status)
        if policy == "opportunistic" then
          -- a failed handshake: the retry is in plaintext, on a new connection
          assert.equal("bounced", res.status)
          assert.matches("refused in plaintext too", res.text)
        else
          assert.equal("deferred", res.status)
          assert.equal("4.7.5", res.enhanced)
          assert.matches("data after the 220 to STARTTLS", res.text)
          -- nothing was sent once the injection was seen
          assert.equal("STARTTLS", got[#got])
        end
      end)
    end)
  end

  it("sends a 7-bit message declared BODY=8BITMIME to a server without 8BITMIME, without BODY=", function()
    H.run(function()
      local stop, port, got = serve(plain({ "PIPELINING" }))
      local res = deliver(port, {}, { body = "8BITMIME" })
      stop()
      assert.equal("delivered", res.status, res.text)
      assert.equal("MAIL FROM:<a@client.test>", got[2])
      -- 8-bit content still needs it: bounced, nothing sent
      stop, port, got = serve(plain({ "PIPELINING" }))
      res = deliver(port, {}, { body = "8BITMIME" }, "Subject: x\r\n\r\ncaf\xc3\xa9\r\n")
      stop()
      assert.equal("bounced", res.status)
      assert.equal("5.6.3", res.enhanced)
      assert.is_nil(got[2])
      -- and a server that has it gets BODY=8BITMIME for either
      stop, port, got = serve(plain({ "PIPELINING", "8BITMIME" }))
      res = deliver(port, {}, { body = "8BITMIME" })
      stop()
      assert.equal("delivered", res.status, res.text)
      assert.equal("MAIL FROM:<a@client.test> BODY=8BITMIME", got[2])
    end)
  end)

  it("needs SMTPUTF8 for the addresses of this transaction only, not the message's other domains'", function()
    H.run(function()
      local stop, port, got = serve(plain({ "PIPELINING", "8BITMIME" }))
      local res = deliver(port, {}, { utf8 = true, rcpt = { { a = "b@remote.test" }, { a = "\xc3\xbcser@idn.test" } } })
      stop()
      assert.equal("delivered", res.status, res.text)
      assert.equal("RCPT TO:<b@remote.test>", got[3])
    end)
  end)

  it("sends internationalized domains in A-labels to a server without SMTPUTF8, when the local parts are ASCII",
    function()
    H.run(function()
      local function one(from, to, utf8, body)
        local stop, port, got = serve(plain({ "PIPELINING", "8BITMIME" }))
        local pool = client.pool({ name = "peer-spec", helo = "client.test", timeouts = timeouts(),
          max_connections = 1, max_messages = 10, idle_timeout = 1, pipelining = true })
        local env = { id = "t", from = from, utf8 = utf8, rcpt = { { a = to } } }
        local res = pool:deliver(env, body or "Subject: x\r\n\r\nhello\r\n", { { index = 1, address = to } },
          { { host = "127.0.0.1", port = port } })
        pool:close()
        stop()
        return res[1], got
      end
      local res, got = one("a@b\xc3\xbccher.example", "u@m\xc3\xbcnchen.example", true)
      assert.equal("delivered", res.status, res.text)
      assert.equal("MAIL FROM:<a@xn--bcher-kva.example>", got[2])
      assert.equal("RCPT TO:<u@xn--mnchen-3ya.example>", got[3])
      -- a non-ASCII local part has no ASCII form: bounced, nothing sent
      res, got = one("a@client.test", "j\xc3\xb6rg@m\xc3\xbcnchen.example", true)
      assert.equal("bounced", res.status)
      assert.equal("5.6.7", res.enhanced)
      assert.is_nil(got[2])
      -- nor has a header section in UTF-8
      res, got = one("a@client.test", "u@m\xc3\xbcnchen.example", true, "Subject: gr\xc3\xbc\xc3\x9fe\r\n\r\nx\r\n")
      assert.equal("bounced", res.status)
      assert.equal("5.6.7", res.enhanced)
      assert.is_nil(got[2])
    end)
  end)

  it("does not reuse an idle connection that holds an unsolicited reply", function()
    H.run(function()
      -- the reply, then a 421 nobody asked for (the server does not close)
      local stop, port, got = serve(plain({ "PIPELINING" }, "250 2.0.0 queued\r\n421 4.4.2 idle too long\r\n"))
      local pool = client.pool({ name = "peer-spec", helo = "client.test", timeouts = timeouts(), max_connections = 1,
        max_messages = 10, idle_timeout = 5, pipelining = true })
      local hosts = { { host = "127.0.0.1", port = port } }
      for i = 1, 2 do
        local env = { id = "t" .. i, from = "a@client.test", rcpt = { { a = "b@remote.test" } } }
        local res = pool:deliver(env, "Subject: x\r\n\r\nhello\r\n", { { index = 1, address = "b@remote.test" } },
          hosts)
        assert.equal("delivered", res[1].status, res[1].text)
        sched.sleep(0.2)
      end
      pool:close()
      stop()
      local ehlo = 0
      for _, l in ipairs(got) do if l:match("^EHLO") then ehlo = ehlo + 1 end end
      assert.equal(2, ehlo)
    end)
  end)

  it("bounds a reply by its stage's timeout, not each line of it", function()
    H.run(function()
      local stop, port = serve(function(_, P)
        P.send("220 mx\r\n")
        P.line()
        P.send("250-mx\r\n250 PIPELINING\r\n")
        P.line()
        -- the reply to MAIL, a continuation line every 0.4 s for 4 s (the
        -- MAIL timeout is 1 s), then the rest
        for _ = 1, 10 do
          if not P.send("250-still thinking\r\n") then return end
          -- 0.4 s between lines; the client's other commands are read
          -- meanwhile, and its closing ends the drip
          local deadline = uv.now() + 400
          while uv.now() < deadline do
            local l, e = P.line((deadline - uv.now()) / 1000)
            if not l and e ~= "timeout" then return end
          end
        end
        P.send("250 ok\r\n250 ok\r\n354 go\r\n")
        P.data()
        P.send("250 ok\r\n")
      end)
      local res = deliver(port, { timeouts = { mail = 1, rcpt = 1, data = 1 } })
      stop()
      assert.equal("deferred", res.status)
      assert.matches("timeout waiting for a reply", res.text)
    end, 30)
  end)
end)
