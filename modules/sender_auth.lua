-- moonpost.sender_auth: the sender checks of inbound mail: SPF (RFC 7208) for the
-- MAIL FROM identity, DKIM verification (RFC 6376) and DMARC (RFC 7489),
-- written into an Authentication-Results field (RFC 8601) and, when asked,
-- enforced.
--
--   mta:use(require("moonpost.sender_auth").check {
--     spf_fail = "reject",     -- 550 5.7.23 at MAIL FROM when SPF says fail
--     dmarc = "enforce",       -- 550 5.7.1 when the From domain's policy says reject
--   })
--
-- SPF runs at MAIL FROM (so that a refusal costs the client no DATA); DKIM
-- and DMARC once the content is complete, before the message is stored.
-- Every DNS query goes through the MTA's resolver (moonpost.new { dns = ... })
-- and waits in the session's task, never on the loop. The results are on
-- txn.auth_results for the handlers that follow. docs/sender-auth.md has every
-- option.
local config = require "moonpost.runtime.config"
local hooks = require "moonpost.runtime.hooks"
local log = require "moonpost.runtime.log"
local dns = require "moonpost.runtime.dns"
local headers = require "moonpost.runtime.headers"
local spf = require "moonpost.runtime.spf"
local dmarc = require "moonpost.runtime.dmarc"
local rdkim = require "moonpost.runtime.dkim"

local format, lower, gsub, match, find, concat = string.format, string.lower, string.gsub, string.match,
  string.find, table.concat

local _M = { _VERSION = "0.1" }

local SCHEMA = {
  spf = { type = "boolean", default = true },
  spf_fail = { type = "enum", values = { "accept", "reject" }, default = "accept" },
  spf_softfail = { type = "enum", values = { "accept", "reject" }, default = "accept" },
  spf_temperror = { type = "enum", values = { "accept", "tempfail" }, default = "accept" },
  spf_permerror = { type = "enum", values = { "accept", "reject" }, default = "accept" },
  spf_helo = { type = "boolean", default = true },
  spf_helo_fail = { type = "enum", values = { "accept", "reject" }, default = "accept" },
  dkim = { type = "boolean", default = true },
  dmarc = { type = "enum", values = { "off", "check", "enforce" }, default = "check" },
  dmarc_quarantine = { type = "enum", values = { "accept", "reject" }, default = "accept" },
  dmarc_temperror = { type = "enum", values = { "accept", "tempfail" }, default = "accept" },
  header = { type = "boolean", default = true },
  authserv_id = { type = "string",
    check = function(v) return v ~= "" and not find(v, "[%s;()\"\\]"), "must be a name" end },
  check_relay = { type = "boolean", default = false },
  skip = { type = "function" },
  timeout = { type = "duration", default = 20, check = function(v) return v > 0, "must be > 0" end },
  spf_session_limit = { type = "posint", default = 10 },
  dkim_body_length = { type = "enum", values = { "accept", "ignore" }, default = "ignore" },
}

-- RFC 7372 codes for SPF; RFC 7489 names none for DMARC, 5.7.1 is the common one
local SPF_FAIL = hooks.reject(550, "5.7.23", "SPF validation failed")
local SPF_HELO_FAIL = hooks.reject(550, "5.7.23", "SPF validation failed for the HELO name")
local SPF_PERMERROR = hooks.reject(550, "5.7.24", "SPF validation error")
local SPF_TEMPERROR = hooks.tempfail(451, "4.7.24", "SPF validation error (DNS), try again later")
-- RFC 3463 4.4.3: the directory server (DNS) failed; RFC 7489 names no code
local DMARC_TEMPERROR = hooks.tempfail(451, "4.4.3", "DMARC policy lookup failed (DNS), try again later")
local SPF_LIMIT = hooks.tempfail(451, "4.7.24", "Too many SPF checks in this session, try again in a new one")

-- What the client wrote (a HELO name, a reason quoting a DNS answer) goes
-- into a header field: printable ASCII only, and bounded, so that no field
-- line outgrows RFC 5322's 998 octets whatever arrives.
local function printable(s, max)
  s = gsub(tostring(s), "[^\32-\126]", "?")
  if #s > max then s = s:sub(1, max - 3) .. "..." end
  return s
end

