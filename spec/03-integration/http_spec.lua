-- The HTTP listener (runtime/http.lua) behind moonpost.new { http = ... }:
-- health endpoints, bearer tokens, routing errors, JSON bodies, keep-alive
-- and bad requests, over real sockets with curl and a raw peer.
local H = require "helpers"
local http = require "moonpost.runtime.http"
local cjson = require "cjson"

local function start(opts, setup)
  local no = { http = "127.0.0.1:0" }
  for k, v in pairs(opts or {}) do no[k] = v end
  local mta = H.start_mta({}, function(m)
    m:http_route("POST", "/api/v1/echo", function(req)
      local v, err = req.json()
      if v == nil then return 400, { error = err } end
      return 200, { got = v, query = req.query }
    end)
    m:http_route("GET", "/api/v1/items/:id", function(req) return 200, { id = req.params.id } end)
    m:http_route("GET", "/api/v1/boom", function() error("a bug in a handler") end)
    if setup then setup(m) end
  end, no)
  return mta, mta:http_addresses()[1].port
end

local function curl(args)
  local code, out, err = H.exec("curl", args, { timeout = 20 })
  assert(code == 0, "curl: " .. err)
  local body, status = out:match("^(.*)\n(%d%d%d)$")
  return tonumber(status), body
end

