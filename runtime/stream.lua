-- Cosocket-style streams over luv TCP handles, for code running in a task.
--
--   local s = stream.new(tcp)
--   s:attach(parser [, high_water])  feed received bytes straight into a C parser
--   s:wait_input(timeout)            wait for the next chunk: true | nil, "closed" | "timeout" | err
--   s:park_input(timeout, cont)      the same, the task parked (sched.park) meanwhile
--   s:receive("*l" | n, timeout [, max])
--                                    line (without CRLF; nil, "too long" past max
--                                    bytes) or n bytes, when no parser is attached
--   s:send(data, timeout)            true | nil, err
--   s:send_stuffed(body, timeout [, trailer])
--                                    a message's DATA (dot-stuffed, ended), then
--                                    trailer in the same write: true | nil, err
--   s:close()                        idempotent, returns true
--   s:starttls(conn, timeout)        run a TLS handshake on the connection
--                                    (a moonpost.core.tls conn) and carry on in TLS:
--                                    info | nil, err
--   s:try_send(data)                 best-effort write that never waits
--   s:interrupt()                    wake the task in wait_input() (which returns true)
--
-- Every wait has a timeout and returns nil, "timeout" when it passes.
-- Reading runs continuously; it pauses when the parser (or, without one,
-- the buffer nobody is reading) holds more than high_water unconsumed bytes
-- and resumes when the task waits again.
local uv = require "luv"
local sched = require "moonpost.runtime.sched"
local smtp = require "moonpost.core.smtp"

local try_write, wait, wake, current, park = uv.try_write, sched.wait, sched.wake, sched.current, sched.park
local c_read_start, c_read_stop = smtp.read_start, smtp.read_stop
local reserve, wake_token = sched.reserve, sched.wake_token
local sub, find, concat = string.sub, string.find, table.concat

local _M = { _VERSION = "0.1" }

-- A write to a socket whose peer has gone (a TLS close_notify after the
-- client hung up, a reply to a reset connection) raises SIGPIPE, and its
-- default action ends the process. libuv does not ignore it on Linux, so we
-- do: the write then fails with EPIPE and costs that connection only.
do
  local ok, ffi = pcall(require, "ffi")
  if ok then
    pcall(ffi.cdef, "typedef void (*moonpost_sighandler_t)(int); "
      .. "moonpost_sighandler_t signal(int signum, moonpost_sighandler_t handler);")
    local SIGPIPE, SIG_IGN = 13, ffi.cast("moonpost_sighandler_t", 1)
    pcall(function() ffi.C.signal(SIGPIPE, SIG_IGN) end)
  end
end

local Stream = {}
local mt = { __index = Stream }

local DEFAULT_HIGH_WATER = 1024 * 1024

