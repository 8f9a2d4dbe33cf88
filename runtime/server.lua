-- SMTP listeners and the server session (RFC 5321, with PIPELINING,
-- 8BITMIME, SIZE, ENHANCEDSTATUSCODES, SMTPUTF8, CHUNKING, DSN, STARTTLS
-- and AUTH PLAIN/LOGIN), relay control and the inbound budgets of tenants.
--
-- A session is a task. The C parser frames the input; this module keeps the
-- state machine, runs the policy's hooks and writes replies. Replies are
-- batched while pipelined input is waiting and flushed before the session
-- waits for more (RFC 2920).
local uv = require "luv"
local clock = require "moonpost.runtime.clock"
local mono_ms, wall = clock.mono_ms, clock.time
local bit = require "bit"
local tnew = require "table.new"
local smtp = require "moonpost.core.smtp"
local sched = require "moonpost.runtime.sched"
local stream = require "moonpost.runtime.stream"
local log = require "moonpost.runtime.log"
local workers = require "moonpost.runtime.workers"
local ids = require "moonpost.runtime.ids"
local passwd = require "moonpost.runtime.passwd"
local headers = require "moonpost.runtime.headers"
local dns = require "moonpost.runtime.dns"

local band = bit.band
local format, concat, upper, sub, find, gsub, byte = string.format, table.concat, string.upper,
  string.sub, string.find, string.gsub, string.byte
local parse_path, check_param = smtp.parse_path, smtp.check_param
local xpcall, traceback, tostring, tonumber, pairs, ipairs = xpcall, debug.traceback, tostring, tonumber,
  pairs, ipairs

local _M = { _VERSION = "0.1" }

-- message flags from the C engine (smtp.h MP_MSG_*)
local MSG_BARE_LF, MSG_BARE_CR, MSG_LONG_LINE, MSG_TOO_BIG, MSG_NOMEM = 1, 2, 4, 8, 16
local LINE_BARE_LF, LINE_BAD_CHAR = 1, 2

local Session = {}
local session_mt = { __index = Session }

-- ---- replies ---------------------------------------------------------------

-- One-line replies already made, by text, code and enhanced code (most
-- replies are the same few: "250 2.1.0 Ok", "354 ..."): a lookup instead of
-- a string.format per reply. At most MEMO_MAX of them, so that texts that
-- differ every time ("queued as <id>") cannot grow it.
local MEMO_MAX = 256
local memo, memo_n = {}, 0

local function reply_line(code, enhanced, text)
  local by_code = memo[text]
  local by_enh = by_code and by_code[code]
  local line = by_enh and by_enh[enhanced or false]
  if line then return line end
  if enhanced then
    line = format("%d %s %s\r\n", code, enhanced, text)
  else
    line = format("%d %s\r\n", code, text)
  end
  if memo_n < MEMO_MAX then
    memo_n = memo_n + 1
    if not by_code then
      by_code = {}
      memo[text] = by_code
    end
    if not by_enh then
      by_enh = {}
      by_code[code] = by_enh
    end
    by_enh[enhanced or false] = line
  end
  return line
end

-- Queue a reply; multi-line text ("a\nb") becomes a multi-line reply.
local function reply(self, code, enhanced, text)
  local out = self.out
  local n = self.nout
  if not self.ext.enhancedstatuscodes then enhanced = nil end
  if not find(text, "\n", 1, true) then
    out[n + 1] = reply_line(code, enhanced, text)
    self.nout = n + 1
  else
    local lines = {}
    for line in (text .. "\n"):gmatch("([^\n]*)\n") do lines[#lines + 1] = line end
    local parts = {}
    for i, line in ipairs(lines) do
      local sep = i < #lines and "-" or " "
      parts[i] = enhanced and format("%d%s%s %s\r\n", code, sep, enhanced, line)
        or format("%d%s%s\r\n", code, sep, line)
    end
    out[n + 1] = concat(parts)
    self.nout = n + 1
  end
  self.last_code, self.last_enhanced, self.last_text = code, enhanced, text
end

local function closing(self, why)
  self.quit = true
  if not self.close_reason then self.close_reason = why end
end

local function flush(self, timeout)
  local n = self.nout
  if n == 0 then return true end
  local data = n == 1 and self.out[1] or concat(self.out, "", 1, n)
  for i = 1, n do self.out[i] = nil end
  self.nout = 0
  local ok, err = self.stream:send(data, timeout or self.opts.timeouts.send)
  if not ok then closing(self, "send failed: " .. tostring(err)) end
  return ok
end

-- A protocol error: counts towards max_errors.
local function error_reply(self, code, enhanced, text)
  self.errors = self.errors + 1
  if self.errors >= self.opts.max_errors then
    reply(self, 421, "4.7.0", self.hostname .. " Error: too many errors")
    return closing(self, "too many errors")
  end
  reply(self, code, enhanced, text)
end

local function verdict_reply(self, v)
  reply(self, v.code, v.enhanced, v.text)
  if v.code == 421 then closing(self, "policy 421") end
end

-- RFC 5321 3.8: the server is going down; the client retries elsewhere or later.
local function shutting_down(self)
  reply(self, 421, "4.3.2", self.hostname .. " Service shutting down")
  closing(self, "shutdown")
end

-- ---- tenants and relaying ----------------------------------------------------------

-- Make `tenant` the session's tenant (conn.tenant), moving the connection
-- from the old tenant's count to the new one's. false, and nothing changes,
-- when the new tenant is at its max_connections (unless force).
local function set_conn_tenant(self, tenant, force)
  local old = self.counted_tenant
  if tenant ~= old then
    local t = self.mta.tenants
    if tenant ~= nil and not t:open(tenant, force) then return false end
    if old ~= nil then t:close(old) end
    self.counted_tenant = tenant
  end
  self.conn.tenant = tenant
  return true
end

-- A tenant's budget for one more message: its queue quota (unless
-- no_quota), then its rate. Returns the reply (code, enhanced, text) that
-- refuses it, or nil.
local function tenant_budget(self, tenant, no_quota)
  local cfg = self.mta.tenants:get(tenant)
  if not cfg then return nil end
  if not no_quota and cfg.max_queued and self.mta:tenant_depth(tenant) >= cfg.max_queued then
    return 452, "4.3.1", "Tenant queue quota exceeded, try again later"
  end
  if cfg.max_messages and not self.mta.tenants:take(tenant) then
    return 452, "4.7.0", "Tenant message rate exceeded, try again later"
  end
end

local function over_quota(self, tenant)
  local cfg = self.mta.tenants:get(tenant)
  return cfg and cfg.max_queued and self.mta:tenant_depth(tenant) >= cfg.max_queued
end

-- May this session relay: authenticated (when the listener lets
-- authenticated users relay) or connected from a listed network.
local function update_relay(self)
  local conn, r = self.conn, self.opts.relay
  conn.relay = (conn.auth ~= nil and r.authenticated) or r.matcher:match(conn.remote_ip or "")