-- An A-R value as RFC 8601 allows it unquoted (a token), else quoted.
local function value(s)
  s = printable(s, 254)
  if find(s, "^[%w%.%-_@+]+$") then return s end
  -- bounded after escaping, which may double it; never cut in an escape
  s = gsub(s, '(["\\])', "\\%1")
  if #s > 254 then
    s = s:sub(1, 251)
    local tail = #match(s, "\\*$")
    if tail % 2 == 1 then s = s:sub(1, -2) end
    s = s .. "..."
  end
  return '"' .. s .. '"'
end

-- A comment: no parentheses, backslashes or line ends inside.
local function comment(s)
  if not s or s == "" then return "" end
  s = gsub(printable(s, 200), "[()\\]", " ")
  return " (" .. s .. ")"
end

-- The HELO identity (RFC 7208 2.3): postmaster at the HELO name. -> sender,
-- domain, "helo" | nil when there is none to check (no HELO name, an
-- address literal).
local function helo_identity(conn)
  local helo = conn.helo
  if not helo or find(helo, "^%[") then return nil end
  local d = dns.to_ascii(helo)
  if not d then return nil end
  return "postmaster@" .. d, d, "helo"
end

-- The identity SPF checks (RFC 7208 2.4): the MAIL FROM domain, or for the
-- null sender the HELO identity. -> sender, domain, via ("mailfrom" |
-- "helo") | nil when there is none to check.
local function spf_identity(txn, sender)
  if sender.null or sender.domain == "" then return helo_identity(txn.conn) end
  if sender.literal then return nil end
  local d = dns.to_ascii(sender.domain)
  if not d then return nil end
  return sender["local"] .. "@" .. d, d, "mailfrom"
end