describe("the HTTP listener", function()
  it("answers /healthz and /readyz without a token, and guards the rest with it", function()
    H.run(function()
      local mta, port = start({ api_token = "s3cret" })
      local base = "http://127.0.0.1:" .. port
      local status, body = curl({ "-s", "-w", "\n%{http_code}", base .. "/healthz" })
      assert.equal(200, status)
      assert.same({ status = "alive" }, cjson.decode(body))
      status, body = curl({ "-s", "-w", "\n%{http_code}", base .. "/readyz" })
      assert.equal(200, status)
      assert.same({ status = "ready" }, cjson.decode(body))
      -- no token, a wrong one, the right one
      status, body = curl({ "-s", "-w", "\n%{http_code}", base .. "/api/v1/items/42" })
      assert.equal(401, status)
      assert.matches("bearer token", body)
      status = curl({ "-s", "-w", "\n%{http_code}", "-H", "Authorization: Bearer nope", base .. "/api/v1/items/42" })
      assert.equal(401, status)
      status, body = curl({ "-s", "-w", "\n%{http_code}", "-H", "Authorization: Bearer s3cret",
        base .. "/api/v1/items/42" })
      assert.equal(200, status)
      assert.same({ id = "42" }, cjson.decode(body))
      H.stop_mta(mta)
    end)
  end)

  it("says 404, 405 with Allow, 400 for bad JSON, 413 for a body over the limit, 500 for a failing handler", function()
    H.run(function()
      local mta, port = start({ http_max_body = 1000 })
      local s, b = http.request("127.0.0.1", port, "GET", "/nowhere")
      assert.equal(404, s)
      assert.matches("no such endpoint", b)
      local h
      s, b, h = http.request("127.0.0.1", port, "DELETE", "/api/v1/echo")
      assert.equal(405, s)
      assert.matches("not allowed", b)
      assert.equal("POST", h.allow)
      s, b = http.request("127.0.0.1", port, "POST", "/api/v1/echo?x=1&y=a%20b", { a = { 1, 2 } })
      assert.equal(200, s)
      assert.same({ got = { a = { 1, 2 } }, query = { x = "1", y = "a b" } }, cjson.decode(b))
      s, b = http.request("127.0.0.1", port, "POST", "/api/v1/echo", "{not json",
        { ["Content-Type"] = "application/json" })
      assert.equal(400, s)
      assert.matches("bad JSON", cjson.decode(b).error)
      s = http.request("127.0.0.1", port, "POST", "/api/v1/echo", string.rep("x", 2000))
      assert.equal(413, s)
      s, b = http.request("127.0.0.1", port, "GET", "/api/v1/boom")
      assert.equal(500, s)
      assert.same({ error = "internal error" }, cjson.decode(b))
      assert.matches("a bug in a handler", H.log("http GET /api/v1/boom"))
      -- and the listener still serves; HEAD gets the header fields only
      local gs, gb = http.request("127.0.0.1", port, "GET", "/healthz")
      assert.equal(200, gs)
      s, b, h = http.request("127.0.0.1", port, "HEAD", "/healthz", nil, nil, 5)
      assert.equal(200, s)
      assert.equal("", b)
      assert.equal(tostring(#gb), h["content-length"])
      H.stop_mta(mta)
    end)
  end)

  it("keeps a connection for several requests and answers a malformed one with 400", function()
    H.run(function()
      local mta, port = start()
      local stream = require "moonpost.runtime.stream"
      local c = assert(stream.connect("127.0.0.1", port, 5))
      -- one response: status, headers, body (by Content-Length)
      local function response()
        local line = assert(c:receive("*l", 5))
        local len = 0
        while true do
          local h = assert(c:receive("*l", 5))
          if h == "" then break end
          len = tonumber(h:match("^content%-length: (%d+)$")) or len
        end
        return line, len > 0 and assert(c:receive(len, 5)) or ""
      end
      -- two requests in one write, two responses on the same connection
      assert(c:send("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /api/v1/items/7 HTTP/1.1\r\nHost: x\r\n\r\n", 5))
      local l1 = response()
      local l2, b2 = response()
      assert.equal("HTTP/1.1 200 OK", l1)
      assert.equal("HTTP/1.1 200 OK", l2)
      assert.equal('{"id":"7"}', b2)
      assert(c:send("BOGUS\r\n\r\n", 5))
      local l3, b3 = response()
      assert.equal("HTTP/1.1 400 Bad Request", l3)
      assert.matches("malformed request line", b3)
      c:close()
      H.stop_mta(mta)
    end)
  end)

  it("bounds what a client makes it hold: long lines, a trickled head, a body sent before its token", function()
    H.run(function()
      local stream = require "moonpost.runtime.stream"
      local sched = require "moonpost.runtime.sched"
      local router = http.router()
      local handled = 0
      router:add("POST", "/api/v1/echo", function(req)
        handled = handled + 1
        return 200, { n = #req.body }
      end)
      local srv = assert(http.listen({ host = "127.0.0.1", port = 0, router = router, token = "sekrit",
        timeout = 1, idle_timeout = 10 }))
      -- send data, then the status line of the answer and whether the server closed
      local function ask(data, c)
        c = c or assert(stream.connect("127.0.0.1", srv.port, 5))
        if data then assert(c:send(data, 5)) end
        local line = c:receive("*l", 5)
        local rest
        repeat rest = c:receive(1, 5) until not rest
        c:close()
        return line
      end
      -- a request line or a header field past 8 KiB, without its end: answered, not waited for
      assert.equal("HTTP/1.1 414 URI Too Long", ask("GET /" .. string.rep("a", 9000)))
      assert.equal("HTTP/1.1 431 Request Header Fields Too Large",
        ask("GET /healthz HTTP/1.1\r\nX-Big: " .. string.rep("b", 9000)))
      -- a body is not read for a request refused without it
      assert.equal("HTTP/1.1 401 Unauthorized",
        ask("POST /api/v1/echo HTTP/1.1\r\nContent-Length: 5000000\r\n\r\n"))
      assert.equal("HTTP/1.1 404 Not Found", ask("POST /nowhere HTTP/1.1\r\nContent-Length: 5000000\r\n\r\n"))
      -- one deadline for the whole head: header fields trickled in one by one
      local c = assert(stream.connect("127.0.0.1", srv.port, 5))
      assert(c:send("POST /api/v1/echo HTTP/1.1\r\nAuthorization: Bearer sekrit\r\n", 5))
      for i = 1, 8 do
        sched.sleep(0.25)
        if not c:send("X-Slow-" .. i .. ": yes\r\n", 5) then break end
      end
      c:send("Content-Length: 2\r\n\r\n{}", 5)
      assert.equal("HTTP/1.1 408 Request Timeout", ask(nil, c))
      assert.equal(0, handled)
      -- and a good request still works
      assert.equal("HTTP/1.1 200 OK",
        ask("POST /api/v1/echo HTTP/1.1\r\nAuthorization: Bearer sekrit\r\nContent-Length: 2\r\n\r\n{}"))
      assert.equal(1, handled)
      -- an empty line before the request line is ignored (RFC 9112, 2.2)
      assert.equal("HTTP/1.1 200 OK",
        ask("\r\nPOST /api/v1/echo HTTP/1.1\r\nAuthorization: Bearer sekrit\r\nContent-Length: 2\r\n\r\n{}"))
      -- the absolute form of the target names the same resource (RFC 9112, 3.2.2)
      assert.equal("HTTP/1.1 200 OK", ask("POST http://127.0.0.1:" .. srv.port .. "/api/v1/echo HTTP/1.1\r\n"
        .. "Authorization: Bearer sekrit\r\nContent-Length: 2\r\n\r\n{}"))
      assert.equal(3, handled)
      -- tokens longer, shorter or with the right prefix are refused
      for _, t in ipairs({ "sekri", "sekritt", "sekritsekrit", "", "SEKRIT" }) do
        assert.equal("HTTP/1.1 401 Unauthorized",
          ask("POST /api/v1/echo HTTP/1.1\r\nAuthorization: Bearer " .. t .. "\r\nContent-Length: 2\r\n\r\n{}"))
      end
      assert.equal(3, handled)
      srv:close()
    end)
  end)

  it("stops reading from a client whose requests it is not reading (a stream holds at most high_water)", function()
    H.run(function()
      local stream = require "moonpost.runtime.stream"
      local sched = require "moonpost.runtime.sched"
      local uv = require "luv"
      local server_side
      local l = uv.new_tcp()
      assert(l:bind("127.0.0.1", 0))
      assert(l:listen(8, function()
        local t = uv.new_tcp()
        l:accept(t)
        server_side = stream.new(t)
      end))
      local c = assert(stream.connect("127.0.0.1", l:getsockname().port, 5))
      assert(c:send("first\r\n", 5))
      assert.is_true(H.wait_for(function() return server_side ~= nil end, 5))
      assert.equal("first", server_side:receive("*l", 5))
      -- the server reads nothing more; the client sends 8 MiB, as much as the kernel takes
      local sent = 0
      local block = string.rep("x", 65536)
      sched.spawn(function()
        for _ = 1, 128 do
          if not c:send(block, 10) then break end
          sent = sent + #block
        end
      end)
      sched.sleep(1)
      local held = #table.concat(server_side.rbuf or {})
      assert.is_true(held <= server_side.high_water + 65536 * 4, "held " .. held)
      assert.is_true(sent < 8 * 1048576, "the client could send everything")
      -- reading again takes the rest, in order
      local got = server_side:receive(8 * 1048576, 20)
      assert.equal(8 * 1048576, #got)
      assert.is_true(H.wait_for(function() return sent == 8 * 1048576 end, 10))
      c:close()
      server_side:close()
      l:close()
    end)
  end)

  it("the webhook client gives up on a response line without end", function()
    H.run(function()
      local uv = require "luv"
      local client = require "moonpost.runtime.http_client"
      local answers = {
        "HTTP/1.1 200 " .. string.rep("O", 200000),
        "HTTP/1.1 200 OK\r\nX-Long: " .. string.rep("h", 200000),
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" .. string.rep("T: t\r\n", 200),
      }
      local which, conns = 0, {}
      local l = uv.new_tcp()
      assert(l:bind("127.0.0.1", 0))
      assert(l:listen(8, function()
        local t = uv.new_tcp()
        l:accept(t)
        which = which + 1
        conns[which] = t
        local answer = answers[which]
        t:read_start(function(_, chunk)
          if chunk and chunk:find("\r\n\r\n", 1, true) then t:write(answer) end
        end)
      end))
      local expect = { "bad response: a line over 65536 bytes", "bad response: a line over 65536 bytes",
        "bad response: too many trailer fields" }
      for i = 1, #answers do
        local c = assert(client.new("http://127.0.0.1:" .. l:getsockname().port .. "/hook", { timeout = 5 }))
        assert.same({ nil, expect[i] }, { c:request("POST", "{}", { ["Content-Type"] = "application/json" }) }, i)
        c:close()
      end
      for _, t in ipairs(conns) do t:close() end
      l:close()
    end)
  end)

  it("the webhook client reads past interim 1xx answers to the final one, request by request", function()
    H.run(function()
      local uv = require "luv"
      local client = require "moonpost.runtime.http_client"
      -- one connection, two requests: a 100 Continue and a 103 before the
      -- first one's 200, then a 503 for the second
      local answers = { "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        .. "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n" }
      local n, conns = 0, {}
      local l = uv.new_tcp()
      assert(l:bind("127.0.0.1", 0))
      assert(l:listen(8, function()
        local t = uv.new_tcp()
        l:accept(t)
        conns[#conns + 1] = t
        local buf = ""
        t:read_start(function(_, chunk)
          buf = buf .. (chunk or "")
          -- each request is a head and a 2-octet body ("{}")
          while true do
            local e = buf:find("\r\n\r\n", 1, true)
            if not e or #buf < e + 3 + 2 then break end
            buf = buf:sub(e + 4 + 2)
            n = n + 1
            t:write(answers[n] or answers[#answers])
          end
        end)
      end))
      local c = assert(client.new("http://127.0.0.1:" .. l:getsockname().port .. "/hook", { timeout = 5 }))
      local r1 = assert(c:request("POST", "{}", { ["Content-Type"] = "application/json" }))
      local r2 = assert(c:request("POST", "{}", { ["Content-Type"] = "application/json" }))
      c:close()
      assert.same({ 200, "ok", 503 }, { r1.status, r1.body, r2.status })
      assert.equal(1, #conns)
      for _, t in ipairs(conns) do t:close() end
      l:close()
    end)
  end)

  it("answers 500 and closes when a handler's answer cannot be sent as JSON (a number the client sent)", function()
    H.run(function()
      local mta, port = start()
      -- the echo route hands back what it decoded: 1e999 decodes to inf, which JSON cannot write
      local s, b = http.request("127.0.0.1", port, "POST", "/api/v1/echo", '{"a": 1e999}',
        { ["Content-Type"] = "application/json" }, 5)
      assert.equal(500, s, tostring(b))
      assert.same({ error = "internal error" }, cjson.decode(b))
      assert.matches("http POST /api/v1/echo", H.log("cannot be sent"))
      -- nothing of that connection is left behind
      local srv = mta.http_servers[1]
      assert.is_true(H.wait_for(function() return next(srv.conns) == nil end, 5))
      assert.equal(200, (http.request("127.0.0.1", port, "GET", "/healthz", nil, nil, 5)))
      H.stop_mta(mta)
    end)
  end)

  it("sends its own errors as UTF-8 JSON, whatever octets the request path holds", function()
    H.run(function()
      local mta, port = start()
      local stream = require "moonpost.runtime.stream"
      local mime = require "moonpost.runtime.mime"
      local c = assert(stream.connect("127.0.0.1", port, 5))
      assert(c:send("GET /caf\xe9/\xff HTTP/1.1\r\nConnection: close\r\n\r\n", 5))
      local head, len = assert(c:receive("*l", 5)), 0
      while true do
        local h = assert(c:receive("*l", 5))
        if h == "" then break end
        len = tonumber(h:match("^content%-length: (%d+)$")) or len
      end
      local body = assert(c:receive(len, 5))
      c:close()
      assert.equal("HTTP/1.1 404 Not Found", head)
      assert.is_true(mime.utf8_valid(body), body)
      assert.same({ error = "no such endpoint: /caf\u{FFFD}/\u{FFFD}" }, cjson.decode(body))
      H.stop_mta(mta)
    end)
  end)

  it("reads no body for a GET: an open endpoint cannot be made to hold http_max_body for a client without a token",
    function()
    H.run(function()
      local mta, port = start({ api_token = "s3cret" })
      local stream = require "moonpost.runtime.stream"
      -- /healthz needs no token; the 10 MB this head announces never come
      local c = assert(stream.connect("127.0.0.1", port, 5))
      assert(c:send("GET /healthz HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n", 5))
      local line = c:receive("*l", 5)
      c:close()
      assert.equal("HTTP/1.1 413 Content Too Large", line)
      assert.equal(200, (http.request("127.0.0.1", port, "GET", "/healthz", nil, nil, 5)))
      H.stop_mta(mta)
    end)
  end)

  it("keeps answering SMTP while a client opens HTTP connections by the hundred (they do not take every descriptor)",
    function()
    local ffi = require "ffi"
    local uv = require "luv"
    pcall(ffi.cdef, "struct moonpost_spec_rlimit { unsigned long cur, max; };"
      .. "int getrlimit(int, struct moonpost_spec_rlimit *); int setrlimit(int, const struct moonpost_spec_rlimit *);")
    local RLIMIT_NOFILE = 7
    local saved = ffi.new("struct moonpost_spec_rlimit")
    assert(ffi.C.getrlimit(RLIMIT_NOFILE, saved) == 0)
    -- a client on loopback: 600 idle connections to the HTTP listener, then one to SMTP
    local script = [[
import resource, socket, sys, time
h = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (h, h))
hp, sp = int(sys.argv[1]), int(sys.argv[2])
held = []
for i in range(600):
    try:
        held.append(socket.create_connection(("127.0.0.1", hp), timeout=2))
    except OSError:
        pass
time.sleep(1)
s = socket.create_connection(("127.0.0.1", sp), timeout=5)
try:
    greeting = s.recv(512)
except OSError:
    greeting = b""
print("smtp=" + greeting.decode("latin-1").strip())
]]
    local ok, err = pcall(H.run, function()
      local mta, hport = start()
      local sport = mta:addresses()[1].port
      -- the process may open 300 descriptors more than it has now: a tight
      -- limit stands for any limit; the listeners have to share it
      local n = 0
      local req = uv.fs_scandir("/proc/self/fd")
      while req and uv.fs_scandir_next(req) do n = n + 1 end
      local low = ffi.new("struct moonpost_spec_rlimit", { n + 300, saved.max })
      assert(ffi.C.setrlimit(RLIMIT_NOFILE, low) == 0)
      local code, out, perr = H.exec(H.python, { "-c", script, tostring(hport), tostring(sport) }, { timeout = 60 })
      assert(ffi.C.setrlimit(RLIMIT_NOFILE, saved) == 0)
      assert.equal(0, code, perr)
      assert.matches("^smtp=220 ", out)
      H.stop_mta(mta)
    end)
    ffi.C.setrlimit(RLIMIT_NOFILE, saved)
    assert(ok, err)
  end)

  it("answers a connection past http_max_connections with 503 and closes it; a freed place is taken again",
    function()
    H.run(function()
      local mta, port = start({ http_max_connections = 2 })
      local stream = require "moonpost.runtime.stream"
      local a = assert(stream.connect("127.0.0.1", port, 5))
      local b = assert(stream.connect("127.0.0.1", port, 5))
      assert.is_true(H.wait_for(function() return mta.http_servers[1].active == 2 end, 5))
      local c = assert(stream.connect("127.0.0.1", port, 5))
      assert.equal("HTTP/1.1 503 Service Unavailable", c:receive("*l", 5))
      local rest = ""
      while true do
        local x = c:receive(1, 5)
        if not x then break end
        rest = rest .. x
      end
      c:close()
      assert.matches('{"error":"too many connections"}$', rest)
      assert.matches("connection refused, 2 open", H.log("http "))
      a:close()
      assert.is_true(H.wait_for(function() return mta.http_servers[1].active == 1 end, 5))
      assert.equal(200, (http.request("127.0.0.1", port, "GET", "/healthz", nil, nil, 5)))
      b:close()
      H.stop_mta(mta)
    end)
  end)

  it("takes the Bearer scheme in any case, as HTTP's authentication schemes are (RFC 9110, 11.1)", function()
    H.run(function()
      local mta, port = start({ api_token = "s3cret" })
      for _, auth in ipairs({ "Bearer s3cret", "bearer s3cret", "BEARER s3cret" }) do
        assert.equal(200, (http.request("127.0.0.1", port, "GET", "/api/v1/items/1", nil, { Authorization = auth }, 5)),
          auth)
      end
      for _, auth in ipairs({ "Bearer S3CRET", "Basic s3cret", "Bearer", "s3cret", "Bearer s3cret2" }) do
        assert.equal(401, (http.request("127.0.0.1", port, "GET", "/api/v1/items/1", nil, { Authorization = auth }, 5)),
          auth)
      end
      H.stop_mta(mta)
    end)
  end)

  it("lets a client that sends its body at once read the 413 or 401 it gets instead of a reset", function()
    H.run(function()
      local mta, port = start({ api_token = "s3cret", http_max_body = "3M" })
      -- 4 MiB, as ctl would send a large message: over the limit, or with a wrong token
      local big = string.rep("0123456789abcdef", 262144)
      local auth = { Authorization = "Bearer s3cret", ["Content-Type"] = "application/json" }
      for i = 1, 5 do
        local s, b = http.request("127.0.0.1", port, "POST", "/api/v1/echo", big, auth, 10)
        assert.equal(413, s, i .. ": " .. tostring(b))
        assert.matches("the body is over 3145728 bytes", b)
        s, b = http.request("127.0.0.1", port, "POST", "/api/v1/echo", big:sub(1, 2097152),
          { Authorization = "Bearer nope" }, 10)
        assert.equal(401, s, i .. ": " .. tostring(b))
      end
      H.stop_mta(mta)
    end)
  end)

  it("refuses a listener address it cannot use, naming it", function()
    H.run(function()
      local moonpost = require "moonpost"
      local first, port = start()
      local mta = moonpost.new({ http = "127.0.0.1:" .. port })
      local ok, err = mta:start()
      assert.is_nil(ok)
      assert.matches("cannot listen %(http%) on 127%.0%.0%.1:" .. port .. ": EADDRINUSE", err)
      H.stop_mta(first)
      local bad = pcall(moonpost.new, { http = "localhost:80" })
      assert.is_false(bad)
    end)
  end)
end)