end

local function is_local(self, path)
  if path.postmaster then return true end
  local ld = self.opts.local_domains
  if not ld then return false end
  local d = path.domain:lower()
  if ld.exact[d] then return true end
  -- an internationalized domain (SMTPUTF8): compared by its A-labels, as
  -- local_domains are kept (RFC 6531 3.2: the same domain in either form)
  if find(d, "[\128-\255]") then
    d = dns.to_ascii(d)
    if not d then return false end
    if ld.exact[d] then return true end
  end
  for _, suffix in ipairs(ld.suffixes) do
    if #d > #suffix and sub(d, -#suffix) == suffix then return true end
  end
  return false
end

-- ---- state -------------------------------------------------------------------

-- The only place the state changes; logged at debug level.
local function set_state(self, new)
  if log.enabled("debug") then
    log.debug("session %s: %s -> %s", self.conn.id, self.state, new)
  end
  self.state = new
end

local function reset_txn(self)
  if self.txn then
    self.txn = nil
    self.parser:reset_body()
  end
  if self.state ~= "connected" and self.state ~= "rejected" then set_state(self, "ready") end
end

-- ---- the Received header (RFC 5321 4.4) --------------------------------------

local date_sec, date_str = -1, ""
local function rfc5322_date()
  local t = wall()
  if t ~= date_sec then
    date_sec = t
    date_str = os.date("!%a, %d %b %Y %H:%M:%S +0000", t)
  end
  return date_str
end

local function protocol_keyword(self, txn)
  if not self.esmtp then return "SMTP" end
  local p = (txn.smtputf8 and "UTF8SMTP" or "ESMTP")
  if self.conn.tls then p = p .. "S" end
  if self.conn.auth then p = p .. "A" end
  return p
end

-- What clean() replaces, and each octet's verdict under it, for a scan
-- (compiled by LuaJIT) that spares most values gsub's matcher and copy.
local UNSAFE = "[%c()\\<>]"
local unsafe = {}
for b = 0, 255 do
  unsafe[b] = find(string.char(b), UNSAFE) ~= nil
end

local function clean(s, max)
  for i = 1, #s do
    if unsafe[byte(s, i)] then
      s = gsub(s, UNSAFE, "?")
      break
    end
  end
  if #s > max then s = sub(s, 1, max) end
  return s
end

-- The From part: the HELO name when it is a domain or an address literal,
-- else the address with the name in a comment, made safe. The same for
-- every message of a session: kept on the session (not on conn, which
-- policies see) with the HELO name and address it was made from.
local function received_from(self, conn, lit)
  local helo = conn.helo
  if self.rfrom and self.rfrom_helo == helo and self.rfrom_lit == lit then return self.rfrom end
  local from
  if helo and #helo <= 255 and (helo:match("^[%w][%w%-%._]*$") or helo:match("^%[[%w%.:]+%]$")) then
    from = helo .. " ([" .. lit .. "])"
  else
    local shown = helo and gsub(helo, "[^%w%.%-_:%[%]@]", "?") or "none"
    from = "[" .. lit .. "] (helo=" .. sub(shown, 1, 255) .. ")"
  end
  self.rfrom, self.rfrom_helo, self.rfrom_lit = from, helo, lit
  return from
end

local function received_header(self, txn)
  local conn = self.conn
  local ip = conn.remote_ip or "unknown"
  local lit = find(ip, ":", 1, true) and ("IPv6:" .. ip) or ip
  local rcpt = ""
  if #txn.recipients == 1 then
    rcpt = "\r\n\tfor <" .. clean(txn.recipients[1].address, 256) .. ">"
  end
  local tls = ""
  local ti = conn.tls_info
  if ti then
    tls = format("\r\n\t(using %s with cipher %s (%d bits))", clean(ti.version or "?", 32),
      clean(ti.cipher or "?", 64), ti.bits or 0)
  end
  return format("Received: from %s%s\r\n\tby %s (Moonpost) with %s id %s%s;\r\n\t%s\r\n",
    received_from(self, conn, lit), tls, self.hostname, protocol_keyword(self, txn), txn.id, rcpt, rfc5322_date())
end

-- ---- commands --------------------------------------------------------------------

local commands = {}

local function greeted(self)
  if self.state == "connected" then
    error_reply(self, 503, "5.5.1", "Error: send HELO/EHLO first")
    return false
  end
  return true
end

local function helo(self, arg, is_ehlo)
  local name = arg:match("^%s*(%S+)")
  if not name then
    return error_reply(self, 501, "5.5.4", "Syntax: " .. (is_ehlo and "EHLO" or "HELO") .. " hostname")
  end
  -- RFC 5321 4.1.4: EHLO/HELO resets any transaction.
  reset_txn(self)
  local conn = self.conn
  local prev_helo, prev_esmtp = conn.helo, self.esmtp
  conn.helo = name
  self.esmtp = is_ehlo
  conn.esmtp = is_ehlo
  local v = self.mta.bus:run("smtp_server_ehlo", conn, name, is_ehlo)
  if v and v.kind ~= "accept" then
    conn.helo, self.esmtp, conn.esmtp = prev_helo, prev_esmtp, prev_esmtp
    return verdict_reply(self, v)
  end
  set_state(self, "ready")
  if is_ehlo then
    local l = self.listener
    self.out[self.nout + 1] = conn.tls and l.ehlo_tls or l.ehlo_plain
    self.nout = self.nout + 1
    self.last_code = 250
  else
    reply(self, 250, nil, self.hostname)
  end
end

commands.EHLO = function(self, arg) return helo(self, arg, true) end
commands.HELO = function(self, arg) return helo(self, arg, false) end

local MAIL_PARAMS = { SIZE = "size", BODY = "8bitmime", SMTPUTF8 = "smtputf8", RET = "dsn",
  ENVID = "dsn", AUTH = "auth" }
local RCPT_PARAMS = { NOTIFY = "dsn", ORCPT = "dsn" }

-- Check parameters against what this listener advertised. Returns true, or
-- replies and returns false.
local function check_params(self, params, allowed)
  for key, value in pairs(params) do
    local ext = allowed[key]
    -- AUTH= goes with the AUTH extension, which is on where auth is configured
    local on = ext == "auth" and self.opts.auth ~= nil or self.ext[ext]
    if not ext or not self.esmtp or not on then
      error_reply(self, 555, "5.5.4", "Unsupported parameter " .. key)
      return false
    end
    local ok, why = check_param(key, value)
    if not ok then
      error_reply(self, 501, "5.5.4", why)
      return false
    end
  end
  return true
end

