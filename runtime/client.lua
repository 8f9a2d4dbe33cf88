-- The SMTP client: sessions to a next hop, and pools of them per destination.
--
--   local pool = client.pool(opts)              -- one per destination
--   local results = pool:deliver(env, body, rcpts, hosts)
--
-- A delivery takes a connection from the pool (reusing an idle one, or
-- opening one while fewer than max_connections are open, or waiting for
-- one), runs one transaction and returns the connection to the pool, which
-- keeps it for the next message until max_messages or idle_timeout. The
-- transaction pipelines MAIL, every RCPT and DATA when the server offers
-- PIPELINING (RFC 2920), checks SIZE, 8BITMIME and SMTPUTF8 first, and
-- streams the dot-stuffed body. Results are per recipient:
--   { status = "delivered" | "deferred" | "bounced", code, enhanced, text, host }
-- A 4xx, a failed connection, a timeout or a protocol error defers; a 5xx
-- bounces. Timeouts default to RFC 5321 4.5.3.2.
local smtp = require "moonpost.core.smtp"
local sched = require "moonpost.runtime.sched"
local fifo = require "moonpost.runtime.fifo"
local stream = require "moonpost.runtime.stream"
local log = require "moonpost.runtime.log"
local tls = require "moonpost.runtime.tls"
local rdsn = require "moonpost.runtime.dsn"
local dns = require "moonpost.runtime.dns"

local format, concat, upper = string.format, table.concat, string.upper
local tnew = require "table.new"
local uv = require "luv"
local clock = require "moonpost.runtime.clock"
local mono_ms = clock.mono_ms

local _M = { _VERSION = "0.1" }

-- Process-wide counts for the metrics (read when they are scraped):
-- connections made, open now, and outbound TLS handshakes.
local stats = { connections = 0, open = 0, tls = 0, tls_failed = 0 }
_M.stats = stats

_M.TIMEOUTS = {
  connect = 30,
  greeting = 300, -- 4.5.3.2.1
  ehlo = 300,
  mail = 300,     -- 4.5.3.2.2
  rcpt = 300,     -- 4.5.3.2.3
  data = 120,     -- 4.5.3.2.4: DATA initiation
  block = 180,    -- 4.5.3.2.5: each data block
  done = 600,     -- 4.5.3.2.6: DATA termination
  quit = 10,
}

-- ---- one connection -------------------------------------------------------------