-- The Authentication-Results field for these results (RFC 8601 2.2), folded
-- a result per line.
local function ar_field(id, r)
  local parts = { id }
  local s = r.spf
  if s then
    local t = format("spf=%s%s", s.result, comment(s.reason))
    if s.via == "helo" then
      t = t .. " smtp.helo=" .. value(s.domain)
    elseif s.sender then
      t = t .. " smtp.mailfrom=" .. value(s.sender)
    end
    parts[#parts + 1] = t
  end
  local h = r.spf_helo
  if h then parts[#parts + 1] = format("spf=%s%s smtp.helo=%s", h.result, comment(h.reason), value(h.domain)) end
  local d = r.dkim
  if d then
    if #d == 0 then parts[#parts + 1] = "dkim=none" end
    for _, sig in ipairs(d) do
      local t = format("dkim=%s%s", sig.result, comment(sig.result ~= "pass" and sig.reason or nil))
      if sig.domain then t = t .. " header.d=" .. value(sig.domain) end
      if sig.selector then t = t .. " header.s=" .. value(sig.selector) end
      if sig.header_b then t = t .. " header.b=" .. value(sig.header_b) end
      parts[#parts + 1] = t
    end
  end
  local m = r.dmarc
  if m then
    local c = m.record and format("p=%s sp=%s dis=%s", m.record.p or "none", m.record.sp or m.record.p or "none",
      m.disposition or "none") or m.reason
    local t = format("dmarc=%s%s", m.result, comment(c))
    if m.domain then t = t .. " header.from=" .. value(m.domain) end
    parts[#parts + 1] = t
  end
  if #parts == 1 then parts[2] = "none" end
  return "Authentication-Results: " .. concat(parts, ";\r\n\t") .. "\r\n"
end

-- The authserv-id of an Authentication-Results value (RFC 8601 2.2: a
-- value, after optional comments): a quoted string, or a token, which the
-- RFC 5322 tokens split at its dots; lower case, "" when there is none.
local function authserv_of(v)
  local t = headers.tokens(v)
  if t[1] == "q" then return lower(t[2]) end
  if t[1] ~= "w" then return "" end
  local out, i = { t[2] }, 3
  while t[i] == "." and t[i + 2] == "w" do
    out[#out + 1] = "." .. t[i + 3]
    i = i + 4
  end
  return lower(concat(out))
end

function _M.check(opts)
  local o = config.check("sender_auth.check", opts or {}, SCHEMA)
  local block = { name = "sender_auth.check", opts = o }
  local id -- the authserv-id: the option, else the MTA's host name
  local counted -- sender_auth_results_total{method, result}, once attached
  local function count(method, result)
    if counted then counted:inc(method, result) end
  end

  local function skipped(txn)
    local conn = txn.conn
    -- API injections and, unless told to check them too, clients the MTA
    -- trusts to relay (authenticated users, relay networks) send as
    -- themselves: their mail is the MTA's own outbound mail
    if conn.protocol == "http" then return true end
    if conn.relay and not o.check_relay then return true end
    if o.skip then return o.skip(txn) and true or false end
    return false
  end

  -- Does any SPF result refuse or defer mail? Then a client must not get
  -- past the checks by making them many, and an exp= explanation is
  -- worth its lookups (it only goes into a refusal).
  local enforcing = o.spf_fail == "reject" or o.spf_softfail == "reject" or o.spf_permerror == "reject"
    or o.spf_temperror == "tempfail" or o.spf_helo_fail == "reject"
  -- per session: the SPF results by identity, and how many checks it made.
  -- Each MAIL FROM with a new domain costs up to 20 DNS queries a client
  -- picks; a session gets spf_session_limit checks, repeats are answered
  -- from here.
  local sessions = setmetatable({}, { __mode = "k" })

  -- kind: "mail" or "helo", counted apart so that neither uses up the
  -- other's checks
  local function spf_result(txn, ident, domain, kind)
    local conn = txn.conn
    local seen = sessions[conn]
    if not seen then
      seen = { mail = 0, helo = 0, results = {} }
      sessions[conn] = seen
    end
    -- a result holds for the whole domain unless the record used the
    -- sender's local part (%{l}, %{s}): VERP and SRS senders, a new local
    -- part per message, cost one check
    local helo = tostring(conn.helo)
    local dkey, ikey = "d\0" .. domain .. "\0" .. helo, "s\0" .. ident .. "\0" .. helo
    local r = seen.results[dkey] or seen.results[ikey]
    if r then
      local copy = {}
      for k, v in pairs(r) do copy[k] = v end
      return copy
    end
    if seen[kind] >= o.spf_session_limit then
      return { result = "temperror", reason = "more than " .. o.spf_session_limit .. " SPF checks in this session",
        limited = true }
    end
    seen[kind] = seen[kind] + 1
    r = spf.check_host { dns = dns.default(), ip = conn.remote_ip, sender = ident, helo = conn.helo,
      domain = domain, timeout = o.timeout, receiver = id, explain = o.spf_fail == "reject" }
    -- a temporary error is tried again by the next transaction
    if r.result ~= "temperror" then seen.results[r.local_part and ikey or dkey] = r end
    return r
  end

  local function mail_from(txn, sender)
    if not o.spf then return nil end
    if skipped(txn) then
      txn.auth_results = { skipped = true }
      return nil
    end
    local ident, domain, via = spf_identity(txn, sender)
    local r
    if not ident then
      r = { result = "none", reason = "no domain to check" }
    else
      r = spf_result(txn, ident, domain, via == "helo" and "helo" or "mail")
    end
    r.via, r.sender = via, ident
    r.domain = r.domain or domain
    local results = { spf = r }
    txn.auth_results = results
    local res = r.result
    count("spf", res)
    -- RFC 7208 2.3 recommends checking the HELO identity too; for the null
    -- sender it is the one above. Once per session and name (the cache).
    local h
    if o.spf_helo and via == "mailfrom" then
      local hident, hdomain = helo_identity(txn.conn)
      if hident then
        h = spf_result(txn, hident, hdomain, "helo")
        h.via, h.sender, h.domain = "helo", hident, h.domain or hdomain
        results.spf_helo = h
        count("spf_helo", h.result)
      end
    end
    if (r.limited or h and h.limited) and enforcing then
      log.info("sender_auth: %s: SPF check limit (%d) of the session reached: deferred", txn.conn.id,
        o.spf_session_limit)
      return SPF_LIMIT
    end
    if res == "fail" and o.spf_fail == "reject" or res == "softfail" and o.spf_softfail == "reject" then
      log.info("sender_auth: %s: SPF %s for %s from %s: refused", txn.conn.id, res, tostring(ident), txn.conn.remote_ip)
      if r.explanation and res == "fail" then
        -- (printable ASCII of at most 200 characters: spf.lua cleans it)
        return hooks.reject(550, "5.7.23", "SPF validation failed: " .. r.explanation)
      end
      return SPF_FAIL
    end
    -- the HELO identity's fail: checked apart, or, for the null sender,
    -- the one MAIL FROM checked
    if (h and h.result == "fail" or via == "helo" and res == "fail") and o.spf_helo_fail == "reject" then
      log.info("sender_auth: %s: SPF fail for HELO %s from %s: refused", txn.conn.id, tostring(txn.conn.helo),
        txn.conn.remote_ip)
      return SPF_HELO_FAIL
    end
    if res == "permerror" and o.spf_permerror == "reject" then return SPF_PERMERROR end
    if res == "temperror" and o.spf_temperror == "tempfail" then return SPF_TEMPERROR end
    return nil
  end

  -- RFC 8601 5: a field that claims to come from this host and was not
  -- added by it is a forgery. Removed from every message, checked or not
  -- (a relay client's too: the next hop of the same domain would trust
  -- it), bottom up so that the offsets found in head (the message's
  -- header section as it is) stay right.
  local function remove_forged(msg, head)
    local found = headers.find(head, "authentication-results")
    local mine = lower(id)
    for i = #found, 1, -1 do
      if authserv_of(found[i].value) == mine then msg:remove(found[i].first, found[i].last) end
    end
  end

  local function message_received(txn, msg)
    local head = msg:headers()
    local results = txn.auth_results
    if results and results.skipped or (not results and skipped(txn)) then
      remove_forged(msg, head)
      return nil
    end
    results = results or {}
    txn.auth_results = results
    if o.dkim or o.dmarc ~= "off" then
      local list, err = rdkim.verify(msg, dns.default(), o.timeout)
      if not list then
        log.warn("sender_auth: %s: DKIM verification failed: %s", txn.id, tostring(err))
        list = {}
      end
      if o.dkim_body_length == "ignore" then
        -- RFC 6376 8.2: past its l= anyone may append to a signed body; such
        -- a signature vouches for less than the message, DMARC gets none
        for _, sig in ipairs(list) do
          if sig.result == "pass" and sig.body_unsigned then
            sig.result = "policy"
            sig.reason = format("%d body octets after l= are unsigned", sig.body_unsigned)
          end
        end
      end
      results.dkim = list
      if o.dkim then
        if #list == 0 then count("dkim", "none") end
        for _, sig in ipairs(list) do count("dkim", sig.result) end
      end
    end
    if o.dmarc ~= "off" then
      local authors, why = dmarc.author_domains(head)
      local m
      if not authors then
        -- RFC 7489 6.6.1: no From domain, nothing to apply a policy to; but
        -- a From that cannot be checked (no field, an address whose domain
        -- cannot be read, authors too many to check) must not be a way
        -- around a policy: under enforce it is refused
        m = { result = "permerror", reason = why, disposition = "none", unchecked = true }
      else
        -- several authors: each domain's policy, the strictest applies
        -- (RFC 7489 6.6.1), so that a second address is no way around it
        local s = results.spf
        local dk = {}
        for _, sig in ipairs(results.dkim or {}) do
          if sig.domain and not sig.testing then dk[#dk + 1] = { result = sig.result, domain = lower(sig.domain) } end
        end
        m = dmarc.check_authors { dns = dns.default(), from_domains = authors,
          spf = s and s.domain and { result = s.result, domain = s.domain } or nil, dkim = dk }
      end
      results.dmarc = m
      count("dmarc", m.result)
    end
    if not o.dkim then results.dkim = nil end
    -- after the verification, which sees the message as it came: a
    -- signature may cover any field
    remove_forged(msg, head)
    if o.header then msg:prepend(ar_field(id, results)) end
    local m = results.dmarc
    if m and o.dmarc == "enforce" then
      if m.result == "temperror" and o.dmarc_temperror == "tempfail" then return DMARC_TEMPERROR end
      if m.unchecked then
        log.info("sender_auth: %s: DMARC: %s: refused", txn.id, m.reason)
        return hooks.reject(550, "5.7.1", "Cannot check the DMARC policy of this message: " .. m.reason)
      end
      local dis = m.disposition
      if dis == "reject" or dis == "quarantine" and o.dmarc_quarantine == "reject" then
        log.info("sender_auth: %s: DMARC %s for %s (policy %s): refused", txn.id, m.result, tostring(m.domain), dis)
        return hooks.reject(550, "5.7.1", format("Email from %s is refused by its domain's DMARC policy",
          gsub(m.domain or "?", "%c", "")))
      end
    end
    return nil
  end

  function block.attach(_, mta)
    id = o.authserv_id or mta.hostname or "localhost"
    counted = mta.metrics and mta.metrics:counter("sender_auth_results_total",
      "Results of the sender checks of inbound mail", { "method", "result" })
  end
  block.on = { smtp_server_mail_from = mail_from, smtp_server_message_received = message_received }
  return block
end

-- for the specs
_M.ar_field = ar_field
_M.spf_identity = spf_identity
_M.authserv_of = authserv_of

return _M