commands.MAIL = function(self, arg)
  if not greeted(self) then return end
  if self.txn then return error_reply(self, 503, "5.5.1", "Error: nested MAIL command") end
  local tls = self.listener.tls
  if tls and tls.required and not self.conn.tls then
    -- RFC 3207 4
    return error_reply(self, 530, "5.7.0", "Must issue a STARTTLS command first")
  end
  local auth = self.opts.auth
  if auth and auth.required and not self.conn.auth then
    -- RFC 4954 6
    return error_reply(self, 530, "5.7.0", "Authentication required")
  end
  local path, code, enh, text = parse_path(arg, "mail")
  if not path then return error_reply(self, code, enh, text) end
  local params = path.params
  if not check_params(self, params, MAIL_PARAMS) then return end
  if params.BODY and upper(params.BODY) == "BINARYMIME" then
    return error_reply(self, 555, "5.5.4", "BODY=BINARYMIME is not supported")
  end
  if path.utf8 and not params.SMTPUTF8 then
    return error_reply(self, 553, "5.6.7", "Non-ASCII sender address needs SMTPUTF8")
  end
  local size = tonumber(params.SIZE)
  local max = self.opts.max_message_size
  if size and max > 0 and size > max then
    return reply(self, 552, "5.3.4", "Message size exceeds fixed maximum message size")
  end
  local conn = self.conn
  local tenant = conn.tenant
  if tenant ~= nil then
    -- with a tenant_header the message's tenant is known at the end of the
    -- data only: its queue quota is checked there (header_tenant)
    local c, e, t = tenant_budget(self, tenant, self.opts.tenant_header)
    if c then return reply(self, c, e, t) end
  end
  local txn = {
    id = ids.next(),
    conn = self.conn,
    sender = path,
    params = params,
    recipients = tnew(1, 0), -- (most have one: its slot made here, not by a rehash)
    notes = {},
    size_declared = size,
    body_type = params.BODY and upper(params.BODY) or nil,
    smtputf8 = params.SMTPUTF8 and true or false,
    ret = params.RET and upper(params.RET) or nil,
    envid = params.ENVID,
    tenant = tenant,
    auth = conn.auth,
  }
  local v = self.mta.bus:run("smtp_server_mail_from", txn, path)
  if v and v.kind ~= "accept" then return verdict_reply(self, v) end
  self.txn, self.rate_tenant = txn, tenant -- whose message-rate token it took
  set_state(self, "mail")
  if v then return verdict_reply(self, v) end
  reply(self, 250, "2.1.0", "Ok")
end

commands.RCPT = function(self, arg)
  if not greeted(self) then return end
  local txn = self.txn
  if not txn then return error_reply(self, 503, "5.5.1", "Error: need MAIL command") end
  if txn.chunking then return error_reply(self, 503, "5.5.1", "Error: RCPT after BDAT") end
  if #txn.recipients >= self.opts.max_recipients then
    return reply(self, 452, "4.5.3", "Error: too many recipients")
  end
  local path, code, enh, text = parse_path(arg, "rcpt")
  if not path then return error_reply(self, code, enh, text) end
  local sp = self.mta.spool
  if sp and not sp:accepting() then
    return reply(self, 452, "4.3.1", "Insufficient system storage")
  end
  local params = path.params
  if not check_params(self, params, RCPT_PARAMS) then return end
  if path.utf8 and not txn.smtputf8 then
    return error_reply(self, 553, "5.6.7", "Non-ASCII recipient address needs SMTPUTF8")
  end
  -- raw UTF-8 in ORCPT (RFC 6533 utf-8-addr-unitext) only in an SMTPUTF8
  -- transaction; \x{...} escapes carry it otherwise
  if params.ORCPT and not txn.smtputf8 and find(params.ORCPT, "[\128-\255]") then
    return error_reply(self, 553, "5.6.7", "Non-ASCII ORCPT needs SMTPUTF8")
  end
  if params.NOTIFY then path.notify = upper(params.NOTIFY) end
  if params.ORCPT then path.orcpt = params.ORCPT end
  if not self.conn.relay and not is_local(self, path) then
    return reply(self, 554, "5.7.1", "Relaying denied")
  end
  -- u@[192.0.2.1]: a listener may refuse domain literals it does not serve
  if path.literal and self.opts.domain_literals == false and not is_local(self, path) then
    return reply(self, 550, "5.7.1", "Domain literals are not accepted here")
  end
  if txn.tenant ~= nil and not self.opts.tenant_header and over_quota(self, txn.tenant) then
    return reply(self, 452, "4.3.1", "Tenant queue quota exceeded, try again later")
  end
  local v = self.mta.bus:run("smtp_server_rcpt_to", txn, path)
  if v and v.kind ~= "accept" then return verdict_reply(self, v) end
  txn.recipients[#txn.recipients + 1] = path
  set_state(self, "rcpt")
  if v then return verdict_reply(self, v) end
  reply(self, 250, "2.1.5", "Ok")
end

-- The data hook runs once per transaction, at DATA or at the first BDAT.
local function data_hook(self, txn)
  local v = self.mta.bus:run("smtp_server_data", txn)
  if v and v.kind ~= "accept" then return v end
  return nil
end

-- run_received(mta, txn, msg) -> ok, verdict: the smtp_server_message_received
-- chain, then, when it lets the message through, the steps of blocks that
-- must see the final message (DKIM signing), before the spool. The same
-- sequence for SMTP and for mail injected through the HTTP API. ok is
-- false (and verdict the traceback) when a handler or a step raised.
function _M.run_received(mta, txn, msg)
  local ok, v = xpcall(mta.bus.run, traceback, mta.bus, "smtp_server_message_received", txn, msg)
  if ok and (not v or v.kind == "accept") then
    local steps = mta.message_steps
    if steps then
      for i = 1, #steps do
        local sok, sv = xpcall(steps[i], traceback, txn, msg)
        if not sok then
          ok, v = false, sv
          break
        end
        if sv then
          v = sv
          if sv.kind ~= "accept" then break end
        end
      end
      txn.size = msg:size()
    end
  end
  return ok, v
end

-- The tenant header of a listener with `tenant_header`: the field is read
-- from the header section, removed, and names txn.tenant. The final
-- tenant's budget is checked here (MAIL and RCPT left the queue quota out):
-- a tenant named by the header gets back the token MAIL took from the
-- listener's tenant, and is charged its own. Returns nil, or the reply that
-- refuses the message (code, enhanced, text).
local function header_tenant(self, txn, msg)
  local name = self.opts.tenant_header
  local fields = headers.find(msg:headers(), name:lower())
  if #fields > 1 then return 550, "5.7.1", "More than one " .. name .. " header field" end
  local f = fields[1]
  local found = f and { f.first, f.last, f.value }
  if not found then
    if txn.tenant ~= nil and over_quota(self, txn.tenant) then
      return 452, "4.3.1", "Tenant queue quota exceeded, try again later"
    end
    return nil
  end
  local tenant = found[3]
  if not self.mta.tenants:get(tenant) then
    return 550, "5.7.1", "Unknown tenant in " .. name
  end
  local at = self.auth_tenant
  if at ~= nil and tenant ~= at then
    return 550, "5.7.1", name .. " does not match the tenant of the authenticated user"
  end
  msg:remove(found[1], found[2])
  if tenant ~= txn.tenant then
    -- a different tenant from the one that passed MAIL: not the listener
    -- tenant's message, and its own budget
    if self.rate_tenant ~= nil then
      self.mta.tenants:give(self.rate_tenant)
      self.rate_tenant = nil
    end
    local c, e, t = tenant_budget(self, tenant)
    if c then return c, e, t end
    txn.tenant, self.rate_tenant = tenant, tenant
  elseif over_quota(self, tenant) then
    return 452, "4.3.1", "Tenant queue quota exceeded, try again later"
  end
  return nil
end

-- End of message content (DATA or BDAT LAST).
local message_stored

local function message_done(self, msg, flags)
  local txn = self.txn
  local opts = self.opts
  if band(flags, MSG_TOO_BIG) ~= 0 then
    msg:close()
    reset_txn(self)
    return reply(self, 552, "5.3.4", "Message size exceeds fixed maximum message size")
  end
  if band(flags, MSG_NOMEM) ~= 0 then
    msg:close()
    reset_txn(self)
    return reply(self, 452, "4.3.1", "Insufficient system storage")
  end
  if opts.bare_lf == "reject" and band(flags, MSG_BARE_LF + MSG_BARE_CR) ~= 0 then
    msg:close()
    reset_txn(self)
    return reply(self, 550, "5.6.0", "Message contains bare CR or LF characters")
  end
  if band(flags, MSG_LONG_LINE) ~= 0 then
    msg:close()
    reset_txn(self)
    return reply(self, 550, "5.6.0",
      format("Message has a line longer than %d octets", opts.max_line_length))
  end
  if opts.tenant_header then
    local c, e, t = header_tenant(self, txn, msg)
    if c then
      msg:close()
      reset_txn(self)
      return reply(self, c, e, t)
    end
  end
  msg:prepend(received_header(self, txn))
  txn.size = msg:size()
  txn.received_at = wall()
  local ok, v = _M.run_received(self.mta, txn, msg)
  local stored, serr, scode = true, nil, nil -- luacheck: ignore scode
  local sp = self.mta.spool
  if ok and sp and (not v or v.kind == "accept") then
    -- The promise: 250 only once the message is on disk.
    stored, serr, scode = sp:store(txn, msg)
  end
  return message_stored(self, txn, msg, ok, v, stored, serr, scode)
end

-- message_done's second half, once the spool has the message. (A function
-- of its own: code after a wait runs in LuaJIT's interpreter until it
-- enters a function, where a compiled trace can start.)
function message_stored(self, txn, msg, ok, v, stored, serr, scode)
  -- the spool keeps a stored message in memory for its delivery
  if not txn.kept then msg:close() end
  self.txn = nil
  self.parser:reset_body()
  set_state(self, "ready")
  if not ok then error(v, 0) end
  if v and v.kind ~= "accept" then return verdict_reply(self, v) end
  if not stored then
    log.error("%s: not queued: %s (%s)", txn.id, tostring(serr), tostring(scode))
    return reply(self, 451, "4.3.0", "Error: queue file write error")
  end
  self.conn.messages = self.conn.messages + 1
  local mc = self.mta.counters
  if mc then mc.received:inc(txn.tenant, self.listener.name) end
  if self.opts.log_messages then
    log.info("%s: from=<%s> size=%d nrcpt=%d session=%s client=[%s]%s", txn.id, txn.sender.address,
      txn.size, #txn.recipients, self.conn.id, self.conn.remote_ip or "?",
      txn.tenant ~= nil and (" tenant=" .. tostring(txn.tenant)) or "")
  end
  self.mta.bus:emit("smtp_server_message_queued", txn)
  if v then return verdict_reply(self, v) end
  reply(self, 250, "2.0.0", "Ok: queued as " .. txn.id)