local Conn = {}
local conn_mt = { __index = Conn }
local has_waiter -- (Pool's, below)

-- A failure of our own (connection, timeout, protocol): no reply code, as
-- no server sent one; the DSN says "x-moonpost" rather than "smtp".
local function temp(text, host)
  return { status = "deferred", enhanced = "4.4.0", text = text, host = host }
end

-- Wait until the transaction before this one on the connection has read
-- the reply to its end of data (see Conn:send_data): true | nil, err.
local function await_turn(self, timeout)
  local me = sched.current()
  if self.owed == me then return true end
  self.next_reader = me
  -- the owner's own read is bounded by the DATA termination timeout
  sched.wait(timeout + self.timeouts.done)
  if self.next_reader == me then self.next_reader = nil end
  if self.owed then
    self.broken = "timeout waiting for the reply to the previous message"
    return nil, self.broken
  end
  return true
end

-- The reply to the end of data that this task was owed is read (or the
-- connection broke): the next transaction reads its own.
local function pass_turn(self)
  self.owed = nil
  local w = self.next_reader
  if w then
    self.next_reader = nil
    sched.wake(w, true)
  end
end

-- read one reply: code, enhanced, text | nil, err
function Conn:reply(timeout)
  if self.broken then return nil, self.broken end
  if self.owed then
    local ok, err = await_turn(self, timeout)
    if not ok then return nil, err end
    -- the transaction before broke the connection while this one waited
    if self.broken then return nil, self.broken end
  end
  local rp = self.rp
  local deadline
  while true do
    local code, enh, text = rp:next()
    if code then return code, enh or nil, text end
    if enh then
      self.broken = "protocol error: " .. tostring(enh)
      return nil, self.broken
    end
    -- the stage's timeout bounds the whole reply, not each chunk of it: a
    -- peer that drips a line at a time must not hold the connection (and
    -- the queue's worker) past it
    local left = timeout
    if deadline then
      left = (deadline - mono_ms()) / 1000
    else
      deadline = mono_ms() + timeout * 1000
    end
    local ok, err
    if left > 0 then
      ok, err = self.s:wait_input(left)
    else
      err = "timeout"
    end
    if not ok then
      self.broken = err == "timeout" and "timeout waiting for a reply" or ("connection lost: " .. tostring(err))
      return nil, self.broken
    end
  end
end

-- what a send returned: true, or the connection is broken
local function sent(self, ok, err)
  if ok then return true end
  self.broken = "connection lost while sending: " .. tostring(err)
  return nil, self.broken
end

-- send(data, timeout): a message held back by the transaction before
-- (pending) goes first, in the same write.
function Conn:send(data, timeout)
  local body = self.pending
  if body then
    self.pending = nil
    return sent(self, self.s:send_stuffed(body, math.max(self.pending_timeout, timeout or 0), data))
  end
  return sent(self, self.s:send(data, timeout or self.timeouts.block))
end

-- send_stuffed(body, timeout): the message itself, dot-stuffed and ended
function Conn:send_stuffed(body, timeout)
  return sent(self, self.s:send_stuffed(body, timeout))
end

function Conn:close()
  if not self.closed then stats.open = stats.open - 1 end
  if self.s then self.s:close() end
  if self.rp then self.rp:close() end
  self.closed = true
end

-- A best-effort QUIT, then close.
function Conn:quit()
  if not self.closed and not self.broken then
    if self:send("QUIT\r\n", self.timeouts.quit) then self:reply(self.timeouts.quit) end
  end
  self:close()
end

local function parse_ehlo(text)
  local ext = {}
  local first = true
  for line in (text .. "\n"):gmatch("([^\n]*)\n") do
    if first then
      first = false
    else
      local kw, rest = line:match("^(%S+)%s*(.*)$")
      if kw then ext[upper(kw)] = rest ~= "" and rest or true end
    end
  end
  return ext
end

-- EHLO, or HELO when EHLO is refused (RFC 5321 3.2): true | nil, err, code
local function greet(c, opts)
  local timeouts = c.timeouts
  c:send("EHLO " .. opts.helo .. "\r\n", timeouts.ehlo)
  local code, e, text = c:reply(timeouts.ehlo)
  if code == 250 then
    c.ext = parse_ehlo(text)
    c.esmtp = true
  elseif code and code >= 500 then
    c:send("HELO " .. opts.helo .. "\r\n", timeouts.ehlo)
    local hcode, herr, htext = c:reply(timeouts.ehlo)
    if hcode ~= 250 then
      c:quit()
      return nil, format("HELO: %s %s", tostring(hcode), tostring(htext or herr)), hcode
    end
    c.ext = {}
  else
    c:quit()
    return nil, code and format("EHLO: %d %s", code, tostring(text)) or ("EHLO: " .. tostring(e)), code
  end
  return true
end

-- Destinations whose TLS handshake failed under the opportunistic policy:
-- "[host]:port" -> loop time (ms) until which they get plaintext.
local tls_broken = {}
_M.tls_broken = tls_broken

local function handshake(c, policy, name)
  local ctx, err = tls.client_context(policy)
  local conn, info
  if ctx then conn, err = ctx:new(policy.name or name or c.host) end
  if conn then info, err = c.s:starttls(conn, policy.handshake_timeout) end
  if not info then
    stats.tls_failed = stats.tls_failed + 1
    return nil, err
  end
  stats.tls = stats.tls + 1
  c.tls_info = info
  log.info("%s: TLS %s %s%s", c.name, tostring(info.version), tostring(info.cipher),
    info.verified and " verified" or "")
  return info
end

-- connect(host, port, opts [, name [, plain_retry]]) -> conn | nil, err, code, enhanced.
-- plain_retry: the plaintext retry after a failed opportunistic handshake
-- (no STARTTLS whatever broken_ttl is).
-- name is the host's DNS name (an MX name), for SNI and verification;
-- opts.tls the outbound TLS policy (runtime/tls.lua), nil for none.
function _M.connect(host, port, opts, name, plain_retry)
  local timeouts = opts.timeouts
  local policy = opts.tls
  if policy and policy.policy == "none" then policy = nil end
  local s, err = stream.connect(host, port, timeouts.connect, opts.bind)
  if not s then return nil, format("cannot connect to [%s]:%d: %s", host, port, tostring(err)) end
  stats.connections = stats.connections + 1
  stats.open = stats.open + 1
  local rp = smtp.reply_parser()
  s:attach(rp)
  local c = setmetatable({ s = s, rp = rp, host = host, port = port, timeouts = timeouts, messages = 0,
    name = format("[%s]:%d", host, port) }, conn_mt)
  if policy and policy.implicit then
    -- RFC 8314: TLS from the first byte; no plaintext fallback
    local ok, herr = handshake(c, policy, name)
    if not ok then
      c:close()
      log.warn("%s: TLS handshake failed: %s", c.name, tostring(herr))
      return nil, format("TLS handshake with %s failed: %s", c.name, tostring(herr)), nil, "4.7.5"
    end
  end
  local code, _, text = c:reply(timeouts.greeting)
  if code ~= 220 then
    local why = code and format("greeting: %d %s", code, text) or ("greeting: " .. tostring(_))
    c.greeting_code = code
    c:quit()
    return nil, why, code
  end
  local ok, gerr, gcode = greet(c, opts)
  if not ok then return nil, gerr, gcode end
  if policy and not policy.implicit then
    local opportunistic = policy.policy == "opportunistic"
    local until_ms = tls_broken[c.name]
    if until_ms and until_ms <= uv.now() then
      tls_broken[c.name] = nil
      until_ms = nil
    end
    -- a destination whose handshake failed recently gets plaintext, as the
    -- retry did
    local skip = opportunistic and (until_ms or plain_retry)
    if skip then
      c.tls_skipped = true
    elseif c.ext.STARTTLS then
      c:send("STARTTLS\r\n", timeouts.ehlo)
      code, _, text = c:reply(timeouts.ehlo)
      if code == 220 then
        local info, herr
        if c.rp:buffered() > 0 then
          -- bytes after the 220 came before TLS, from the server or from
          -- someone on the path: read after the handshake they would pass
          -- for the protected server's replies (RFC 3207 6, the response
          -- injection). The connection is not used.
          herr = "data after the 220 to STARTTLS, before the handshake (a response injection?)"
          stats.tls_failed = stats.tls_failed + 1
        else
          info, herr = handshake(c, policy, name)
        end
        if info then
          -- and anything that reached the parser while the handshake ran
          c.rp:close()
          c.rp = smtp.reply_parser()
          c.s:attach(c.rp)
        end
        if not info then
          c:close()
          if opportunistic then
            -- RFC 3207 leaves it to the client: here a new connection in
            -- plaintext, and plaintext for this host for broken_ttl
            tls_broken[c.name] = uv.now() + policy.broken_ttl * 1000
            log.info("%s: TLS handshake failed (%s): retrying in plaintext; no TLS to it for %ds", c.name,
              tostring(herr), policy.broken_ttl)
            return _M.connect(host, port, opts, name, true)
          end
          log.warn("%s: TLS handshake failed (policy %s): %s", c.name, policy.policy, tostring(herr))
          return nil, format("TLS handshake with %s failed: %s", c.name, tostring(herr)), nil, "4.7.5"
        end
        -- RFC 3207 4.2: what the server said before TLS no longer counts
        c.ext = nil
        ok, gerr, gcode = greet(c, opts)
        if not ok then return nil, gerr, gcode end
      elseif not code then
        c:close()
        return nil, "STARTTLS: " .. tostring(_)
      elseif not opportunistic then
        c:quit()
        return nil, format("TLS is required, but %s answered STARTTLS with %d %s", c.name, code, tostring(text)),
          nil, "4.7.4"
      end
    elseif not opportunistic then
      c:quit()
      log.warn("%s: does not offer STARTTLS; TLS is required (policy %s)", c.name, policy.policy)
      return nil, format("TLS is required, but %s does not offer STARTTLS", c.name), nil, "4.7.4"
    end
  end
  c.pipelining = c.ext.PIPELINING ~= nil and opts.pipelining ~= false
  c.size_limit = tonumber(c.ext.SIZE) or 0
  return c
end

local has_8bit = smtp.has_8bit -- a string or a message

-- SMTPUTF8 is needed when an address of this transaction (the sender, the
-- recipients it carries: not those of the message's other domains) or the
-- header section is not ASCII (RFC 6531); a message received with SMTPUTF8
-- that is all ASCII is sent without it.
-- Returns needed, by_headers (the header section alone needs it).
local function needs_utf8(env, body, rcpts)
  local addr = has_8bit(env.from or "")
  if not addr then
    for _, r in ipairs(rcpts) do
      if has_8bit(r.address) then
        addr = true
        break
      end
    end
  end
  local head = false
  if env.utf8 then
    local headers = type(body) == "string" and (body:match("^(.-\r\n)\r\n") or body) or body:headers()
    head = has_8bit(headers)
  end
  return addr or head, head
end

-- An address whose only non-ASCII part is its domain, with the domain in
-- A-labels (xn--...): what a server without SMTPUTF8 takes (RFC 6531 3.2,
-- the domain is the same either way). nil when the local part is not ASCII.
local function ascii_address(a)
  local x = dns.address_to_ascii(a)
  if x and not has_8bit(x) then return x end
  return nil
end

-- downgrade(env, rcpts) -> from, { [i] = address } | nil: the transaction's
-- addresses for a server without SMTPUTF8, when that is possible
local function downgrade(env, rcpts)
  local from = ascii_address(env.from or "")
  if not from then return nil end
  local addrs = {}
  for i, r in ipairs(rcpts) do
    addrs[i] = ascii_address(r.address)
    if not addrs[i] then return nil end
  end
  return from, addrs
end

-- The remote reply as it was (for DSNs), and the stage it answered.
local function outcome(code, enh, text, host, stage)
  local status = (code >= 200 and code < 300) and "delivered" or (code >= 500 and "bounced" or "deferred")
  -- (made with room for the fields added later, here and by the route:
  -- relayed, tls, tls_cipher, source, helo, site; past the 8 slots of a
  -- six-field constructor each delivery's result was rehashed)
  local res = tnew(0, 12)
  res.status, res.code, res.enhanced, res.text, res.host, res.stage = status, code, enh, text, host, stage
  return res
end

-- transaction(env, body, rcpts) -> results by recipient index. The
-- connection stays usable when c.broken is nil.
-- every recipient gets the same result (a helper, not a closure made per
-- transaction: creating a closure stops LuaJIT from compiling the function)
local function all(results, rcpts, res)
  for _, r in ipairs(rcpts) do results[r.index] = res end
  return results
end

-- A DSN of ours (env.dsn) that this server cannot take whole: its
-- returned message cut to the header section (runtime/dsn.lua), since a
-- DSN's sender is <> and one that bounces is lost. body, size, eight as
-- they are otherwise.
local function fit_dsn(self, env, body, size, eight)
  local why
  if eight and not self.ext["8BITMIME"] then
    why = "the mail server this report is sent to, " .. self.name .. ", does not accept 8-bit data (8BITMIME)"
  elseif self.size_limit > 0 and size > self.size_limit then
    why = format("the whole report would exceed the size limit of the mail server it is sent to, %s (%d octets)",
      self.name, self.size_limit)
  end
  local short = why and rdsn.headers_only(body, why)
  if not short then return body, size, eight end
  log.info("%s: DSN sent with the returned message's header section only: %s", env.id, why)
  return short, #short, false
end

function Conn:transaction(env, body, rcpts)
  local results, host = tnew(#rcpts, 0), self.name
  -- what the server must support, checked before sending anything
  local size = type(body) == "string" and #body or body:size()
  -- 8BITMIME is needed by 8-bit content, whatever BODY= the message came
  -- with (many clients declare 8BITMIME for every message); scanned once
  if env.eight == nil then env.eight = has_8bit(body) end
  local eight = env.eight
  local ext8 = self.ext["8BITMIME"] ~= nil
  if env.dsn then body, size, eight = fit_dsn(self, env, body, size, eight) end
  if self.size_limit > 0 and size > self.size_limit then
    return all(results, rcpts, { status = "bounced", code = 552, enhanced = "5.3.4", host = host,
      text = format("message size %d exceeds the limit of %s (%d)", size, host, self.size_limit) })
  end
  local utf8, by_headers = needs_utf8(env, body, rcpts)
  local from, addrs = env.from or "", nil
  if utf8 and not self.ext.SMTPUTF8 then
    -- internationalized domains with ASCII local parts go in A-labels
    if by_headers then
      from = nil
    else
      from, addrs = downgrade(env, rcpts)
    end
    if not from then
      return all(results, rcpts, { status = "bounced", code = 553, enhanced = "5.6.7", host = host,
        text = host .. " does not support SMTPUTF8, which this message needs" })
    end
    utf8 = false
  end
  if eight and not ext8 then
    return all(results, rcpts, { status = "bounced", code = 554, enhanced = "5.6.3", host = host,
      text = host .. " does not support 8BITMIME, which this message needs" })
  end
  local mail = tnew(8, 0)
  mail[1], mail[2], mail[3] = "MAIL FROM:<", from, ">"
  if self.ext.SIZE then mail[#mail + 1] = " SIZE=" .. size end
  if ext8 and (eight or env.body == "8BITMIME") then mail[#mail + 1] = " BODY=8BITMIME" end
  if utf8 then mail[#mail + 1] = " SMTPUTF8" end
  local dsn = self.ext.DSN ~= nil
  if dsn and env.ret then mail[#mail + 1] = " RET=" .. env.ret end
  if dsn and env.envid then mail[#mail + 1] = " ENVID=" .. env.envid end
  mail[#mail + 1] = "\r\n"
  local cmds = tnew(#rcpts + 2, 0)
  cmds[1] = concat(mail)
  for i, r in ipairs(rcpts) do
    local line = "RCPT TO:<" .. (addrs and addrs[i] or r.address) .. ">"
    if dsn and r.notify then line = line .. " NOTIFY=" .. r.notify end
    if dsn and r.orcpt then line = line .. " ORCPT=" .. r.orcpt end
    cmds[i + 1] = line .. "\r\n"
  end
  cmds[#cmds + 1] = "DATA\r\n"
  local t = self.timeouts
  -- the replies, three slots each (code, enhanced or false, text): no table per reply
  local replies = tnew(3 * #cmds, 0)
  if self.pipelining then
    -- RFC 2920: MAIL, every RCPT and DATA in one write, then the replies in order
    if not self:send(concat(cmds)) then return all(results, rcpts, temp(self.broken, host)) end
    for i = 1, #cmds do
      local code, enh, text = self:reply(i == 1 and t.mail or (i == #cmds and t.data or t.rcpt))
      if not code then return all(results, rcpts, temp(self.broken, host)) end
      replies[3 * i - 2], replies[3 * i - 1], replies[3 * i] = code, enh or false, text
    end
  else
    for i = 1, #cmds do
      if not self:send(cmds[i]) then return all(results, rcpts, temp(self.broken, host)) end
      local code, enh, text = self:reply(i == 1 and t.mail or (i == #cmds and t.data or t.rcpt))
      if not code then return all(results, rcpts, temp(self.broken, host)) end
      replies[3 * i - 2], replies[3 * i - 1], replies[3 * i] = code, enh or false, text
      if i == 1 and code ~= 250 then break end
      if i == #cmds - 1 then
        -- no DATA when every RCPT was refused
        local any = false
        for k = 2, #cmds - 1 do
          local rc = replies[3 * k - 2]
          if rc and rc >= 200 and rc < 300 then any = true end
        end
        if not any then break end
      end
    end
  end
  return self:send_data(body, rcpts, results, replies, #cmds, size, dsn)
end

-- The transaction once the server answered MAIL, RCPT and DATA: the message,
-- then the reply to its end. (Functions of their own: code after a wait
-- runs in LuaJIT's interpreter until it enters a function, where a
-- compiled trace can start.)
function Conn:send_data(body, rcpts, results, replies, ncmds, size, dsn)
  local host, t = self.name, self.timeouts
  local mcode = replies[1]
  if mcode ~= 250 then
    self:send("RSET\r\n")
    self:reply(t.mail)
    if mcode < 400 then
      -- only 250 accepts a sender: anything else is the server's mistake
      return all(results, rcpts, temp(format("MAIL FROM answered %d %s", mcode, tostring(replies[3])), host))
    end
    return all(results, rcpts, outcome(mcode, replies[2] or nil, replies[3], host, "MAIL FROM"))
  end
  local accepted = tnew(#rcpts, 0)
  for i, r in ipairs(rcpts) do
    local j = 3 * (i + 1) - 2
    local rc = replies[j]
    if rc and rc >= 200 and rc < 300 then
      accepted[#accepted + 1] = r
    elseif rc then
      results[r.index] = outcome(rc, replies[j + 1] or nil, replies[j + 2], host, "RCPT TO")
    end
  end
  local dj = 3 * ncmds - 2
  local dcode, denh, dtext = replies[dj], replies[dj + 1] or nil, replies[dj + 2]
  if #accepted == 0 then
    if dcode == 354 then
      -- a server that said 354 without a recipient: end the data at once
      self:send(".\r\n")
      self:reply(t.done)
    end
    self:send("RSET\r\n")
    self:reply(t.mail)
    return results
  end
  if dcode ~= 354 then
    local res = dcode and outcome(dcode, denh, dtext, host, "DATA") or temp("DATA: no reply", host)
    if res.status == "delivered" then res = temp("DATA: unexpected " .. dcode, host) end
    for _, r in ipairs(accepted) do results[r.index] = res end
    self:send("RSET\r\n")
    self:reply(t.mail)
    return results
  end
  -- one write for the whole message: the block timeout, plus time for its size
  -- at 64 KiB/s (so that a large message on a slow link is not cut off)
  local timeout = t.block + size / 65536
  -- RFC 2920 3.1: the content of a message may be the first "command" of
  -- a group, so the next transaction's MAIL, RCPT and DATA can go in the
  -- same write as this message, and their replies come in the same read as
  -- the reply to its end: one write and one read a message instead of two
  -- each, and one round trip instead of two. While another delivery waits
  -- for a connection to this destination, the connection is handed to it
  -- before the message is written (pending): its first send writes both.
  -- This transaction reads the reply it is owed first; the next one waits
  -- its turn (Conn:reply). The second result says the connection is no
  -- longer this delivery's to release.
  local pool = self.pool
  local handed = pool and self.pipelining and not pool.closing and has_waiter(pool)
    and self.messages + 2 <= pool.opts.max_messages
  if handed then
    self.pending, self.pending_timeout = body, timeout
    self.owed = sched.current()
    pool:handoff(self)
    -- the delivery woken by the handoff runs first; when it did not take
    -- the connection, or sent nothing (its message needs what the server
    -- does not offer), the message goes alone
    sched.yield()
  end
  if not handed or self.pending == body then
    self.pending = nil
    if not self:send_stuffed(body, timeout) then
      if handed then pass_turn(self) end
      return all(results, accepted, temp(self.broken, host)), handed
    end
  end
  results = self:data_done(accepted, results, dsn, self:reply(t.done))
  if handed then
    pass_turn(self)
    -- the pool was closed while the reply was owed: the connection is this
    -- delivery's to end
    if self.retire then self:quit() end
  end
  return results, handed
end

function Conn:data_done(accepted, results, dsn, code, enh, text)
  local host = self.name
  local res = code and outcome(code, enh, text, host, "end of data") or temp(self.broken, host)
  if self.tls_info then res.tls, res.tls_cipher = self.tls_info.version, self.tls_info.cipher end
  -- a next hop without DSN will not report success: RFC 3461 5.2.2 "relayed"
  if res.status == "delivered" and not dsn then res.relayed = true end
  for _, r in ipairs(accepted) do results[r.index] = res end
  self.messages = self.messages + 1
  return results
end

-- ---- pools ---------------------------------------------------------------------------

local Pool = {}
local pool_mt = { __index = Pool }

-- pool(opts): opts.max_connections, max_messages, idle_timeout, helo,
-- timeouts, pipelining, bind (source address), name (for the logs).
function _M.pool(opts)
  return setmetatable({
    opts = opts,
    idle = {},        -- connections waiting for a message, most recent last
    open = 0,         -- connections open (idle or busy)
    waiting = fifo.new(), -- tasks waiting for a connection, each followed by its wait's token
    stats = { connections = 0, messages = 0, reused = 0, peak = 0 },
  }, pool_mt)
end

-- Wake the first task still waiting for a connection. A task whose wait
-- timed out stays in the list with a stale token, which wakes nothing: it
-- is passed over here (no search of the list when a wait times out).
local function notify(pool)
  local w = pool.waiting
  while fifo.len(w) > 0 do
    local task = fifo.pop(w)
    if sched.wake_token(task, fifo.pop(w), true) then return end
  end
end

-- true when a task waits for a connection (stale entries at the head go)
function has_waiter(pool)
  local w = pool.waiting
  while fifo.len(w) > 0 do
    if sched.waits_for(fifo.peek(w), fifo.peek(w, 2)) then return true end
    fifo.pop(w)
    fifo.pop(w)
  end
  return false
end

-- release(conn): back to the pool, or closed.
-- c joins the idle connections, for a waiting delivery or a later one
local function to_idle(self, c)
  c.idle_since = mono_ms()
  self.idle[#self.idle + 1] = c
  notify(self)
  self:reap_later()
end

function Pool:release(c)
  local o = self.opts
  if c.broken or c.closed or c.messages >= o.max_messages or self.closing then
    if not c.closed then
      if c.broken then c:close() else c:quit() end
    end
    self.open = self.open - 1
    notify(self)
    return
  end
  to_idle(self, c)
end

-- handoff(conn): back to the pool while its transaction still waits for
-- the reply to its end of data (Conn:send_data), for the delivery
-- waiting for a connection.
function Pool:handoff(c)
  c.holder = nil
  to_idle(self, c)
end

-- Close connections idle for longer than idle_timeout.
local function reap(self)
  while #self.idle > 0 and not self.closing do
    -- a wait on the timer wheel: no handle to leave behind, and close()
    -- can end it at once
    self.reaper_task = sched.current()
    sched.wait(math.min(1, self.opts.idle_timeout))
    self.reaper_task = nil
    -- take the expired ones out first: quit() waits, and the list may
    -- change meanwhile
    local now, expired = mono_ms(), {}
    for i = #self.idle, 1, -1 do
      local c = self.idle[i]
      if now - c.idle_since >= self.opts.idle_timeout * 1000 then
        table.remove(self.idle, i)
        expired[#expired + 1] = c
      end
    end
    for _, c in ipairs(expired) do
      self.open = self.open - 1
      c:quit()
      notify(self)
    end
  end
  self.reaper = nil
end

-- (the task's body is a function of its own: one made here, per release,
-- kept LuaJIT from compiling this function, NYI bytecode UCLO)
function Pool:reap_later()
  if self.reaper then return end
  self.reaper = sched.spawn(reap, self)
end

-- acquire(hosts) -> conn | nil, err. hosts: list of { host, port } to try
-- in order until one answers.
function Pool:acquire(hosts)
  local o = self.opts
  while true do
    local idle = self.idle
    local c = idle[#idle]
    if c then
      idle[#idle] = nil
      -- a reply nobody asked for (a 421 before the server closes) would be
      -- read as the next command's; one owed to the transaction before
      -- (handed off before its end of data was answered) is its own
      if not c.s.eof and not c.broken and (c.owed or c.rp:buffered() == 0) then
        self.stats.reused = self.stats.reused + 1
        return c
      end
      -- the server closed it meanwhile, or spoke out of turn
      c:close()
      self.open = self.open - 1
    elseif self.open < o.max_connections then
      self.open = self.open + 1
      if self.open > self.stats.peak then self.stats.peak = self.open end
      local errs = {}
      local all_5xx, code5, enh = true, nil, nil
      for _, h in ipairs(hosts) do
        local conn, err, code, e = _M.connect(h.host, h.port, o, h.name)
        if conn then
          self.stats.connections = self.stats.connections + 1
          return conn
        end
        errs[#errs + 1] = err
        enh = e or enh
        if code and code >= 500 then code5 = code else all_5xx = false end
        log.info("%s: %s", o.name or "smtp", err)
      end
      self.open = self.open - 1
      notify(self)
      -- a permanent answer only when every host gave one
      return nil, concat(errs, "; "), all_5xx and code5 or nil, enh
    else
      -- (timed out, the entry stays: notify passes over its stale token)
      local me, token = sched.reserve()
      fifo.push(self.waiting, me)
      fifo.push(self.waiting, token)
      sched.wait(o.timeouts.connect)
    end
  end
end

-- deliver(env, body, rcpts, hosts) -> results by recipient index
function Pool:deliver(env, body, rcpts, hosts)
  local c, err, code, enh = self:acquire(hosts)
  if not c then
    -- every host refused or failed: a 5xx greeting from all of them bounces
    local res = (code and code >= 500) and
      { status = "bounced", code = code, enhanced = "5.0.0", text = err }
      or { status = "deferred", code = 451, enhanced = enh or "4.4.1", text = err }
    local results = {}
    for _, r in ipairs(rcpts) do results[r.index] = res end
    return results
  end
  local me = sched.current()
  c.holder, c.pool = me, self
  local ok, results, handed = pcall(c.transaction, c, env, body, rcpts)
  if not ok then
    if c.owed == me then pass_turn(c) end
    if c.holder == me then
      c.broken = "internal error"
      self:release(c)
    end
    error(results, 0)
  end
  self.stats.messages = self.stats.messages + 1
  if not handed then self:release(c) end
  return results
end

function Pool:close()
  self.closing = true
  local idle = self.idle
  self.idle = {}
  self.open = self.open - #idle
  if self.reaper_task then sched.wake(self.reaper_task) end
  for _, c in ipairs(idle) do
    -- a connection whose last message waits for its reply is ended by
    -- that delivery once it has the reply
    if c.owed then c.retire = true else c:close() end
  end
end

_M.parse_ehlo = parse_ehlo

return _M
