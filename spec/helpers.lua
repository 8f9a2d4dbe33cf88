-- Spec helpers: a loop runner that fails on leaked handles, an in-process
-- MTA on 127.0.0.1:0, a scripted SMTP peer, and a runner for real client
-- programs (swaks, python3, smtp-source).
local uv = require "luv"
local sched = require "moonpost.runtime.sched"
local stream = require "moonpost.runtime.stream"
local smtp = require "moonpost.core.smtp"

local H = {}

-- Policy source for the body of a Maildir `folder` function (rcpt and env
-- in scope): the first delivery to hang@ hangs the event loop for good (a
-- policy bug, a stuck C call) after making <maildir>/hung; once that file
-- exists, hang@ is delivered. For the watchdog specs.
H.POLICY_HANG = [[
    if rcpt["local"] == "hang" and not require("luv").fs_stat(env.maildir .. "/hung") then
      io.open(env.maildir .. "/hung", "w"):close()
      while true do end
    end
]]
H.root = _G.MOONPOST_ROOT or "."
H.python = "/usr/bin/python3"   -- Debian's, with Debian's modules

-- ---- the loop runner ----------------------------------------------------------

-- Handles meant to outlive one H.run (a server started in setup() and
-- stopped in teardown()).
local persistent = setmetatable({}, { __mode = "k" })