end

-- Before the content of a transaction (DATA, the first BDAT): a spool that
-- cannot take it, or the policy's smtp_server_data verdict, refuses it,
-- ends the transaction and answers; true then.
local function content_refused(self, txn)
  local sp = self.mta.spool
  if sp and not sp:accepting() then
    reset_txn(self)
    reply(self, 452, "4.3.1", "Insufficient system storage")
    return true
  end
  local v = data_hook(self, txn)
  if v then
    reset_txn(self)
    verdict_reply(self, v)
    return true
  end
  return false
end

commands.DATA = function(self, arg)
  if not greeted(self) then return end
  local txn = self.txn
  if arg ~= "" then return error_reply(self, 501, "5.5.4", "Syntax: DATA") end
  if not txn then return error_reply(self, 503, "5.5.1", "Error: need MAIL command") end
  if txn.chunking then return error_reply(self, 503, "5.5.1", "Error: BDAT in progress; DATA not allowed") end
  if #txn.recipients == 0 then return error_reply(self, 554, "5.5.1", "Error: no valid recipients") end
  if content_refused(self, txn) then return end
  reply(self, 354, nil, "End data with <CR><LF>.<CR><LF>")
  set_state(self, "data")
  self.parser:begin_data()
  self.in_content = true
end

commands.BDAT = function(self, arg)
  local size, last = arg:match("^(%d+)%s*(%a*)$")
  if not size or #size > 15 or (last ~= "" and upper(last) ~= "LAST") then
    -- Without a chunk size the input cannot be framed any more (RFC 3030).
    reply(self, 501, "5.5.4", "Syntax: BDAT size [LAST]")
    return closing(self, "bad BDAT")
  end
  size = tonumber(size)
  last = last ~= ""
  -- RFC 3030: the chunk is read whatever the reply will be.
  self.parser:begin_bdat(size)
  self.in_content = true
  self.bdat = { size = size, last = last }
end

local function bdat_done(self, flags)
  local b = self.bdat
  self.bdat = nil
  local txn = self.txn
  if self.state == "rejected" then
    self.parser:reset_body()
    return error_reply(self, 503, "5.5.1", "Error: no SMTP service here")
  end
  if not greeted(self) then
    self.parser:reset_body()
    return
  end
  if not self.ext.chunking or not self.esmtp then
    self.parser:reset_body()
    return error_reply(self, 503, "5.5.1", "Error: BDAT not enabled")
  end
  if not txn then
    self.parser:reset_body()
    return error_reply(self, 503, "5.5.1", "Error: need MAIL command")
  end
  if #txn.recipients == 0 then
    self.parser:reset_body()
    return error_reply(self, 554, "5.5.1", "Error: no valid recipients")
  end
  if not txn.chunking then
    txn.chunking = true
    set_state(self, "bdat")
    -- RFC 3030 3: a failed chunk fails the transaction.
    if content_refused(self, txn) then return end
  end
  if band(flags, MSG_TOO_BIG) ~= 0 then
    reset_txn(self)
    return reply(self, 552, "5.3.4", "Message size exceeds fixed maximum message size")
  end
  if not b.last then
    return reply(self, 250, "2.0.0", format("%d octets received", b.size))
  end
  local msg, mflags = self.parser:take()
  return message_done(self, msg, mflags)