-- Received ciphertext: during the handshake it is kept for the handshake
-- loop; after it, the plaintext replaces the chunk (nil when there is none).
local function tls_input(self, chunk)
  if self.handshaking then
    local b = self.hs_in
    b[#b + 1] = chunk
    return nil
  end
  local pt, out, closed = self.tls:decrypt(chunk)
  if not pt then
    self.err = "TLS: " .. tostring(out)
    self.eof = true
    pcall(self.tcp.read_stop, self.tcp)
    return nil
  end
  if out then self.tcp:write(out) end -- e.g. a KeyUpdate answer; the queue keeps order
  if closed then
    self.eof = true
    self.peer_close_notify = true
  end
  if pt == "" then return nil end
  return pt
end

-- Plaintext for the reader: into the parser, or the buffer.
local function deliver(self, chunk)
  local p = self.parser
  if p then
    local n = p:push(chunk)
    if not n then
      -- Out of memory: the input can no longer be framed.
      self.err = "ENOMEM"
      self.eof = true
      pcall(self.tcp.read_stop, self.tcp)
    elseif n > self.high_water and not self.paused then
      self.paused = true
      self.tcp:read_stop()
    end
  else
    local b = self.rbuf
    if not b then b = {}; self.rbuf = b end
    b[#b + 1] = chunk
    local len = (self.rlen or 0) + #chunk
    self.rlen = len
    -- nobody is reading: stop taking more than high_water from the peer
    if len > self.high_water and not self.paused and not self.reader then
      self.paused = true
      self.tcp:read_stop()
    end
  end
end

local function make_on_read(self)
  return function(err, chunk)
    if err then
      self.err = err
      self.eof = true
    elseif chunk then
      self.bytes_in = self.bytes_in + #chunk
      if self.tls then chunk = tls_input(self, chunk) end
      if chunk then deliver(self, chunk) end
    else
      self.eof = true
    end
    local r = self.reader
    if r then
      self.reader = nil
      wake(r, true)
    end
  end
end

-- The callback of the reading done in C (smtp.read_start): the octets are
-- in the parser already; n of them came, and the parser holds buffered
-- (nil: it ran out of memory). err on a read error; nothing at the end.
local function make_on_cread(self)
  return function(err, n, buffered)
    if err then
      self.err = err
      self.eof = true
    elseif n then
      self.bytes_in = self.bytes_in + n
      if not buffered then
        self.err = "ENOMEM"
        self.eof = true
        c_read_stop(self.tcp)
      elseif buffered > self.high_water and not self.paused then
        self.paused = true
        c_read_stop(self.tcp)
      end
    else
      self.eof = true
    end
    local r = self.reader
    if r then
      self.reader = nil
      wake(r, true)
    end
  end
end

function _M.new(tcp)
  return setmetatable({ tcp = tcp, bytes_in = 0, bytes_out = 0 }, mt)
end
Stream.high_water = DEFAULT_HIGH_WATER

-- self.reading: false, true (luv reads) or "c" (read in C). (No field of
-- its own for the C reading, and its callback in on_read: 500,000 idle
-- sessions hold a stream each.)
local function stop_reading(self)
  local r = self.reading
  if r == "c" then
    c_read_stop(self.tcp)
  elseif r then
    pcall(self.tcp.read_stop, self.tcp)
  end
  self.reading, self.paused = false, false
  self.on_read = nil
end

function Stream:attach(parser, high_water)
  -- (reading in C feeds the parser it was started with)
  if self.reading == "c" and parser ~= self.parser then stop_reading(self) end
  self.parser = parser
  if high_water then self.high_water = high_water end
end

-- Plaintext into a parser is read in C (make_on_cread), without a Lua
-- string per chunk; TLS, and a stream without a parser, through luv.
local function start_creading(self)
  local cb = self.on_read or make_on_cread(self)
  self.on_read = cb
  local fd = self.tcp:fileno()
  return fd and c_read_start(self.tcp, fd, self.parser, cb)
end

local function start_reading(self)
  local r = self.reading
  if not r then
    if self.parser and not self.tls and start_creading(self) then
      self.reading = "c"
      return
    end
    self.reading = true
    self.on_read = make_on_read(self)
    local ok, err = self.tcp:read_start(self.on_read)
    if not ok then
      self.err = err
      self.eof = true
    end
  elseif self.paused then
    self.paused = false
    if r == "c" then
      if not start_creading(self) then
        self.err = "cannot read"
        self.eof = true
      end
    else
      self.tcp:read_start(self.on_read)
    end
  end
end

-- The running task becomes the stream's reader, reading started: true, or
-- nil, err when the stream has ended (then nothing is to be waited for).
local function become_reader(self)
  if self.closed then return nil, "closed" end
  if self.eof then return nil, self.err or "closed" end
  start_reading(self)
  if self.eof then return nil, self.err or "closed" end
  self.reader = current()
  return true
end

function Stream:wait_input(timeout)
  local ready, rerr = become_reader(self)
  if not ready then return nil, rerr end
  local ok, err = wait(timeout)
  self.reader = nil
  if ok then return true end
  if self.closed or self.eof then return nil, self.err or "closed" end
  return nil, err
end

-- park_input(timeout, cont) -> sched.PARKED: wait_input() for a task that
-- parks while it waits (sched.park, whose rules apply). When input comes,
-- the stream closes or the timeout passes, cont(ok, err) runs as the
-- task's body, and must call unparked() before it waits on the stream
-- again. Returns nil, err at once, not parked, if the stream has ended.
function Stream:park_input(timeout, cont)
  local ready, err = become_reader(self)
  if not ready then return nil, err end
  return park(cont, timeout)
end

-- unparked(): a parked reader (park_input) has been woken
function Stream:unparked()
  self.reader = nil
end

-- receive("*l" [, timeout [, max]]) -> line without CRLF; receive(n [, timeout])
-- -> exactly n bytes. For streams without a parser (HTTP, tests, simple
-- protocol clients). A line longer than max bytes (CRLF not counted) gives
-- nil, "too long" and leaves the stream unusable for lines. On failure the
-- third value is what had arrived.
function Stream:receive(pattern, timeout, max)
  local deadline = timeout and (uv.now() + timeout * 1000)
  local scanned = 0 -- chunks already searched for the end of the line
  if pattern ~= "*l" and type(pattern) ~= "number" then error("receive: pattern must be '*l' or a number", 2) end
  while true do
    local b = self.rbuf
    if b then
      if pattern == "*l" then
        for i = scanned + 1, #b do
          local nl = find(b[i], "\n", 1, true)
          if nl then
            local before = i > 1 and concat(b, "", 1, i - 1) or ""
            local chunk = b[i]
            local line = before .. sub(chunk, 1, nl - 1)
            local rest = { sub(chunk, nl + 1) }
            for k = i + 1, #b do rest[#rest + 1] = b[k] end
            self.rbuf, self.rlen = rest, self.rlen - #line - 1
            if sub(line, -1) == "\r" then line = sub(line, 1, -2) end
            if max and #line > max then return nil, "too long", line end
            return line
          end
          scanned = i
        end
        -- no end of line yet: more than max (and a CR) cannot become a line
        if max and self.rlen > max + 1 then return nil, "too long", concat(b) end
      elseif self.rlen >= pattern then
        local data = concat(b)
        self.rbuf, self.rlen = { sub(data, pattern + 1) }, #data - pattern
        return sub(data, 1, pattern)
      end
    end
    local left = deadline and (deadline - uv.now()) / 1000
    if left and left <= 0 then return nil, "timeout", b and concat(b) or "" end
    local ok, err = self:wait_input(left)
    if not ok then return nil, err, self.rbuf and concat(self.rbuf) or "" end
  end
end

-- What try_write left (rest of data, whose length is len): queued, and the
-- task waits until it is written.
local function queue_send(self, rest, len, timeout)
  local task, token = reserve()
  local req_done = false
  local ok, werr = self.tcp:write(rest, function(e)
    req_done = true
    wake_token(task, token, not e and true or nil, e)
  end)
  if not ok then
    self.err = werr
    return nil, werr
  end
  local r, e = wait(timeout)
  if not r then
    if not req_done then
      -- The peer does not read: give up on the connection.
      self:close()
    end
    return nil, e or "closed"
  end
  self.bytes_out = self.bytes_out + len
  return true
end

-- (the slow path is a function of its own: the callback it makes would keep
-- LuaJIT from compiling this one, NYI bytecode UCLO)
local function raw_send(self, data, timeout)
  if self.closed then return nil, "closed" end
  local len = #data
  if len == 0 then return true end
  local n, err, name = try_write(self.tcp, data)
  if n == len then
    self.bytes_out = self.bytes_out + len
    return true
  end
  if not n then
    if name ~= "EAGAIN" then
      self.err = err
      return nil, err
    end
    n = 0
  end
  return queue_send(self, n > 0 and sub(data, n + 1) or data, len, timeout)
end

-- send_stuffed(body, timeout [, trailer]) -> true | nil, err: a message
-- (string or moonpost.core.smtp message) dot-stuffed and ended with ".",
-- then trailer (the next transaction's commands) in the same write. On
-- plain TCP it is written from C and only what the socket did not take
-- becomes a Lua string; over TLS it is encrypted as a whole.
function Stream:send_stuffed(body, timeout, trailer)
  if self.closed then return nil, "closed" end
  if not self.tls then
    local tcp = self.tcp
    -- the descriptor, asked of luv once (client streams only: a server
    -- session's table stays as small as it was)
    local fd = self.fd
    if not fd then
      fd = tcp:fileno() or -1
      self.fd = fd
    end
    local n, rest = smtp.send_stuffed(tcp, fd, body, trailer)
    if n then
      self.bytes_out = self.bytes_out + n
      if not rest then return true end
      return queue_send(self, rest, #rest, timeout)
    end
    if rest ~= "unsupported" then
      self.err = rest
      return nil, rest
    end
  end
  local data = smtp.dotstuff(body)
  if trailer then data = data .. trailer end
  return self:send(data, timeout)
end

function Stream:send(data, timeout)
  local t = self.tls
  if t and not self.handshaking then
    if self.closed then return nil, "closed" end
    local ct, err = t:encrypt(data)
    if not ct then
      self.err = "TLS: " .. tostring(err)
      return nil, self.err
    end
    data = ct
  end
  return raw_send(self, data, timeout)
end

-- A write that never waits, for last words (421 on shutdown): what the
-- socket does not take at once is dropped.
function Stream:try_send(data)
  if self.closed then return nil, "closed" end
  local t = self.tls
  if t then
    if self.handshaking then return nil, "handshaking" end
    data = t:encrypt(data)
    if not data then return nil, "TLS" end
  end
  local ok, n = pcall(try_write, self.tcp, data)
  return ok and n
end

-- starttls(conn, timeout) -> info | nil, err. conn is a connection from a
-- moonpost.core.tls context (server or client side). Plaintext received
-- before the handshake and not yet consumed is discarded: it was sent
-- before the peer could know the channel was protected (RFC 3207 6, the
-- command-injection class). The caller discards what its parser holds.
function Stream:starttls(conn, timeout)
  if self.tls then return nil, "TLS is already active" end
  if self.closed then return nil, "closed" end
  if self.eof then return nil, self.err or "closed" end
  self.rbuf, self.rlen = nil, 0
  -- the ciphertext must reach Lua: reading in C stops, luv's starts at
  -- the next wait
  if self.reading == "c" then stop_reading(self) end
  self.tls = conn
  self.handshaking = true
  self.hs_in = {}
  local deadline = uv.now() + (timeout or 60) * 1000
  local state, out, err = conn:handshake()
  if not state then out, err = err, out end
  while true do
    if out then
      local ok, serr = raw_send(self, out, math.max(0.001, (deadline - uv.now()) / 1000))
      if not ok then
        state, err = nil, "send: " .. tostring(serr)
      end
    end
    if state == "done" then break end
    if not state then
      self.handshaking = false
      self.tls_error = err
      return nil, err
    end
    local left = (deadline - uv.now()) / 1000
    if left <= 0 then
      self.handshaking = false
      return nil, "handshake timeout"
    end
    if #self.hs_in == 0 then
      local ok, werr = self:wait_input(left)
      if not ok then
        self.handshaking = false
        return nil, werr == "timeout" and "handshake timeout" or ("handshake: " .. tostring(werr))
      end
    end
    local chunk = concat(self.hs_in)
    self.hs_in = {}
    state, out, err = conn:handshake(chunk)
    if not state then out, err = err, out end -- nil, err, alert
  end
  self.handshaking = false
  self.hs_in = nil
  -- Records that came with the last flight (a client's first command).
  local pt, out2, closed = conn:decrypt()
  if not pt then return nil, out2 end
  if out2 then raw_send(self, out2, 10) end
  if closed then
    self.eof = true
    self.peer_close_notify = true
  end
  if pt ~= "" then deliver(self, pt) end
  return conn:info()
end

-- interrupt(): a task in wait_input() returns true at once, as if input
-- had come (it finds none, and can look at why it was woken).
function Stream:interrupt()
  local r = self.reader
  if r then
    self.reader = nil
    wake(r, true)
  end
end

function Stream:close()
  if self.closed then return true end
  local tcp = self.tcp
  -- close_notify (RFC 8446 6.1), best effort: also in answer to the peer's,
  -- but not after a TLS error or a transport error (reset)
  local live = not self.eof or (self.peer_close_notify and not self.err)
  if self.tls and not self.handshaking and live and not tcp:is_closing() then
    local alert = self.tls:close_notify()
    if alert then pcall(try_write, tcp, alert) end
  end
  self.closed = true
  stop_reading(self)
  if not tcp:is_closing() then tcp:close() end
  local r = self.reader
  if r then
    self.reader = nil
    wake(r, nil, "closed")
  end
  return true
end

function Stream:peername()
  local a = self.tcp:getpeername()
  if a then return a.ip, a.port, a.family end
end

function Stream:sockname()
  local a = self.tcp:getsockname()
  if a then return a.ip, a.port, a.family end
end

-- connect(host, port, timeout, bind) -> stream | nil, err. Host must be an
-- address; bind, when given, is the source address to connect from.
function _M.connect(host, port, timeout, bind)
  local tcp = uv.new_tcp()
  if bind then
    local ok, berr = pcall(tcp.bind, tcp, bind, 0)
    if not ok or not berr then
      tcp:close()
      return nil, "cannot bind " .. tostring(bind) .. ": " .. tostring(ok and berr or berr)
    end
  end
  local task, token = reserve()
  local ok, err = tcp:connect(host, port, function(e)
    wake_token(task, token, not e and true or nil, e)
  end)
  if not ok then
    tcp:close()
    return nil, err
  end
  local r, e = wait(timeout or 30)
  if not r then
    if not tcp:is_closing() then tcp:close() end
    return nil, e
  end
  tcp:nodelay(true)
  return _M.new(tcp)
end

return _M