local function open_handles()
  local list = {}
  uv.walk(function(h)
    if not h:is_closing() and not sched.is_internal(h) and not persistent[h] then list[#list + 1] = h end
  end)
  return list
end

-- run(fn, [timeout]) runs fn as a task on the loop until it returns. It
-- raises fn's error, fails after `timeout` seconds (default 60) and fails
-- when fn leaves a handle open.
function H.run(fn, timeout)
  timeout = timeout or 60
  local results, failure
  local task = sched.spawn_named("spec", function(e) failure = e end, function()
    results = { fn() }
  end)
  local timed_out = false
  local timer = uv.new_timer()
  timer:start(math.floor(timeout * 1000), 0, function()
    timed_out = true
  end)
  while not task.done and not timed_out do
    uv.run("once")
  end
  timer:close()
  -- Let close callbacks and finishing sessions run.
  for _ = 1, 20 do
    if not uv.run("nowait") then break end
  end
  local leaks = open_handles()
  for _, h in ipairs(leaks) do h:close() end
  for _ = 1, 5 do uv.run("nowait") end
  if timed_out then error(string.format("spec task timed out after %gs", timeout), 2) end
  if failure then error(failure, 2) end
  if #leaks > 0 then
    local names = {}
    for i, h in ipairs(leaks) do names[i] = tostring(h) end
    error("spec left handles open: " .. table.concat(names, ", "), 2)
  end
  return unpack(results)
end

-- The captured process log (see spec/helper.lua): all of it, or the lines
-- that contain `needle`.
function H.log(needle)
  local out = {}
  for _, l in ipairs(_G.MOONPOST_LOG or {}) do
    if not needle or l:find(needle, 1, true) then out[#out + 1] = l end
  end
  return table.concat(out)
end

-- count(text, needle) -> how many times needle occurs in text (plain)
function H.count(text, needle)
  local n, init = 0, 1
  while true do
    local i = text:find(needle, init, true)
    if not i then return n end
    n, init = n + 1, i + #needle
  end
end

-- wait_for(fn, [timeout]) -> true once fn() is true, false after timeout
-- seconds (default 30), polling every 20 ms.
function H.wait_for(fn, timeout)
  local deadline = uv.now() + (timeout or 30) * 1000
  while uv.now() < deadline do
    if fn() then return true end
    sched.sleep(0.02)
  end
  return fn() and true or false
end

-- ---- files -----------------------------------------------------------------------

function H.tmpdir(prefix)
  local dir = uv.fs_mkdtemp("/tmp/" .. (prefix or "moonpost-spec") .. "-XXXXXX")
  return dir
end

function H.rm_rf(dir)
  assert(dir and dir:match("^/tmp/"), "rm_rf only under /tmp")
  os.execute("rm -rf '" .. dir .. "'")
end

-- Files directly in dir (not recursive), sorted.
function H.ls(dir)
  local out = {}
  local req = uv.fs_scandir(dir)
  if not req then return out end
  while true do
    local name, t = uv.fs_scandir_next(req)
    if not name then break end
    if t == "file" then out[#out + 1] = name end
  end
  table.sort(out)
  return out
end

function H.read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

function H.write(path, data)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
end

-- certs() -> directory with fresh test certificates (spec/tools/mkcerts.sh),
-- made once per process.
local certs_dir
function H.certs()
  if not certs_dir then
    local dir = H.tmpdir("moonpost-certs")
    assert(os.execute(H.root .. "/spec/tools/mkcerts.sh " .. dir) == 0, "mkcerts.sh failed")
    certs_dir = dir
  end
  return certs_dir
end

-- ---- an MTA in this process ----------------------------------------------------

-- start_mta(accept_opts, setup, new_opts) -> mta, port. setup(mta, moonpost)
-- adds hooks; new_opts go to moonpost.new (spool, queue, ...).
function H.start_mta(accept_opts, setup, new_opts)
  local moonpost = require "moonpost"
  local accept = require "moonpost.accept"
  local no = { hostname = "mx.test" }
  for k, v in pairs(new_opts or {}) do no[k] = v end
  local mta = moonpost.new(no)
  local o = {}
  for k, v in pairs(accept_opts or {}) do o[k] = v end
  o.listen = o.listen or "127.0.0.1:0"
  if o.log_messages == nil then o.log_messages = false end
  mta:use(accept.smtp(o))
  if setup then setup(mta, moonpost) end
  local ok, err = mta:start()
  if not ok then error(err, 2) end
  return mta, mta:addresses()[1].port
end

-- send(port, opts) sends one message over a new connection and returns the
-- final reply: code, enhanced, text. opts: from, to (string or list), body,
-- mail_params, rcpt_params.
function H.send(port, opts)
  opts = opts or {}
  local p, err = H.connect(port)
  if not p then return nil, err end
  local function step(line, want)
    if line then p:cmd(line) end
    local c, e, t = p:reply()
    if c ~= want then
      p:close()
      return false, c, e, t
    end
    return true
  end
  local ok, c, e, t = step(nil, 220)
  if ok then ok, c, e, t = step("EHLO client.test", 250) end
  if ok then ok, c, e, t = step("MAIL FROM:<" .. (opts.from or "sender@client.test") .. ">"
    .. (opts.mail_params and (" " .. opts.mail_params) or ""), 250) end
  local to = type(opts.to) == "table" and opts.to or { opts.to or "rcpt@mx.test" }
  for _, r in ipairs(to) do
    if ok then ok, c, e, t = step("RCPT TO:<" .. r .. ">" .. (opts.rcpt_params and (" " .. opts.rcpt_params) or ""), 250) end
  end
  if ok then ok, c, e, t = step("DATA", 354) end
  if not ok then return c, e, t end
  p:send((opts.body or "Subject: test\r\n\r\nbody\r\n") .. ".\r\n")
  c, e, t = p:reply()
  p:cmd("QUIT")
  p:reply()
  p:close()
  return c, e, t
end

-- ehlo_sessions(port, n) -> { peer, ... }: n sessions, each greeted and
-- past EHLO c<i>
function H.ehlo_sessions(port, n)
  local ps = {}
  for i = 1, n do
    ps[i] = H.connect(port)
    ps[i]:expect(220)
    ps[i]:cmd("EHLO c" .. i) ps[i]:expect(250)
  end
  return ps
end

-- parked(mta) -> how many of mta's sessions are parked: their task, the
-- stream's reader, holds no coroutine (docs/accept.md#idle-sessions)
function H.parked(mta)
  local n = 0
  for _, l in ipairs(mta.listeners) do
    for sess in pairs(l.sessions) do
      local r = sess.stream.reader
      if r and sched.is_parked(r) then n = n + 1 end
    end
  end
  return n
end

-- Stop an MTA and wait (bounded) until it has stopped and its sessions
-- have closed. A stop that does not end is an error of the spec (it hid a
-- spool whose syncs had stopped for good behind "left handles open").
function H.stop_mta(mta)
  local done = false
  mta:stop(0, function() done = true end)
  for _ = 1, 1000 do
    if done and mta:sessions() == 0 then break end
    sched.sleep(0.01)
  end
  if not done then error("the MTA did not stop within 10 s", 2) end
  sched.sleep(0.01)
end

-- listen(on_client) -> server, port: a TCP listener on 127.0.0.1 (a free
-- port) that hands each accepted luv TCP handle to on_client(c). In a loop.
function H.listen(on_client)
  local server = uv.new_tcp()
  assert(server:bind("127.0.0.1", 0))
  assert(server:listen(16, function()
    local c = uv.new_tcp()
    server:accept(c)
    on_client(c)
  end))
  return server, server:getsockname().port
end

-- ---- the scripted peer --------------------------------------------------------------

local Peer = {}
Peer.__index = Peer

-- connect(port, [host], [timeout], [bind]): bind is a local address to
-- connect from (127.0.0.2 is loopback too, but not 127.0.0.1/32).
function H.connect(port, host, timeout, bind)
  local s, err = stream.connect(host or "127.0.0.1", port, timeout or 10, bind)
  if not s then return nil, err end
  local rp = smtp.reply_parser()
  s:attach(rp)
  return setmetatable({ s = s, rp = rp, timeout = timeout or 10 }, Peer)
end

function Peer:send(data)
  local ok, err = self.s:send(data, self.timeout)
  assert(ok, "peer send failed: " .. tostring(err))
  return self
end

function Peer:cmd(line)
  return self:send(line .. "\r\n")
end

-- reply() -> code, enhanced, text | nil, err
function Peer:reply(timeout)
  while true do
    local code, enh, text = self.rp:next()
    if code then return code, enh or nil, text end
    if enh then return nil, enh end
    local ok, err = self.s:wait_input(timeout or self.timeout)
    if not ok then return nil, err end
  end
end

-- expect(code, [enhanced], [text]) asserts the next reply; text is a plain
-- substring. Returns the reply text.
function Peer:expect(code, enhanced, text)
  local c, e, t = self:reply()
  if c ~= code or (enhanced and e ~= enhanced) or (text and not (t or ""):find(text, 1, true)) then
    error(string.format("expected %s %s %s, got %s %s %s", tostring(code), tostring(enhanced or ""),
      tostring(text or ""), tostring(c), tostring(e), tostring(t)), 2)
  end
  return t
end

-- closed([timeout]) -> true when the server closes the connection
function Peer:closed(timeout)
  local deadline = uv.now() + (timeout or self.timeout) * 1000
  while true do
    local left = (deadline - uv.now()) / 1000
    if left <= 0 then return false end
    local ok, err = self.s:wait_input(left)
    if not ok then return err ~= "timeout" end
  end
end

-- script([[
--   S: 220
--   C: EHLO x
--   S: 250
--   C: MAIL FROM:<a@b>
--   S: 250 2.1.0
-- ]]) sends the C: lines with CRLF and checks each S: reply (code, then an
-- optional enhanced code, then an optional text substring).
function Peer:script(text)
  local n = 0
  for line in text:gmatch("[^\n]+") do
    line = line:gsub("^%s+", "")
    if line ~= "" then
      n = n + 1
      local who, rest = line:match("^([CS]):%s?(.*)$")
      assert(who, "bad transcript line: " .. line)
      if who == "C" then
        self:cmd(rest)
      else
        local code, enh, sub = rest:match("^(%d%d%d)%s*([245]%.%d+%.%d+)%s*(.*)$")
        if not code then
          code, sub = rest:match("^(%d%d%d)%s*(.*)$")
        end
        local c, e, t = self:reply()
        if c ~= tonumber(code) or (enh and e ~= enh) or (sub ~= "" and not (t or ""):find(sub, 1, true)) then
          error(string.format("transcript line %d: expected %q, got %s %s %s", n, rest,
            tostring(c), tostring(e), tostring(t)), 2)
        end
      end
    end
  end
  return self
end

-- starttls([name], [ctx]) -> info | nil, err: the TLS handshake as a
-- client (after the server's 220 to STARTTLS, or at once for implicit TLS).
function Peer:starttls(name, ctx)
  if not ctx then
    ctx = assert(require("moonpost.core.tls").context({ server = false }))
  end
  local c = assert(ctx:new(name))
  return self.s:starttls(c, self.timeout)
end

function Peer:close()
  self.s:close()
  self.rp:close()
end

-- ---- real programs ----------------------------------------------------------------------

local function environ(extra)
  local env = {}
  for k, v in pairs(uv.os_environ()) do
    if not (extra and extra[k] ~= nil) then env[#env + 1] = k .. "=" .. v end
  end
  for k, v in pairs(extra or {}) do
    if v then env[#env + 1] = k .. "=" .. v end
  end
  return env
end

-- exec(cmd, args, opts) -> exit code, stdout, stderr. opts: timeout (s),
-- env (extra variables), stdin (string), cwd. The process is killed at the
-- timeout and the code is then nil.
function H.exec(cmd, args, opts)
  opts = opts or {}
  local out, err = {}, {}
  local stdout, stderr = uv.new_pipe(false), uv.new_pipe(false)
  local stdin = uv.new_pipe(false)
  local task = sched.current()
  local pending = 3
  local code, signal
  local function part_done()
    pending = pending - 1
    if pending == 0 then sched.wake(task, true) end
  end
  local handle, pid
  handle, pid = uv.spawn(cmd, {
    args = args,
    stdio = { stdin, stdout, stderr },
    env = environ(opts.env),
    cwd = opts.cwd,
  }, function(c, s)
    code, signal = c, s
    handle:close()
    part_done()
  end)
  if not handle then
    stdout:close()
    stderr:close()
    stdin:close()
    error("cannot run " .. cmd .. ": " .. tostring(pid))
  end
  local function reader(pipe, buf)
    pipe:read_start(function(e, chunk)
      if chunk then
        buf[#buf + 1] = chunk
      else
        pipe:read_stop()
        pipe:close()
        part_done()
      end
      if e then return end
    end)
  end
  reader(stdout, out)
  reader(stderr, err)
  if opts.stdin then stdin:write(opts.stdin) end
  stdin:shutdown(function() stdin:close() end)
  local timer = uv.new_timer()
  local killed = false
  timer:start(math.floor((opts.timeout or 120) * 1000), 0, function()
    killed = true
    uv.kill(pid, "sigkill")
  end)
  while pending > 0 do sched.wait() end
  timer:close()
  if killed then code = nil end
  return code, table.concat(out), table.concat(err), signal
end

-- Does a program exist on PATH (or as an absolute path)?
function H.have(cmd)
  if cmd:sub(1, 1) == "/" then return uv.fs_stat(cmd) ~= nil end
  return os.execute("command -v " .. cmd .. " >/dev/null 2>&1") == 0
end

-- A free TCP port on 127.0.0.1 (for processes that need a port up front).
function H.free_port()
  local t = uv.new_tcp()
  assert(t:bind("127.0.0.1", 0))
  local port = t:getsockname().port
  t:close()
  uv.run("nowait")
  return port
end

-- inject(opts) runs opts.sessions tasks that send messages to opts.port
-- until opts.total got a 250, reconnecting whenever the server goes away.
-- Each message has a unique token (its sender's local part and Subject);
-- opts.rcpt(seq, token) picks the recipient. Returns a state table:
-- { acked = { token = rcpt }, nacked, sent, running } (running reaches 0).
function H.inject(opts)
  local st = { acked = {}, nacked = 0, sent = 0, running = opts.sessions, seq = 0 }
  local body = opts.body or string.rep("crash test body line\r\n", 20)
  local function session(n, p)
    local ok = p:reply() == 220
    p:cmd("EHLO crash.test")
    ok = ok and p:reply() == 250
    while ok and st.nacked < opts.total do
      st.seq = st.seq + 1
      local tok = string.format("t%d-%d", n, st.seq)
      local rcpt = opts.rcpt(st.seq, tok)
      p:cmd("MAIL FROM:<" .. tok .. "@crash.test>")
      ok = p:reply() == 250
      if ok then p:cmd("RCPT TO:<" .. rcpt .. ">") ok = p:reply() == 250 end
      if ok then p:cmd("DATA") ok = p:reply() == 354 end
      if ok then
        st.sent = st.sent + 1
        p:send("Subject: " .. tok .. "\r\n\r\n" .. body .. ".\r\n")
        ok = p:reply() == 250
        if ok then
          st.acked[tok] = rcpt
          st.nacked = st.nacked + 1
        end
      end
    end
  end
  for n = 1, opts.sessions do
    sched.spawn(function()
      while st.nacked < opts.total do
        local p = H.connect(opts.port, "127.0.0.1", 5)
        if not p then
          sched.sleep(0.05)
        else
          -- a kill can cut the connection anywhere: that ends the session only
          pcall(session, n, p)
          p:close()
        end
      end
      st.running = st.running - 1
    end)
  end
  return st
end

-- sink(args) starts spec/tools/sink.py (a programmable SMTP peer on
-- aiosmtpd) and returns { port, events(), messages(), stop() }. args are
-- extra command-line flags ("--no-pipelining", "--size", "1000", "--dsn").
function H.sink(args)
  local dir = H.tmpdir("moonpost-sink")
  local events = dir .. "/events.json"
  local argv = { H.root .. "/spec/tools/sink.py", "--events", events }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local stdin, stdout, stderr = uv.new_pipe(false), uv.new_pipe(false), uv.new_pipe(false)
  local out, exited = {}, false
  local handle, pid
  handle, pid = uv.spawn(H.python, { args = argv, stdio = { stdin, stdout, stderr } }, function()
    exited = true
    handle:close()
  end)
  assert(handle, "cannot start the sink: " .. tostring(pid))
  stdout:read_start(function(_, chunk) if chunk then out[#out + 1] = chunk else stdout:close() end end)
  stderr:read_start(function(_, chunk) if chunk then out[#out + 1] = chunk else stderr:close() end end)
  local port
  H.wait_for(function()
    port = tonumber(table.concat(out):match("port (%d+)"))
    return port ~= nil or exited
  end, 30)
  assert(port, "the sink did not start: " .. table.concat(out))
  local cjson = require "cjson"
  local sink = { port = port, pid = pid, dir = dir }
  function sink.events(kind)
    local list = {}
    local f = io.open(events, "r")
    if not f then return list end
    for line in f:lines() do
      local ok, ev = pcall(cjson.decode, line)
      if ok and (not kind or ev.ev == kind) then list[#list + 1] = ev end
    end
    f:close()
    return list
  end
  -- messages the sink accepted (250 at the end of data)
  function sink.messages()
    local list = {}
    for _, ev in ipairs(sink.events("message")) do
      if ev.outcome == "accepted" then list[#list + 1] = ev end
    end
    return list
  end
  function sink.stop()
    if not stdin:is_closing() then stdin:close() end
    H.wait_for(function() return exited end, 10)
    if not exited then uv.kill(pid, "sigkill") end
    H.wait_for(function() return exited end, 5)
    H.rm_rf(dir)
  end
  return sink
end

-- with_sink([args,] fn [, timeout]) runs fn(sink) in H.run with a fresh
-- sink (H.sink(args)), which is stopped however fn ends.
function H.with_sink(args, fn, timeout)
  if type(args) == "function" then args, fn, timeout = nil, args, fn end
  H.run(function()
    local sink = H.sink(args)
    local ok, err = pcall(fn, sink)
    sink.stop()
    if not ok then error(err, 0) end
  end, timeout)
end

-- dkim_verify(data, dns_port) -> a boolean per DKIM-Signature of the message
-- (topmost first), as Debian's python3-dkim says, with the key records from
-- the DNS server on 127.0.0.1:dns_port (H.dns_server). DKIM_DEBUG=1 prints
-- the message and python3-dkim's complaints.
local DKIM_VERIFY = [==[
import sys, json, dkim, dns.resolver, dns.message, dns.query
port = int(sys.argv[1])
def dnsfunc(name, timeout=5):
    if isinstance(name, bytes):
        name = name.decode()
    q = dns.message.make_query(name, "TXT")
    r = dns.query.udp(q, "127.0.0.1", port=port, timeout=timeout)
    for rrset in r.answer:
        for rd in rrset:
            return b"".join(rd.strings)
    return None
msg = sys.stdin.buffer.read()
d = dkim.DKIM(msg)
n = sum(1 for h in d.headers if h[0].lower() == b"dkim-signature")
out = []
for i in range(n):
    try:
        out.append(bool(dkim.DKIM(msg).verify(idx=i, dnsfunc=dnsfunc)))
    except dkim.DKIMException as e:
        print(i, e, file=sys.stderr)
        out.append(False)
print(json.dumps(out))
]==]

function H.dkim_verify(data, dns_port)
  local code, out, err = H.exec(H.python, { "-c", DKIM_VERIFY, tostring(dns_port) }, { stdin = data, timeout = 30 })
  assert(code == 0, "python3-dkim: " .. out .. err)
  if os.getenv("DKIM_DEBUG") then io.stderr:write(data, "\n--\n", err, "\n") end
  return require("cjson").decode(out)
end

-- parse_dsn(text) -> what Python's email package reads in a delivery status
-- notification: { type, report_type, parts (content types, top first),
-- text (the first text/plain part), per_message, recipients (the fields of
-- each per-recipient block) }.
function H.parse_dsn(data)
  local script = [==[
import email, json, sys
from email import policy
raw = sys.stdin.buffer.read()
msg = email.message_from_bytes(raw, policy=policy.compat32)
out = {"type": msg.get_content_type(), "report_type": msg.get_param("report-type"),
       "parts": [msg.get_content_type()] + [p.get_content_type() for p in msg.get_payload()]}
for part in msg.walk():
    if part.get_content_type() == "text/plain" and "text" not in out:
        out["text"] = part.get_payload(decode=True).decode(part.get_content_charset() or "ascii")
    if part.get_content_type() == "message/delivery-status":
        blocks = part.get_payload()
        out["per_message"] = dict(blocks[0].items())
        out["recipients"] = [dict(b.items()) for b in blocks[1:]]
    if part.get_content_type() == "message/global-delivery-status":
        # (RFC 6533: Python's parser takes it for a message, so the part's
        # own octets are read here, as UTF-8, split into blocks)
        for raw_part in raw.split(b"--" + msg.get_boundary().encode()):
            head, _, body = raw_part.partition(b"\r\n\r\n")
            if b"Content-Type: message/global-delivery-status" in head:
                blocks = [email.message_from_string(b + "\n\n", policy=policy.compat32)
                          for b in body.decode("utf-8").replace("\r\n", "\n").strip("\n").split("\n\n")]
                out["per_message"] = dict(blocks[0].items())
                out["recipients"] = [dict(b.items()) for b in blocks[1:]]
print(json.dumps(out))
]==]
  local code, out, err = H.exec(H.python, { "-c", script }, { stdin = data })
  assert(code == 0, err)
  return require("cjson").decode(out)
end

-- arrivals(sink [, pattern]) -> the messages the sink accepted whose first
-- recipient matches pattern (all without one), oldest first, each
-- { t, peer, helo, rcpt, rcpts, data, conn }: peer is the address the
-- connection came from and helo the name in its EHLO.
function H.arrivals(sink, pattern)
  local peer, helo = {}, {}
  for _, ev in ipairs(sink.events("connect")) do peer[ev.conn] = ev.peer end
  for _, ev in ipairs(sink.events("ehlo")) do helo[ev.conn] = ev.name end
  local out = {}
  for _, m in ipairs(sink.messages()) do
    if not pattern or m.rcpts[1]:match(pattern) then
      out[#out + 1] = { t = m.t, peer = peer[m.conn], helo = helo[m.conn], rcpt = m.rcpts[1], rcpts = m.rcpts,
        data = m.data, conn = m.conn }
    end
  end
  table.sort(out, function(a, b) return a.t < b.t end)
  return out
end

-- dns_server() starts nsd on 127.0.0.1:<free port> serving
-- spec/fixtures/dns/*.zone and returns { port, address = "127.0.0.1:<port>", stop() }.
-- dns_server([extra]) serves the zones of spec/fixtures/dns, and the zones
-- in extra ({ [origin] = zone text }), with nsd on loopback.
function H.dns_server(extra)
  local dir = H.tmpdir("moonpost-nsd")
  local port = H.free_port()
  local zones = {}
  for name, text in pairs(extra or {}) do
    H.write(dir .. "/" .. name .. ".zone", text)
    zones[#zones + 1] = string.format('zone:\n  name: "%s"\n  zonefile: "%s/%s.zone"\n', name, dir, name)
  end
  for _, f in ipairs(H.ls(H.root .. "/spec/fixtures/dns")) do
    local name = f:match("^(.+)%.zone$")
    if name then
      H.write(dir .. "/" .. f, H.read(H.root .. "/spec/fixtures/dns/" .. f))
      zones[#zones + 1] = string.format('zone:\n  name: "%s"\n  zonefile: "%s/%s"\n', name, dir, f)
    end
  end
  H.write(dir .. "/nsd.conf", string.format([[
server:
  ip-address: 127.0.0.1@%d
  port: %d
  username: ""
  chroot: ""
  zonesdir: "%s"
  pidfile: "%s/nsd.pid"
  database: ""
  xfrdfile: "%s/xfrd.state"
  zonelistfile: "%s/zone.list"
  logfile: "%s/nsd.log"
  server-count: 1
  verbosity: 1
  do-ip6: no
remote-control:
  control-enable: no
%s]], port, port, dir, dir, dir, dir, dir, table.concat(zones)))
  local exited = false
  local handle, pid
  -- its own process group: nsd forks server and xfrd processes, stopped together
  handle, pid = uv.spawn("/usr/sbin/nsd", { args = { "-d", "-c", dir .. "/nsd.conf" }, detached = true }, function()
    exited = true
    handle:close()
  end)
  assert(handle, "cannot start nsd: " .. tostring(pid))
  persistent[handle] = true
  -- ready when it answers over TCP on the port
  local up = H.wait_for(function()
    if exited then return true end
    local s = stream.connect("127.0.0.1", port, 1)
    if s then s:close() return true end
  end, 20)
  assert(up and not exited, "nsd did not start: " .. (uv.fs_stat(dir .. "/nsd.log") and H.read(dir .. "/nsd.log") or ""))
  local srv = { port = port, address = "127.0.0.1:" .. port }
  local function group_alive()
    return os.execute("kill -0 -- -" .. pid .. " 2>/dev/null") == 0
  end
  function srv.stop()
    uv.kill(-pid, "sigterm")
    H.wait_for(function() return exited and not group_alive() end, 10)
    if group_alive() then
      uv.kill(-pid, "sigkill")
      H.wait_for(function() return not group_alive() end, 5)
    end
    H.rm_rf(dir)
  end
  return srv
end

-- hostile_dns(script) starts spec/tools/hostile_dns.py on 127.0.0.1:<free
-- port>, answering by script ({ ["<name> <TYPE>"] = rule }, see the tool),
-- and returns { port, address, queries() (each { name, type, proto }), stop() }.
function H.hostile_dns(script)
  local cjson = require "cjson"
  local dir = H.tmpdir("moonpost-hdns")
  H.write(dir .. "/script.json", cjson.encode(script))
  local events = dir .. "/events.json"
  local stdin, stdout = uv.new_pipe(false), uv.new_pipe(false)
  local out, exited = {}, false
  local handle, pid
  handle, pid = uv.spawn(H.python, { args = { H.root .. "/spec/tools/hostile_dns.py", "--script",
    dir .. "/script.json", "--events", events }, stdio = { stdin, stdout, 2 } }, function()
    exited = true
    handle:close()
  end)
  assert(handle, "cannot start hostile_dns.py: " .. tostring(pid))
  stdout:read_start(function(_, chunk) if chunk then out[#out + 1] = chunk else stdout:close() end end)
  local port
  H.wait_for(function()
    port = tonumber(table.concat(out):match("port (%d+)"))
    return port ~= nil or exited
  end, 30)
  assert(port, "hostile_dns.py did not start: " .. table.concat(out))
  local srv = { port = port, address = "127.0.0.1:" .. port }
  function srv.queries()
    local list = {}
    local f = io.open(events, "r")
    if not f then return list end
    for line in f:lines() do list[#list + 1] = cjson.decode(line) end
    f:close()
    return list
  end
  function srv.stop()
    if not stdin:is_closing() then stdin:close() end
    H.wait_for(function() return exited end, 10)
    if not exited then uv.kill(pid, "sigkill") H.wait_for(function() return exited end, 5) end
    if not stdout:is_closing() then stdout:close() end
    H.rm_rf(dir)
  end
  return srv
end

-- Every process H.launch started, for H.run_killing.
local launched = {}

-- run_killing(fn [, timeout]): H.run(fn), and every process fn started with
-- H.launch is killed (SIGKILL, by its PID) when fn ends, however it ends,
-- so that a test failing half-way leaves nothing running.
function H.run_killing(fn, timeout)
  H.run(function()
    local mark = #launched
    local ok, err = pcall(fn)
    for i = #launched, mark + 1, -1 do
      launched[i].kill()
      launched[i] = nil
    end
    if not ok then error(err, 0) end
  end, timeout)
end

-- Launch scripts/moonpost with a policy as a child process and wait until it
-- listens. Returns a handle: { port, pid, stop(), log() }.
function H.launch(policy, env, opts)
  opts = opts or {}
  local port = opts.port or H.free_port()
  -- the HTTP listener on a port of its own (the examples default to 8025)
  local e = { MOONPOST_LISTEN = "127.0.0.1:" .. port, MOONPOST_HTTP = "127.0.0.1:0" }
  for k, v in pairs(env or {}) do e[k] = v end
  local logbuf = {}
  local stderr = uv.new_pipe(false)
  local stdout = uv.new_pipe(false)
  local exited, exit_code = false, nil
  local proc = { port = port, logbuf = logbuf }
  local handle, pid
  handle, pid = uv.spawn(H.root .. "/scripts/moonpost", {
    args = { opts.command or "run", policy },
    stdio = { nil, stdout, stderr },
    env = environ(e),
    cwd = opts.cwd,
    -- opts.detached: a session and process group of its own (pgid = pid),
    -- which a spec can signal as a terminal's Ctrl-C does
    detached = opts.detached or nil,
  }, function(c)
    exited, exit_code = true, c
    handle:close()
    if proc.waiter then sched.wake(proc.waiter, true) end
  end)
  assert(handle, "cannot launch moonpost: " .. tostring(pid))
  proc.pid = pid
  launched[#launched + 1] = proc
  for _, p in ipairs({ stdout, stderr }) do
    p:read_start(function(_, chunk)
      if chunk then logbuf[#logbuf + 1] = chunk else p:close() end
    end)
  end
  function proc.log() return table.concat(logbuf) end
  -- kill(): SIGKILL, wait for the exit
  function proc.kill()
    if not exited then
      uv.kill(pid, "sigkill")
      while not exited do sched.sleep(0.01) end
    end
  end
  function proc.exited() return exited, exit_code end
  -- wait until the port answers
  local deadline = uv.now() + 15000
  while uv.now() < deadline and not exited do
    local s = stream.connect("127.0.0.1", port, 1)
    if s then
      s:close()
      break
    end
    sched.sleep(0.05)
  end
  function proc.stop(sig)
    if not exited then
      uv.kill(pid, sig or "sigterm")
      proc.waiter = sched.current()
      local deadline2 = uv.now() + 15000
      while not exited and uv.now() < deadline2 do sched.wait(1) end
      proc.waiter = nil
      if not exited then
        uv.kill(pid, "sigkill")
        while not exited do sched.sleep(0.05) end
      end
    end
    sched.sleep(0.02)
    return exit_code
  end
  return proc
end

return H
