local smtp = require "moonpost.core.smtp"

-- Feed input in the given chunk sizes (a number = fixed size, nil = all at
-- once) and collect the events, switching modes the way a session does.
local function run(input, chunk, limits)
  local p = smtp.parser(limits)
  local events = {}
  local pos = 1
  local function drain()
    while true do
      local kind, a, b, c = p:next()
      if not kind then return end
      if kind == "cmd" then
        events[#events + 1] = { "cmd", a, b, c }
        if a == "DATA" then p:begin_data() end
        local size, last = b:match("^(%d+)%s*(%a*)$")
        if a == "BDAT" and size then
          p:begin_bdat(tonumber(size))
          events[#events].last = last ~= ""
        end
      elseif kind == "data" or kind == "bdat" then
        local last = kind == "data" or events[#events].last
        if last then
          local msg, flags = p:take()
          events[#events + 1] = { kind, msg:tostring(), flags }
          msg:close()
        else
          events[#events + 1] = { kind .. "-chunk", p:body_size(), a }
        end
      else
        events[#events + 1] = { kind, a, b }
      end
    end
  end
  while pos <= #input do
    local n = chunk or #input
    p:push(input:sub(pos, pos + n - 1))
    pos = pos + n
    drain()
  end
  drain()
  p:close()
  return events
end

local function cmds(events)
  local out = {}
  for _, e in ipairs(events) do
    if e[1] == "cmd" then out[#out + 1] = e[2] .. (e[3] ~= "" and (" " .. e[3]) or "") end
  end
  return out
end

describe("moonpost.core.smtp parser", function()
  it("next() frames commands with verb upper-cased and argument trimmed", function()
    local ev = run("ehlo client.example\r\nMail From:<a@b.example>  \r\nNOOP\r\n")
    assert.same({ "cmd", "EHLO", "client.example", 0 }, ev[1])
    assert.same({ "cmd", "MAIL", "From:<a@b.example>", 0 }, ev[2])
    assert.same({ "cmd", "NOOP", "", 0 }, ev[3])
  end)

  it("next() flags a bare LF line ending and bad characters", function()
    local ev = run("NOOP\nRSET\r\nNO\0OP\r\nNO\rOP\r\n")
    assert.same({ "cmd", "NOOP", "", 1 }, ev[1])
    assert.same({ "cmd", "RSET", "", 0 }, ev[2])
    assert.equal(2, ev[3][4])
    assert.equal(2, ev[4][4])
  end)

  it("gives the same commands however the input is split", function()
    local input = "EHLO a\r\nMAIL FROM:<x@y.z> SIZE=100\r\nRCPT TO:<r@s.t>\r\nRCPT TO:<q@s.t>\r\n"
      .. "DATA\r\nSubject: hi\r\n\r\n..leading dot\r\nbody\r\n.\r\nRSET\r\nQUIT\r\n"
    local whole = run(input)
    for size = 1, #input do
      assert.same(whole, run(input, size), "chunk size " .. size)
    end
    assert.same({ "EHLO a", "MAIL FROM:<x@y.z> SIZE=100", "RCPT TO:<r@s.t>", "RCPT TO:<q@s.t>",
      "DATA", "RSET", "QUIT" }, cmds(whole))
    assert.same({ "data", "Subject: hi\r\n\r\n.leading dot\r\nbody\r\n", 0 }, whole[6])
  end)

  it("gives the same result for every two-way split of a pipelined group", function()
    local input = "MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n"
    local whole = run(input)
    for cut = 1, #input - 1 do
      local p = smtp.parser()
      local got = {}
      local function drain()
        while true do
          local kind, a, b = p:next()
          if not kind then return end
          got[#got + 1] = kind .. ":" .. tostring(a) .. ":" .. tostring(b)
          if a == "DATA" then p:begin_data() end
        end
      end
      p:push(input:sub(1, cut))
      drain()
      p:push(input:sub(cut + 1))
      drain()
      assert.equal(5, #got, "cut at " .. cut)
      assert.equal("data:0:nil", got[4], "cut at " .. cut)
      p:close()
    end
    assert.equal(5, #whole)
  end)

  it("ends DATA on CRLF.CRLF split across reads at any position", function()
    local body = "line one\r\nline two\r\n"
    local input = "DATA\r\n" .. body .. ".\r\nNOOP\r\n"
    for size = 1, 8 do
      local ev = run(input, size)
      assert.same({ "data", body, 0 }, ev[2], "chunk size " .. size)
      assert.same({ "cmd", "NOOP", "", 0 }, ev[3])
    end
  end)

  -- SMTP smuggling: none of these may end the data; the injected MAIL must
  -- stay message content.
  local variants = {
    ["\\n.\\n"] = "\n.\n",
    ["\\r.\\r"] = "\r.\r",
    ["\\n.\\r\\n"] = "\n.\r\n",
    ["\\r\\n.\\n"] = "\r\n.\n",
    ["\\r.\\r\\n"] = "\r.\r\n",
    ["\\n.\\r"] = "\n.\r",
    ["\\r\\n.\\r"] = "\r\n.\r",
  }
  for name, seq in pairs(variants) do
    it("does not end DATA on " .. name, function()
      local input = "DATA\r\nSubject: a" .. seq .. "MAIL FROM:<evil@x.y>\r\nRCPT TO:<v@x.y>\r\nDATA\r\n"
        .. "smuggled\r\n.\r\nQUIT\r\n"
      for _, size in ipairs({ false, 1, 2, 3, 5 }) do
        local ev = run(input, size or nil)
        assert.same({ "DATA", "QUIT" }, cmds(ev), name .. " chunk " .. tostring(size))
        assert.equal("data", ev[2][1])
        assert.truthy(ev[2][2]:find("MAIL FROM:<evil@x.y>\r\n", 1, true))
        -- stored with CRLF only, and flagged
        assert.falsy(ev[2][2]:find("[^\r]\n"))
        assert.falsy(ev[2][2]:find("\r[^\n]"))
        assert.is_true(ev[2][3] ~= 0)
      end
    end)
  end

  it("stores bare LF and bare CR as CRLF and reports them", function()
    local ev = run("DATA\r\na\nb\rc\r\n.\r\n")
    assert.same({ "data", "a\r\nb\r\nc\r\n", 1 + 2 }, ev[2])
  end)

  it("removes one leading dot (transparency) and keeps the rest", function()
    local ev = run("DATA\r\n..\r\n...x\r\n.y\r\n.\r\n")
    assert.same({ "data", ".\r\n..x\r\ny\r\n", 0 }, ev[2])
  end)

  it("ends DATA at once when the content is empty", function()
    local ev = run("DATA\r\n.\r\n")
    assert.same({ "data", "", 0 }, ev[2])
  end)

  it("flags a content line over the text line limit", function()
    local long = string.rep("x", 999) -- 1001 octets with CRLF
    local ev = run("DATA\r\n" .. long .. "\r\n.\r\n")
    assert.equal(4, ev[2][3])
    ev = run("DATA\r\n" .. string.rep("x", 998) .. "\r\n.\r\n")
    assert.equal(0, ev[2][3])
    ev = run("DATA\r\n" .. long .. "\r\n.\r\n", 7, { text_line = 0 })
    assert.equal(0, ev[2][3])
  end)

  it("stops storing past max_size but reads to the end, whatever the chunking", function()
    local input = "DATA\r\n" .. string.rep("abcdefgh\r\n", 100) .. ".\r\nNOOP\r\n"
    local whole = run(input, nil, { max_size = 505 })
    assert.equal(8, whole[2][3])
    assert.equal(505, #whole[2][2])
    assert.same({ "cmd", "NOOP", "", 0 }, whole[3])
    for size = 1, 17 do
      assert.same(whole, run(input, size, { max_size = 505 }), "chunk size " .. size)
    end
  end)

  it("reports a command line over 512 octets once, at its end, and carries on", function()
    local ev = run("NOOP " .. string.rep("a", 600) .. "\r\nNOOP\r\n", 50)
    assert.equal("too_long", ev[1][1])
    assert.equal(5 + 600 + 2, ev[1][2])
    assert.equal("NOOP", ev[1][3]) -- the verb, whole or read in pieces
    assert.same({ "cmd", "NOOP", "", 0 }, ev[2])
    assert.same(ev, run("NOOP " .. string.rep("a", 600) .. "\r\nNOOP\r\n"))
    -- exactly 512 with CRLF is fine
    ev = run("NOOP " .. string.rep("a", 505) .. "\r\n")
    assert.equal("cmd", ev[1][1])
    ev = run("NOOP " .. string.rep("a", 506) .. "\r\n")
    assert.equal("too_long", ev[1][1])
  end)

  it("allows MAIL and RCPT the extension allowance and AUTH 12288 octets", function()
    local ev = run("MAIL FROM:<a@b.c> ENVID=" .. string.rep("x", 90) .. " " .. string.rep("X", 500) .. "\r\n")
    assert.equal("cmd", ev[1][1])
    ev = run("AUTH PLAIN " .. string.rep("A", 5000) .. "\r\n", 1000)
    assert.equal("cmd", ev[1][1])
    ev = run("AUTH PLAIN " .. string.rep("A", 13000) .. "\r\nNOOP\r\n", 1000)
    assert.equal("too_long", ev[1][1])
    assert.equal("NOOP", ev[2][2])
  end)

  it("discards an endless line without holding it in memory", function()
    local p = smtp.parser()
    for _ = 1, 100 do
      p:push(string.rep("z", 10000))
      assert.is_nil(p:next())
      assert.is_true(p:buffered() < 20000)
    end
    p:push("\r\nQUIT\r\n")
    local kind, _, verb = p:next()
    assert.equal("too_long", kind)
    assert.equal("ZZZZZZZZZZZZZZZZ", verb) -- 16 octets of the verb kept
    assert.same({ "cmd", "QUIT", "", 0 }, { p:next() })
    -- an AUTH continuation line has no verb
    p:begin_line()
    p:push(string.rep("y", 13000) .. "\r\n")
    assert.same({ "too_long", 13002 }, { p:next() })
    p:close()
  end)

  it("frames BDAT chunks by length, across chunk boundaries, with no dot handling", function()
    local input = "BDAT 7\r\n.\r\nabc\rBDAT 5 LAST\r\n\n.\r\nxQUIT\r\n"
    for _, size in ipairs({ false, 1, 2, 3 }) do
      local ev = run(input, size or nil)
      assert.same({ "BDAT", "BDAT", "QUIT" }, { ev[1][2], ev[3][2], ev[5][2] })
      assert.equal("bdat-chunk", ev[2][1])
      assert.equal("bdat", ev[4][1])
      -- ".\r\nabc\r" + "\n.\r\nx": the CR/LF pair split across chunks stays one CRLF
      assert.equal(".\r\nabc\r\n.\r\nx", ev[4][2])
      assert.equal(0, ev[4][3])
    end
  end)

  it("BDAT flags a bare CR at the very end of the message", function()
    local ev = run("BDAT 2 LAST\r\nx\r")
    assert.equal("x\r\n", ev[2][2])
    assert.equal(2, ev[2][3])
  end)

  it("line mode returns one raw line then goes back to commands", function()
    local p = smtp.parser()
    p:push("dXNlcg==\r\nNOOP\r\n")
    p:begin_line()
    assert.same({ "line", "dXNlcg==", 0 }, { p:next() })
    assert.same({ "cmd", "NOOP", "", 0 }, { p:next() })
    p:close()
  end)

  it("discard() drops buffered input (STARTTLS)", function()
    local p = smtp.parser()
    p:push("STARTTLS\r\nMAIL FROM:<injected@x.y>\r\n")
    assert.equal("STARTTLS", select(2, p:next()))
    p:discard()
    assert.equal(0, p:buffered())
    assert.is_nil(p:next())
    p:close()
  end)

  it("close() is idempotent and use after close raises", function()
    local p = smtp.parser()
    assert.is_true(p:close())
    assert.is_true(p:close())
    assert.has_error(function() p:next() end)
    assert.has_error(function() p:push("x") end)
  end)

  it("is collected without close()", function()
    for _ = 1, 1000 do
      local p = smtp.parser()
      p:push("DATA\r\n")
      p:next()
      p:begin_data()
      p:push(string.rep("x", 1000))
      p:next()
    end
    collectgarbage()
    collectgarbage()
  end)

  it("parser() rejects bad limits", function()
    assert.has_error(function() smtp.parser({ cmd_line = "x" }) end)
    assert.has_error(function() smtp.parser({ max_size = -1 }) end)
    assert.has_error(function() smtp.parser({ cmd_line = 3 }) end)
  end)
end)

describe("moonpost.core.smtp message", function()
  it("holds bytes in C: size, tostring, sub, headers, prepend, append", function()
    local m = smtp.message("Subject: x\r\nFrom: a@b\r\n\r\nbody\r\n")
    assert.equal(31, m:size())
    assert.equal(31, #m)
    assert.equal("Subject: x\r\nFrom: a@b\r\n\r\n", m:headers())
    assert.equal("Sub", m:sub(1, 3))
    assert.equal("y\r\n", m:sub(-3))
    m:prepend("Received: x\r\n")
    assert.equal("Received: x\r\nSubject", m:sub(1, 20))
    m:prepend(string.rep("h", 5000))
    assert.equal(5000 + 13 + 31, m:size())
    m:append("tail")
    assert.equal("tail", m:sub(-4))
    assert.is_true(m:close())
    assert.is_true(m:close())
    assert.has_error(function() m:size() end)
    assert.equal("smtp.message (closed)", tostring(m))
  end)

  it("remove(i, j) drops octets like sub() selects them, and prepend() still works after it", function()
    local m = smtp.message("A: 1\r\nX-Tenant: acme\r\nB: 2\r\n\r\nbody\r\n")
    assert.equal(m, m:remove(7, 22))
    assert.equal("A: 1\r\nB: 2\r\n\r\nbody\r\n", m:tostring())
    m:remove(-2)
    assert.equal("A: 1\r\nB: 2\r\n\r\nbody", m:tostring())
    m:remove(5, 4) -- empty range: nothing
    m:remove(-100, 2)
    assert.equal(" 1\r\nB: 2\r\n\r\nbody", m:tostring())
    m:prepend("Received: x\r\nA:")
    assert.equal("Received: x\r\nA: 1\r\nB: 2\r\n\r\nbody", m:tostring())
    m:remove(1, 1000)
    assert.equal(0, m:size())
    assert.equal("", m:tostring())
  end)

  it("headers() returns the whole message when there is no blank line", function()
    assert.equal("A: b\r\n", smtp.message("A: b\r\n"):headers())
    assert.equal("\r\n", smtp.message("\r\nbody"):headers())
  end)

  it("write(fd) writes the prefix and the bytes, and reports errors with a code", function()
    local uv = require "luv"
    local path = os.tmpname()
    local fd = assert(uv.fs_open(path, "w", 384))
    local m = smtp.message("hello\r\n")
    assert.equal(5 + 7, m:write(fd, "pre: "))
    uv.fs_close(fd)
    local f = io.open(path, "rb")
    assert.equal("pre: hello\r\n", f:read("*a"))
    f:close()
    os.remove(path)
    local n, err, code = m:write(987654)
    assert.is_nil(n)
    assert.matches("^write: ", err)
    assert.equal("EBADF", code)
  end)

  it("tune_malloc() applies glibc's heap settings (scripts/bench: page faults per durable message)", function()
    local f = io.open("/usr/include/malloc.h")
    if f then
      f:close()
      assert.is_true(smtp.tune_malloc())
    else
      assert.is_false(smtp.tune_malloc())
    end
  end)
end)

-- A message's DATA written from C (smtp.send_stuffed, through
-- stream:send_stuffed): the same octets as dotstuff gives, in order, also
-- when the socket takes only part of it and the rest is queued.
describe("moonpost.core.smtp send_stuffed", function()
  local H = require "helpers"
  local uv = require "luv"
  local stream = require "moonpost.runtime.stream"

  -- pair(fn(client_stream)) -> the octets the other end received until close
  local function pair(fn)
    local got = {}
    H.run(function()
      local done = false
      local server, port = H.listen(function(c)
        -- read slowly at first: a large message fills the socket buffers
        local t = uv.new_timer()
        t:start(200, 0, function()
          t:close()
          c:read_start(function(_, data)
            if data then got[#got + 1] = data else c:close() done = true end
          end)
        end)
      end)
      local s = assert(stream.connect("127.0.0.1", port, 5))
      fn(s)
      s.tcp:shutdown()
      H.wait_for(function() return done end, 20)
      s:close()
      server:close()
    end)
    return table.concat(got)
  end

  it("writes the stuffed message, whole or in part, and says unsupported for other handles", function()
    local small = "Subject: x\r\n\r\n.dot first\r\nbody\r\n"
    local big = string.rep(".line of the message\r\n", 400000) -- 8.8 MB: more than a socket takes at once
    local msg = smtp.message("A: b\r\n\r\n..two\r\n")
    local sbig = smtp.dotstuff(big)
    local got = pair(function(s)
      assert.is_true(s:send_stuffed(small, 5))
      assert.is_true(s:send_stuffed(msg, 5))
      -- the socket takes the first part of the big one; the rest comes back
      local n, rest = smtp.send_stuffed(s.tcp, s.tcp:fileno(), big)
      assert.is_true(n > 0 and n < #sbig, tostring(n))
      assert.equal(sbig:sub(n + 1), rest)
      assert.is_true(s:send(rest, 20))
      -- and through the stream, which queues the rest itself
      assert.is_true(s:send_stuffed(big, 20))
    end)
    assert.equal(smtp.dotstuff(small) .. smtp.dotstuff(msg) .. sbig .. sbig, got)
    H.run(function()
      local t = uv.new_timer()
      assert.same({ nil, "unsupported" }, { smtp.send_stuffed(t, 0, small) })
      t:close()
      -- a descriptor other than the handle's (a libuv that reads luv's
      -- handles differently): not written to
      local server, port = H.listen(function(c) c:close() end)
      local s = assert(stream.connect("127.0.0.1", port, 5))
      assert.same({ nil, "unsupported" }, { smtp.send_stuffed(s.tcp, s.tcp:fileno() + 1, small) })
      assert.equal(0, s.bytes_out)
      s:close()
      server:close()
    end)
    assert.same({ nil, "unsupported" }, { smtp.send_stuffed("not a handle", 0, small) })
  end)

  it("writes a trailer after the message in the same write, and returns what the socket left of both", function()
    local big = string.rep(".line of the message\r\n", 400000)
    local sbig = smtp.dotstuff(big)
    local next_cmds = "MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\n"
    local got = pair(function(s)
      -- small: all of it at once
      local n, rest = smtp.send_stuffed(s.tcp, s.tcp:fileno(), "x\r\n", next_cmds)
      assert.equal(#"x\r\n.\r\n" + #next_cmds, n)
      assert.is_nil(rest)
      -- big: the rest is the rest of the message and the whole trailer
      n, rest = smtp.send_stuffed(s.tcp, s.tcp:fileno(), big, next_cmds)
      assert.is_true(n > 0 and n < #sbig, tostring(n))
      assert.equal(sbig:sub(n + 1) .. next_cmds, rest)
      assert.is_true(s:send(rest, 20))
      -- through the stream
      assert.is_true(s:send_stuffed(big, 20, next_cmds))
    end)
    assert.equal("x\r\n.\r\n" .. next_cmds .. sbig .. next_cmds .. sbig .. next_cmds, got)
  end)
end)

describe("moonpost.core.smtp userdata checks", function()
  it("refuses another type's userdata, also after the right one has been checked", function()
    local p, r = smtp.parser(), smtp.reply_parser()
    assert.is_true(p:push("HELO x\r\n") > 0)
    assert.equal("cmd", (p:next()))
    for _ = 1, 3 do
      local ok, err = pcall(p.push, r, "x")
      assert.is_false(ok)
      assert.matches("moonpost.core.smtp.parser expected", err, 1, true)
      ok, err = pcall(r.push, p, "x")
      assert.is_false(ok)
      assert.matches("moonpost.core.smtp.reply expected", err, 1, true)
      ok, err = pcall(smtp.message("a").size, p)
      assert.is_false(ok)
      assert.matches("moonpost.core.smtp.message expected", err, 1, true)
    end
    p:close()
    r:close()
  end)
end)