end

commands.RSET = function(self, arg)
  if arg ~= "" then return error_reply(self, 501, "5.5.4", "Syntax: RSET") end
  reset_txn(self)
  reply(self, 250, "2.0.0", "Ok")
end

commands.NOOP = function(self)
  reply(self, 250, "2.0.0", "Ok")
end

commands.QUIT = function(self, arg)
  if arg ~= "" then return error_reply(self, 501, "5.5.4", "Syntax: QUIT") end
  reply(self, 221, "2.0.0", "Bye")
  closing(self, "quit")
end

commands.VRFY = function(self, arg)
  if arg == "" then return error_reply(self, 501, "5.5.4", "Syntax: VRFY address") end
  reply(self, 252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
end

commands.EXPN = function(self)
  error_reply(self, 502, "5.5.1", "Error: EXPN not implemented")
end

commands.HELP = function(self)
  reply(self, 214, "2.0.0", self.listener.help_text)
end

-- Start TLS on this connection: the handshake, then a fresh session
-- state. conn.tls_info keeps what was negotiated.
local function start_tls(self, tls)
  local conn = self.conn
  local c, err = tls.ctx:new()
  if c then
    local info
    info, err = self.stream:starttls(c, tls.handshake_timeout)
    if info then
      local mc = self.mta.counters
      if mc then mc.tls_in:inc() end
      conn.tls = true
      conn.tls_info = info
      log.info("session %s: TLS %s %s%s client=[%s]", conn.id, tostring(info.version), tostring(info.cipher),
        info.sni and (" sni=" .. info.sni) or "", conn.remote_ip or "?")
      self.mta.bus:emit("smtp_server_tls", conn, info)
      return true
    end
  end
  local mc = self.mta.counters
  if mc then mc.tls_in_failed:inc() end
  log.info("session %s: TLS handshake failed: %s client=[%s]", conn.id, tostring(err), conn.remote_ip or "?")
  closing(self, "TLS handshake failed: " .. tostring(err))
  self.nout = 0
  return false
end

commands.STARTTLS = function(self, arg)
  local tls = self.listener.tls
  if not tls or tls.implicit then
    return error_reply(self, 502, "5.5.1", "Error: STARTTLS not available")
  end
  if self.conn.tls then return error_reply(self, 503, "5.5.1", "Error: TLS already active") end
  if arg ~= "" then return error_reply(self, 501, "5.5.4", "Syntax: STARTTLS") end
  reply(self, 220, "2.0.0", "Ready to start TLS")
  if not flush(self) then return end
  -- RFC 3207 4.2: forget everything from before, including plaintext
  -- pipelined behind this command (it was never protected).
  self.parser:discard()
  reset_txn(self)
  local conn = self.conn
  conn.helo, conn.esmtp, self.esmtp = nil, false, false
  if conn.auth then
    -- an AUTH in plaintext (allow_plaintext) is forgotten with the rest
    conn.auth, conn.auth_mechanism, self.auth_tenant = nil, nil, nil
    -- back to the listener's tenant, which it belonged to before AUTH
    set_conn_tenant(self, self.opts.tenant, true)
    update_relay(self)
  end
  set_state(self, "connected")
  start_tls(self, tls)
end

-- ---- AUTH (RFC 4954) -------------------------------------------------------------

local B64_USERNAME, B64_PASSWORD = "VXNlcm5hbWU6", "UGFzc3dvcmQ6" -- "Username:", "Password:"

-- The seconds left to read a whole command line (or AUTH response): the
-- command timeout runs from the first wait for it, not anew at every read,
-- so a client sending a byte at a time cannot hold a session for ever.
-- serve() forgets the deadline at every complete line or message.
local function command_time_left(self)
  local now = mono_ms()
  local deadline = self.cmd_deadline
  if not deadline then
    deadline = now + self.opts.timeouts.command * 1000
    self.cmd_deadline = deadline
  end
  return (deadline - now) / 1000
end

-- wait_input with the time left, a deadline already past being a timeout
local function wait_command(self)
  local left = command_time_left(self)
  if left <= 0 then return nil, "timeout" end
  return self.stream:wait_input(left)
end

-- Send a 334 challenge and read the client's response line. Returns the
-- decoded response, or nil after replying (or closing) by itself.
local function sasl_response(self, challenge)
  reply(self, 334, nil, challenge)
  if not flush(self) then return nil end
  local parser = self.parser
  parser:begin_line()
  self.cmd_deadline = nil
  while true do
    local kind, a, b = parser:next()
    if kind == "line" then
      if a == "*" then
        error_reply(self, 501, "5.0.0", "Authentication cancelled")
        return nil
      end
      local decoded = band(b, LINE_BAD_CHAR) == 0 and passwd.b64decode(a, true)
      if not decoded then
        error_reply(self, 501, "5.5.2", "Error: invalid base64 data")
        return nil
      end
      return decoded
    elseif kind == "too_long" then
      error_reply(self, 500, "5.5.6", "Authentication exchange line is too long")
      return nil
    elseif kind ~= nil then
      -- cannot happen in line mode; never let it pass as a response
      error_reply(self, 501, "5.5.2", "Error: unexpected input")
      return nil
    end
    local ok, err = wait_command(self)
    if not ok then
      if err == "timeout" then
        reply(self, 421, "4.4.2", self.hostname .. " Error: timeout exceeded")
        closing(self, "timeout")
      else
        closing(self, "disconnected")
        self.nout = 0
      end
      return nil
    end
  end
end

-- An initial response given with the AUTH command: "=" is an empty one.
local function initial_response(self, ir)
  if ir == "=" then return "" end
  local decoded = passwd.b64decode(ir, true)
  if not decoded then error_reply(self, 501, "5.5.2", "Error: invalid base64 data") end
  return decoded
end

-- Check user and password: the users file (on the kdf threads) or the
-- policy's function. Returns true, tenant | false | nil, err (temporary).
local function check_credentials(self, user, password)
  local a = self.opts.auth
  if a.check then
    local t, err = a.check(user, password, self.conn)
    if t == nil or t == false then
      if err ~= nil then return nil, tostring(err) end
      return false
    end
    if t == true then return true, nil end
    if type(t) ~= "string" then
      error("auth.check returned " .. type(t) .. "; return a tenant name, true, nil or false", 0)
    end
    return true, t
  end
  local u = a.users[user]
  local cache = a.cache_state
  if u and cache and cache:hit(user, password, u.hash) then return true, u.tenant end
  -- an unknown user costs as much as a known one
  local ok, err = passwd.verify(password, u and u.hash or passwd.dummy(a.users), a.timeout)
  if ok == nil then return nil, err end
  if ok and u then
    if cache then cache:put(user, password, u.hash) end
    return true, u.tenant
  end
  return false
end

local function auth_failed(self, mech, user, why)
  log.info("session %s: AUTH %s failed for %q: %s client=[%s]", self.conn.id, mech, user or "",
    why, self.conn.remote_ip or "?")
  local delay = self.opts.auth.failure_delay
  -- a failed attempt costs the client time (the errors limit bounds how many)
  if delay > 0 then sched.sleep(delay) end
  error_reply(self, 535, "5.7.8", "Authentication credentials invalid")
end

commands.AUTH = function(self, arg)
  local a = self.opts.auth
  if not a then return error_reply(self, 502, "5.5.1", "Error: authentication not enabled") end
  local conn = self.conn
  if not self.esmtp then return error_reply(self, 503, "5.5.1", "Error: send EHLO first") end
  if conn.auth then return error_reply(self, 503, "5.5.1", "Error: already authenticated") end
  if self.txn then return error_reply(self, 503, "5.5.1", "Error: AUTH not allowed in a mail transaction") end
  if not conn.tls and not a.allow_plaintext then
    return error_reply(self, 538, "5.7.11", "Encryption required for requested authentication mechanism")
  end
  local mech, ir = arg:match("^(%S+)$")
  if not mech then mech, ir = arg:match("^(%S+) +(%S+)$") end
  if not mech then return error_reply(self, 501, "5.5.4", "Syntax: AUTH mechanism [initial-response]") end
  mech = upper(mech)
  if not a.mechanisms[mech] then
    return error_reply(self, 504, "5.5.4", "Unrecognized authentication type")
  end
  local user, password
  if mech == "PLAIN" then
    local resp
    if ir then resp = initial_response(self, ir) else resp = sasl_response(self, "") end
    if not resp then return end
    local authz, authc, pw = resp:match("^([^%z]*)%z([^%z]*)%z([^%z]*)$")
    if not authz then return error_reply(self, 501, "5.5.2", "Error: malformed PLAIN response") end
    -- acting for another identity is not supported
    if authz ~= "" and authz ~= authc then return auth_failed(self, mech, authc, "authorization identity") end
    user, password = authc, pw
  else -- LOGIN: some clients send the user name with the command
    if ir then user = initial_response(self, ir) else user = sasl_response(self, B64_USERNAME) end
    if not user then return end
    password = sasl_response(self, B64_PASSWORD)
    if not password then return end
  end
  if user == "" or #user > 255 then return auth_failed(self, mech, user, "bad user name") end
  local ok, tenant = check_credentials(self, user, password)
  if ok == nil then
    log.warn("session %s: AUTH %s for %q: temporary failure: %s", conn.id, mech, user, tostring(tenant))
    return reply(self, 454, "4.7.0", "Temporary authentication failure")
  end
  if not ok then return auth_failed(self, mech, user, "bad credentials") end
  if tenant ~= nil and not self.mta.tenants:get(tenant) then
    log.error("session %s: AUTH %s: user %q has tenant '%s', which is not declared", conn.id, mech, user,
      tostring(tenant))
    return reply(self, 454, "4.7.0", "Temporary authentication failure")
  end
  if tenant ~= nil and not set_conn_tenant(self, tenant) then
    log.warn("session %s: tenant %s is at its max_connections, user %q client=[%s]", conn.id, tenant, user,
      conn.remote_ip or "?")
    reply(self, 421, "4.7.0", self.hostname .. " Error: too many connections for this tenant")
    return closing(self, "tenant connections")
  end
  conn.auth, conn.auth_mechanism, self.auth_tenant = user, mech, tenant
  update_relay(self)
  log.info("session %s: AUTH %s user=%q%s client=[%s]", conn.id, mech, user,
    tenant and (" tenant=" .. tenant) or "", conn.remote_ip or "?")
  reply(self, 235, "2.7.0", "Authentication successful")
end

-- In the rejected state (554 greeting) only QUIT and NOOP work (RFC 5321 3.1).
local function rejected_command(self, verb, arg)
  if verb == "QUIT" then return commands.QUIT(self, arg) end
  if verb == "NOOP" then return commands.NOOP(self, arg) end
  error_reply(self, 503, "5.5.1", "Error: no SMTP service here")
end

-- A BDAT line that is refused leaves its chunk unframed: what follows it is
-- message content, not commands (RFC 3030), so the session ends there.
local function refused_line(self, verb, text)
  if verb == "BDAT" then
    reply(self, 500, "5.5.2", text)
    return closing(self, "bad BDAT")
  end
  return error_reply(self, 500, "5.5.2", text)
end

local function dispatch(self, verb, arg, flags)
  if flags ~= 0 then
    if band(flags, LINE_BAD_CHAR) ~= 0 then
      return refused_line(self, verb, "Error: bad character in command")
    end
    if band(flags, LINE_BARE_LF) ~= 0 and self.opts.bare_lf == "reject" then
      return refused_line(self, verb, "Error: command line ended with bare LF")
    end
  end
  -- Stopping: a transaction in progress finishes, nothing new starts.
  if self.draining and not self.txn and verb ~= "QUIT" and verb ~= "BDAT" then return shutting_down(self) end
  -- BDAT reads its chunk in every state; bdat_done() answers for the state.
  if self.state == "rejected" and verb ~= "BDAT" then return rejected_command(self, verb, arg) end
  local fn = commands[verb]
  if not fn then
    return error_reply(self, 500, "5.5.2", "Error: command not recognized")
  end
  return fn(self, arg)
end

-- The commands of a mail transaction whose refusals (4xx and 5xx replies)
-- raise smtp_server_rejected, by the stage names of delivery results.
local REFUSABLE = { MAIL = "MAIL FROM", RCPT = "RCPT TO", DATA = "DATA" }

-- After a command or the end of a message: when its reply refused it, the
-- informational event smtp_server_rejected(conn, txn, rejection) (the event
-- log's Rejection records; docs/events.md).
local function rejected(self, stage, txn, arg)
  local code = self.last_code
  if not code or code < 400 or not self.mta.bus:has("smtp_server_rejected") then return end
  self.mta.bus:emit("smtp_server_rejected", self.conn, txn, { stage = stage, code = code,
    enhanced = self.last_enhanced, text = self.last_text, address = arg and arg:match("<([^>]*)>") or nil })
end

local function on_command(self, verb, arg, flags)
  local stage = REFUSABLE[verb]
  if not stage then return dispatch(self, verb, arg, flags) end
  local txn = self.txn
  self.last_code = nil
  dispatch(self, verb, arg, flags)
  rejected(self, stage, txn or self.txn, verb ~= "DATA" and arg or nil)
end

-- ---- the session loop ---------------------------------------------------------------

local function greet(self)
  local conn = self.conn
  local v = self.mta.bus:run("smtp_server_connect", conn)
  if v and v.kind == "reject" then
    -- RFC 5321 3.1: the only refusal greeting is 554.
    set_state(self, "rejected")
    reply(self, 554, v.enhanced, v.text)
    return true
  elseif v and v.kind == "tempfail" then
    reply(self, 421, v.enhanced, v.text)
    closing(self, "connect tempfail")
    return false
  end
  reply(self, 220, nil, self.banner)
  return true
end

-- An idle session parks (sched.park) once it has waited idle_park_after
-- seconds for a command with no transaction open, so it holds no coroutine
-- while it idles on: serve() returns PARKED through session_main() and
-- run_session() to the scheduler, and unparked() below carries on where it
-- waited. Everything serve() needs is in self, none of it on the stack.
local PARKED = sched.PARKED
local unparked

-- A burst of new sessions (more than park_busy tasks hold a coroutine)
-- parks at once: every session waiting out idle_park_after would hold its
-- coroutine, and the burst's peak of them stays in the process's memory.
local coroutines_in_use = sched.coroutines_in_use

local function wait_idle(self, park_after, park_busy)
  local left = command_time_left(self)
  local busy = coroutines_in_use() > park_busy
  if left <= park_after and not busy then return wait_command(self) end
  if park_after > 0 and not busy then
    local ok, err = self.stream:wait_input(park_after)
    if ok or err ~= "timeout" then return ok, err end
    left = command_time_left(self)
    if left <= 0 then return nil, "timeout" end
  end
  return self.stream:park_input(left, self) -- PARKED, or nil, err if the stream has ended
end

local function serve(self, resumed)
  local parser = self.parser
  local s = self.stream
  local opts = self.opts
  local timeouts = opts.timeouts
  if not resumed then
    local tls = self.listener.tls
    if tls and tls.implicit and not start_tls(self, tls) then return end
    if not greet(self) then return end
  end
  while not self.quit do
    local kind, a, b, c = parser:next()
    if kind then self.cmd_deadline = nil end
    if kind == nil then
      -- the MTA is stopping: a session between transactions ends now
      if self.draining and not self.txn then return shutting_down(self) end
      if self.nout > 0 and not flush(self) then return end
      local idle = not self.txn
      self.idle_wait = idle
      local ok, err
      if self.in_content then
        ok, err = s:wait_input(timeouts.data)
      elseif idle then
        ok, err = wait_idle(self, timeouts.park, timeouts.park_busy)
      else
        ok, err = wait_command(self)
      end
      if ok == PARKED then
        local l = self.listener
        l.parked = l.parked + 1
        return PARKED
      end
      self.idle_wait = false
      if not ok then
        if err == "timeout" then
          reply(self, 421, "4.4.2", self.hostname .. " Error: timeout exceeded")
          closing(self, "timeout")
        else
          closing(self, self.in_content and "disconnected in message content" or "disconnected")
          self.nout = 0
        end
        return
      end
    elseif kind == "cmd" then
      on_command(self, a, b, c)
    elseif kind == "data" then
      self.in_content = false
      local msg, flags = parser:take()
      local txn = self.txn
      self.last_code = nil
      message_done(self, msg, flags)
      rejected(self, "end of data", txn)
    elseif kind == "bdat" then
      self.in_content = false
      local txn = self.txn
      self.last_code = nil
      bdat_done(self, a)
      rejected(self, "BDAT", txn)
    elseif kind == "too_long" then
      refused_line(self, b, "Error: line too long")
    elseif kind == "line" then
      error_reply(self, 500, "5.5.2", "Error: unexpected line")
    end
  end
end

local function session_main(self, resumed)
  local ok, err = xpcall(serve, traceback, self, resumed)
  if ok and err == PARKED then return PARKED end
  if not ok then
    -- A bug or a failing hook costs this session only.
    log.error("session %s: internal error: %s", self.conn.id, tostring(err))
    closing(self, "internal error")
    self.nout = 0
    reply(self, 421, "4.3.0", self.hostname .. " Error: internal error, closing connection")
  end
  if self.nout > 0 and not self.stream.closed then
    flush(self, math.min(self.opts.timeouts.send, 10))
  end
end

local function session_close(self)
  local listener = self.listener
  listener.active = listener.active - 1
  listener.sessions[self] = nil
  if self.counted_tenant ~= nil then
    self.mta.tenants:close(self.counted_tenant)
    self.counted_tenant = nil
  end
  self.stream:close()
  if self.txn then self.txn = nil end
  self.parser:close()
  local conn = self.conn
  conn.closed_reason = self.close_reason or "closed"
  if log.enabled("debug") then
    log.debug("session %s: closed (%s)", conn.id, conn.closed_reason)
  end
  self.mta.bus:emit("smtp_server_disconnect", conn, conn.closed_reason)
end

local function run_session(self, resumed)
  if session_main(self, resumed) == PARKED then return PARKED end
  session_close(self)
end

-- A parked session woken (input, the stream's end, its command timeout or
-- an interrupt): the session's __call, run as its task's new body. The
-- wait's result is not needed: serve() looks at the parser and the stream.
function unparked(self)
  local l = self.listener
  l.parked = l.parked - 1
  self.stream:unparked()
  self.idle_wait = false
  return run_session(self, true)
end

-- ---- listeners -------------------------------------------------------------------------

local function ehlo_reply(hostname, opts, starttls, auth)
  local lines = { "250-" .. hostname }
  local ext = opts.extensions
  if ext.pipelining then lines[#lines + 1] = "250-PIPELINING" end
  if ext.size then lines[#lines + 1] = "250-SIZE " .. string.format("%d", opts.max_message_size) end
  if ext["8bitmime"] then lines[#lines + 1] = "250-8BITMIME" end
  if ext.enhancedstatuscodes then lines[#lines + 1] = "250-ENHANCEDSTATUSCODES" end
  if ext.smtputf8 then lines[#lines + 1] = "250-SMTPUTF8" end
  if ext.chunking then lines[#lines + 1] = "250-CHUNKING" end
  if ext.dsn then lines[#lines + 1] = "250-DSN" end
  if starttls then lines[#lines + 1] = "250-STARTTLS" end
  if auth then lines[#lines + 1] = "250-AUTH " .. concat(opts.auth.mechanism_list, " ") end
  lines[#lines + 1] = "250 HELP"
  return concat(lines, "\r\n") .. "\r\n"
end

local session_seq = 0

local function on_connection(listener, client)
  local mta = listener.mta
  local opts = listener.opts
  session_seq = session_seq + 1
  local mc = mta.counters
  if mc then mc.connections_in:inc() end
  client:nodelay(true)
  local s = stream.new(client)
  if listener.active >= opts.max_connections then
    -- Over the cap: answer and close without a session.
    pcall(uv.try_write, client, "421 " .. (opts.extensions.enhancedstatuscodes and "4.7.0 " or "")
      .. listener.hostname .. " Error: too many connections\r\n")
    s:close()
    log.warn("listener %s: connection refused, %d sessions active", listener.name, listener.active)
    return
  end
  -- A listener's tenant is known from the start: its connection cap applies now.
  local tenant = opts.tenant
  if tenant ~= nil and not mta.tenants:open(tenant) then
    pcall(uv.try_write, client, "421 " .. (opts.extensions.enhancedstatuscodes and "4.7.0 " or "")
      .. listener.hostname .. " Error: too many connections for this tenant\r\n")
    s:close()
    log.warn("listener %s: connection refused, tenant %s has %d connections", listener.name, tenant,
      mta.tenants:connections(tenant))
    return
  end
  local ip, port = s:peername()
  local lip, lport = s:sockname()
  local conn = {
    id = ids.session(session_seq),
    remote_ip = ip,
    remote_port = port,
    local_ip = lip,
    local_port = lport,
    listener = listener.name,
    helo = nil,
    esmtp = false,
    tls = false,
    auth = nil,
    tenant = tenant,
    relay = false,
    messages = 0,
    notes = {},
    started = uv.now(),
  }
  local parser = smtp.parser({
    cmd_line = opts.max_command_length,
    text_line = opts.max_line_length,
    max_size = opts.max_message_size,
  })
  s:attach(parser, opts.input_high_water)
  -- what every session of this listener shares, in a prototype of its own
  local proto = listener.session_mt
  if not proto then
    proto = { __index = setmetatable({ mta = mta, opts = opts, ext = opts.extensions,
      hostname = listener.hostname, banner = listener.banner }, session_mt),
      __call = unparked } -- a parked session's continuation (sched.park)
    listener.session_mt = proto
  end
  local self = setmetatable({
    listener = listener,
    stream = s,
    parser = parser,
    conn = conn,
    state = "connected",
    esmtp = false,
    txn = nil,
    errors = 0,
    out = {},
    nout = 0,
    quit = false,
    in_content = false,
    counted_tenant = tenant,
  }, proto)
  update_relay(self)
  listener.active = listener.active + 1
  listener.sessions[self] = true
  sched.spawn_named("session " .. conn.id, nil, run_session, self)
end

local Listener = {}
local listener_mt = { __index = Listener }

local function new_listener(mta, spec)
  local opts = spec.opts
  local hostname = opts.hostname or mta.hostname
  return setmetatable({
    mta = mta,
    opts = opts,
    spec = spec,
    name = spec.name or (spec.host .. ":" .. spec.port),
    hostname = hostname,
    banner = opts.banner or (hostname .. " ESMTP Moonpost"),
    -- before TLS: STARTTLS where it is offered, AUTH only with allow_plaintext;
    -- inside TLS: AUTH where it is configured
    ehlo_plain = ehlo_reply(hostname, opts, opts.tls_state and not opts.tls_state.implicit,
      opts.auth and opts.auth.allow_plaintext),
    ehlo_tls = ehlo_reply(hostname, opts, false, opts.auth ~= nil),
    tls = opts.tls_state,   -- { ctx, implicit, required, handshake_timeout } or nil
    help_text = "Commands: HELO EHLO " .. ((opts.tls_state and not opts.tls_state.implicit) and "STARTTLS " or "")
      .. (opts.auth and "AUTH " or "") .. "MAIL RCPT DATA " .. (opts.extensions.chunking and "BDAT " or "")
      .. "RSET NOOP QUIT VRFY HELP",
    active = 0,
    parked = 0,      -- sessions of it that are parked (sched.park)
    sessions = {},
    handles = {},
  }, listener_mt)
end

local function set_address(listener, spec)
  local a = listener.tcp:getsockname()
  listener.address = a.ip
  listener.port = a.port
  listener.name = spec.name or ((find(a.ip, ":", 1, true) and ("[" .. a.ip .. "]") or a.ip) .. ":" .. a.port)
end

-- listen(mta, spec) where spec = { host, port, opts, name }
function _M.listen(mta, spec)
  local listener = new_listener(mta, spec)
  local v6 = find(spec.host, ":", 1, true)
  local tcp, pok, ok, err
  if workers.index then
    -- a worker process: every worker binds the same port (runtime/workers.lua)
    tcp = uv.new_tcp(v6 and "inet6" or "inet")
    pok, ok, err = true, workers.reuseport(tcp)
    if ok then pok, ok, err = pcall(tcp.bind, tcp, spec.host, spec.port, v6 and { ipv6only = true } or nil) end
  else
    tcp = uv.new_tcp()
    pok, ok, err = pcall(tcp.bind, tcp, spec.host, spec.port, v6 and { ipv6only = true } or nil)
  end
  if not pok then ok, err = nil, ok end
  if not ok then
    tcp:close()
    return nil, format("cannot listen on %s: %s", listener.name, tostring(err))
  end
  -- The socket's owner: the listener whose sessions its connections become.
  -- A policy reload hands the socket to a new listener (adopt()).
  local box = { owner = listener }
  ok, err = tcp:listen(spec.opts.backlog, sched.callback(function(lerr)
    local owner = box.owner
    if lerr then
      log.error("listener %s: accept: %s", owner.name, tostring(lerr))
      return
    end
    local client = uv.new_tcp()
    local aok, aerr = tcp:accept(client)
    if not aok then
      client:close()
      log.warn("listener %s: accept failed: %s", owner.name, tostring(aerr))
      return
    end
    on_connection(owner, client)
  end, "listener"))
  if not ok then
    tcp:close()
    return nil, format("cannot listen on %s: %s", listener.name, tostring(err))
  end
  listener.tcp, listener.box = tcp, box
  set_address(listener, spec)
  return listener
end

-- adopt(mta, spec, old) -> listener: a listener of mta (a reloaded policy)
-- on the socket of `old`, which keeps its sessions but accepts no more.
-- No connection is refused in between: the socket stays open.
function _M.adopt(mta, spec, old)
  local listener = new_listener(mta, spec)
  listener.tcp, listener.box = old.tcp, old.box
  old.tcp, old.box = nil, nil
  listener.box.owner = listener
  set_address(listener, spec)
  return listener
end

-- Stop accepting; sessions carry on.
function Listener:close()
  if self.tcp and not self.tcp:is_closing() then self.tcp:close() end
  self.tcp = nil
end

-- drain(): the MTA is stopping. Sessions between transactions get
-- `421 4.3.2 ... Service shutting down` now; a transaction in progress
-- finishes (its message gets its reply) and then the session gets the 421.
function Listener:drain()
  for sess in pairs(self.sessions) do
    sess.draining = true
    -- waiting for a command with no transaction open: wake it to say so
    if sess.idle_wait then sess.stream:interrupt() end
  end
end

-- Close every session now (421 to those that are idle between commands).
function Listener:drop_sessions(text)
  for sess in pairs(self.sessions) do
    if not sess.stream.closed then
      if not sess.in_content and sess.nout == 0 then
        sess.stream:try_send("421 " .. (self.opts.extensions.enhancedstatuscodes and "4.3.2 " or "")
          .. self.hostname .. " " .. (text or "Service shutting down") .. "\r\n")
      end
      closing(sess, "shutdown")
      sess.stream:close()
    end
  end
end

return _M
