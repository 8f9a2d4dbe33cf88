-- SPF (RFC 7208): may this host send mail for that domain?
--
--   local spf = require "moonpost.runtime.spf"
--   local res = spf.check_host {     -- in a task
--     dns = resolver,                -- a moonpost.runtime.dns resolver (its cache serves every lookup)
--     ip = "192.0.2.1",              -- the client; "::ffff:192.0.2.1" counts as IPv4 (RFC 7208 5)
--     sender = "user@example.org",   -- MAIL FROM; for <> the caller passes "postmaster@<helo>" (2.4)
--     helo = "mx.example.org",       -- for %{h}
--     domain = nil,                  -- the domain to check: by default the sender's
--     timeout = 20,                  -- seconds for the whole check (4.6.4); temperror past it
--     receiver = nil,                -- this host's name, for %{r} in explanations ("unknown")
--     explain = true,                -- false: no exp= explanation, and no DNS query for one (6.2);
--                                    -- for a caller that will not refuse the mail anyway
--   }
--   res.result       "pass" | "fail" | "softfail" | "neutral" | "none" | "temperror" | "permerror"
--   res.domain       the domain checked
--   res.mechanism    the term that decided, as written in the record ("ip4:192.0.2.0/24",
--                    "-all", "include:_spf.example.net"), "default" when none matched; nil
--                    for none and the errors
--   res.explanation  for fail, the domain's exp= text expanded (nil without one, 6.2), made
--                    fit for an SMTP reply and a header field: printable ASCII only (other
--                    bytes become spaces), no runs of spaces, at most 200 characters
--   res.reason       a short line saying why, for logs and Authentication-Results comments
--   res.local_part   true when a macro used the sender's local part (%{l} or %{s}): the result
--                    holds for this sender only, not for every sender of its domain
--
--   spf.parse(text)   -> record | nil, err   the syntax check of a "v=spf1 ..." record:
--       { directives = { { qualifier = "-", result = "fail", mechanism = "ip4", text = "-ip4:...",
--                          target = domain-spec | nil, network = "192.0.2.0" | nil,
--                          cidr4 = 24 | nil, cidr6 = 64 | nil } ... },
--         redirect = domain-spec | nil, exp = domain-spec | nil,
--         modifiers = { { name, value } ... } }   -- the unknown ones (6: ignored)
--   spf.expand(s, ctx) -> string | nil, err  the macro language (7) on a macro-string;
--       ctx = { sender, ip, helo, domain (default: the sender's), receiver, p, time,
--               explanation = true (allows %{c} %{r} %{t} and spaces, as exp= text does) }
--
-- Limits (4.6.4): 10 terms that query DNS (include, a, mx, ptr, exists,
-- redirect, and a first %{p}), 10 MX names per mx, the first 10 PTR names
-- per ptr, 2 void lookups (an answer of NXDOMAIN or no records), and the
-- time budget. Past any of the first three: permerror. Only the query a
-- term makes for itself can be a void one: the A/AAAA of a, the MX of mx,
-- the PTR of ptr (or of a %{p}), the TXT of include and redirect, the A of
-- exists. The address lookups of an mx's hosts and of the names a PTR
-- answer gives are not counted: an MX host without an AAAA is no error.
local uv = require "luv"
local net = require "moonpost.runtime.net"
local sched = require "moonpost.runtime.sched"

local byte, sub, find, match, gmatch, gsub, lower, format, concat, rep =
  string.byte, string.sub, string.find, string.match, string.gmatch, string.gsub, string.lower,
  string.format, table.concat, string.rep
local ipairs, type, tonumber, tostring, setmetatable, getmetatable, pcall, error =
  ipairs, type, tonumber, tostring, setmetatable, getmetatable, pcall, error

local _M = { _VERSION = "0.1" }

local MAX_TERMS = 10   -- DNS-querying terms per check (4.6.4)
local MAX_MX = 10      -- MX names an mx mechanism may look up (4.6.4)
local MAX_PTR = 10     -- PTR names a ptr mechanism or %{p} considers (4.6.4)
local MAX_VOID = 2     -- void lookups per check (4.6.4)
local MAX_EXPLANATION = 200 -- characters of an explanation (it goes into an SMTP reply)
local DEFAULT_TIMEOUT = 20

local RESULTS = { ["+"] = "pass", ["-"] = "fail", ["~"] = "softfail", ["?"] = "neutral" }
local MAPPED = rep("\0", 10) .. "\255\255"
local EMPTY = {}

-- ---- macros (7) ---------------------------------------------------------------------------

-- Letters, and those only exp= text may use (7.3).
local LETTERS = { s = true, l = true, o = true, d = true, i = true, p = true, v = true, h = true,
  c = "exp", r = "exp", t = "exp" }

-- scan(s, explain) -> parts, tail | nil, err. parts: literal strings and
-- macros { letter, url, digits, reverse, delims }; tail: the literal text
-- after the last macro-expand (nil when s ends with one), for the check of
-- a domain-spec's end. explain: exp= text (7.1: explain-string), where
-- spaces and c, r, t are allowed.
local function scan(s, explain)
  local parts, i, n, tail = {}, 1, #s, ""
  local bad = explain and "[^\32-\126]" or "[^\33-\126]"
  while i <= n do
    local j = find(s, "%", i, true)
    local chunk = sub(s, i, (j or n + 1) - 1)
    if find(chunk, bad) then
      return nil, format("invalid character %q in %q", match(chunk, bad), s)
    end
    if chunk ~= "" then
      parts[#parts + 1] = chunk
      tail = tail and tail .. chunk or chunk
    end
    if not j then break end
    local c = sub(s, j + 1, j + 1)
    if c == "%" or c == "_" or c == "-" then
      -- "%%", "%_" and "%-" are macro-expands too: a domain-spec may end with one
      parts[#parts + 1] = c == "%" and "%" or c == "_" and " " or "%20"
      tail = nil
      i = j + 2
    elseif c == "{" then
      local close = find(s, "}", j + 2, true)
      if not close then return nil, format("unterminated macro in %q", s) end
      local body = sub(s, j + 2, close - 1)
      local letter, digits, reverse, delims = match(body, "^(%a)(%d*)([rR]?)([%.%-%+,/_=]*)$")
      if not letter then return nil, format("invalid macro %%{%s}", body) end
      local l = lower(letter)
      if not LETTERS[l] then return nil, format("unknown macro letter in %%{%s}", body) end
      if LETTERS[l] == "exp" and not explain then
        return nil, format("%%{%s} is allowed only in exp= text (RFC 7208 7.3)", body)
      end
      -- 7.3: "If a DIGIT is specified, the value MUST be nonzero"
      if digits ~= "" and tonumber(digits) == 0 then return nil, format("zero parts in %%{%s}", body) end
      parts[#parts + 1] = { letter = l, url = letter ~= l, digits = tonumber(digits), reverse = reverse ~= "",
        delims = delims ~= "" and delims or nil }
      tail = nil
      i = close + 1
    else
      return nil, format("a '%%' not followed by '{', '%%', '_' or '-' in %q (RFC 7208 7.1)", s)
    end
  end
  return parts, tail
end

-- toplabel = ( *alphanum ALPHA *alphanum ) / ( 1*alphanum "-" *( alphanum / "-" ) alphanum )
local function toplabel(l)
  if find(l, "^%w+$") then return find(l, "%a") ~= nil end
  return find(l, "^%w[%w%-]*%w$") ~= nil
end

-- domain-spec = macro-string domain-end; domain-end = ( "." toplabel [ "." ] ) / macro-expand
local function domain_spec(s)
  if s == "" then return nil, "empty domain-spec" end
  local parts, tail = scan(s, false)
  if not parts then return nil, tail end
  if tail then
    local top = match((gsub(tail, "%.$", "", 1)), "%.([^.]*)$")
    if not top or not toplabel(top) then
      return nil, format("%q does not end with a macro or a top-level label (RFC 7208 7.1)", s)
    end
  end
  return parts
end

-- split(value, delims) -> parts, on any of the delimiter characters (empty parts kept)
local function split(value, delims)
  local class = "[" .. gsub(delims, "%p", "%%%0") .. "]"
  local out, i = {}, 1
  while true do
    local j = find(value, class, i)
    if not j then
      out[#out + 1] = sub(value, i)
      return out
    end
    out[#out + 1] = sub(value, i, j - 1)
    i = j + 1
  end
end

-- URL escaping for the upper-case letters (7.3): all but RFC 3986's unreserved
local function url_escape(s)
  return (gsub(s, "[^%w%-%._~]", function(c) return format("%%%02X", byte(c)) end))
end

local function macro_value(m, ctx, d)
  local l = m.letter
  local v
  -- the local part makes the result one of this sender, not of its domain
  if l == "l" or l == "s" then ctx.local_part = true end
  if l == "d" then
    v = d
  elseif l == "p" then
    v = ctx.p
    if type(v) == "function" then v = v(d) end
  elseif l == "t" then
    v = tostring(ctx.t)
  else
    v = ctx[l]
  end
  v = v or "unknown"
  if m.digits or m.reverse or m.delims then
    -- 7.3: split on the delimiters (default "."), reverse, keep the
    -- right-hand parts, join with "."
    local parts = split(v, m.delims or ".")
    if m.reverse then
      local k, n = 1, #parts
      while k < n do
        parts[k], parts[n] = parts[n], parts[k]
        k, n = k + 1, n - 1
      end
    end
    if m.digits and m.digits < #parts then
      local keep = {}
      for k = #parts - m.digits + 1, #parts do keep[#keep + 1] = parts[k] end
      parts = keep
    end
    v = concat(parts, ".")
  end
  if m.url then v = url_escape(v) end
  return v
end

local function expand_parts(parts, ctx, d)
  local out = {}
  for k, p in ipairs(parts) do
    out[k] = type(p) == "string" and p or macro_value(p, ctx, d)
  end
  return concat(out)
end

-- The name a domain-spec stands for (7.3): without the final dot, and, over
-- 253 octets, without as many labels on the left as it takes.
local function expand_domain(parts, ctx, d)
  local name = gsub(expand_parts(parts, ctx, d), "%.$", "")
  while #name > 253 do
    local dot = find(name, ".", 1, true)
    if not dot then break end
    name = sub(name, dot + 1)
  end
  return name
end

-- ---- addresses ----------------------------------------------------------------------------

-- RFC 5952 text, for %{c}
local function ip6_text(b)
  local g = {}
  for k = 1, 8 do g[k] = byte(b, 2 * k - 1) * 256 + byte(b, 2 * k) end
  local best, bestlen, run, runlen = nil, 1, nil, 0
  for k = 1, 8 do
    if g[k] == 0 then
      if not run then run, runlen = k, 0 end
      runlen = runlen + 1
      if runlen > bestlen then best, bestlen = run, runlen end
    else
      run = nil
    end
  end
  local function hex(from, to)
    local out = {}
    for k = from, to do out[#out + 1] = format("%x", g[k]) end
    return concat(out, ":")
  end
  if not best then return hex(1, 8) end
  return hex(1, best - 1) .. "::" .. hex(best + bestlen, 8)
end

-- client(ip) -> { bytes, v4, i, c, v, reverse } | nil
local function client(ip)
  local b = net.ip(ip)
  if not b then return nil end
  if #b == 16 and sub(b, 1, 12) == MAPPED then b = sub(b, 13) end
  if #b == 4 then
    local o1, o2, o3, o4 = byte(b, 1, 4)
    local dotted = format("%d.%d.%d.%d", o1, o2, o3, o4)
    return { bytes = b, v4 = true, i = dotted, c = dotted, v = "in-addr",
      reverse = format("%d.%d.%d.%d.in-addr.arpa", o4, o3, o2, o1) }
  end
  -- %{i} of IPv6 is its 32 nibbles, dot-separated (7.3)
  local nibbles = {}
  for k = 1, 16 do
    local o = byte(b, k)
    nibbles[#nibbles + 1] = format("%x", (o - o % 16) / 16)
    nibbles[#nibbles + 1] = format("%x", o % 16)
  end
  local rev = {}
  for k = 32, 1, -1 do rev[#rev + 1] = nibbles[k] end
  return { bytes = b, v4 = false, i = concat(nibbles, "."), c = ip6_text(b), v = "ip6",
    reverse = concat(rev, ".") .. ".ip6.arpa" }
end

-- The macro values of a check (7.3). 4.3: a sender without a local part is
-- postmaster's.
local function context(o, who)
  local sender = o.sender or ""
  local lp, od = match(sender, "^(.*)@([^@]*)$")
  if not lp then lp, od = "", sender end
  if lp == "" then lp = "postmaster" end
  od = gsub(od, "%.$", "")
  return { s = lp .. "@" .. od, l = lp, o = od, h = o.helo or "unknown", r = o.receiver or "unknown",
    i = who.i, c = who.c, v = who.v, t = o.time or os.time(), p = o.p }
end

-- ---- the record (4.6.1) -------------------------------------------------------------------

local function cidr(s, max)
  if not s then return nil end
  if s ~= "0" and not find(s, "^[1-9]%d*$") then return false end
  local n = tonumber(s)
  if n > max then return false end
  return n
end

-- ip4-network: four qnum, no leading zeros
local function ip4_network(s)
  local a, b, c, d = match(s, "^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if not a then return nil end
  for _, q in ipairs({ a, b, c, d }) do
    if (#q > 1 and sub(q, 1, 1) == "0") or tonumber(q) > 255 then return nil end
  end
  return net.ip(s)
end

local function ip6_network(s)
  if not find(s, ":", 1, true) or find(s, "[^%x:%.]") then return nil end
  local b = net.ip(s)
  return b and #b == 16 and b or nil
end

-- network(arg, kind) -> bytes, text, bits | nil, err   for ":<network>[/<bits>]"
local function network(arg, kind, term)
  local addr, slash = match(arg, "^:([^/]*)(.*)$")
  if not addr then return nil, format("%s needs an address: %q", kind, term) end
  local b = kind == "ip4" and ip4_network(addr) or kind == "ip6" and ip6_network(addr)
  if not b then return nil, format("not an %s network: %q", kind == "ip4" and "IPv4" or "IPv6", term) end
  local bits = #b * 8
  if slash ~= "" then
    bits = cidr(match(slash, "^/(%d+)$"), #b * 8)
    if not bits then return nil, format("bad prefix length in %q", term) end
  end
  return b, addr, bits
end

local DOMAIN_ARG = { include = "required", exists = "required", a = "optional", mx = "optional", ptr = "optional" }

local function parse_directive(term)
  local q = sub(term, 1, 1)
  local result = RESULTS[q]
  local body = term
  if result then body = sub(term, 2) else q, result = "+", "pass" end
  local name, arg = match(body, "^(%a%w*)(.*)$")
  local mech = name and lower(name)
  local d = { qualifier = q, result = result, mechanism = mech, text = term }
  if mech == "all" then
    if arg ~= "" then return nil, format("\"all\" takes no argument: %q", term) end
  elseif mech == "ip4" or mech == "ip6" then
    local b, text, bits = network(arg, mech, term)
    if not b then return nil, text end
    d.net, d.network = b, text
    if mech == "ip4" then d.cidr4 = bits else d.cidr6 = bits end
  elseif DOMAIN_ARG[mech] then
    if mech == "a" or mech == "mx" then
      -- dual-cidr-length, from the end: a domain-spec may hold "/" too
      local rest, c6 = match(arg, "^(.-)//(%d+)$")
      if rest then arg = rest end
      local rest4, c4 = match(arg, "^(.-)/(%d+)$")
      if rest4 then arg = rest4 end
      d.cidr4, d.cidr6 = cidr(c4, 32), cidr(c6, 128)
      if d.cidr4 == false or d.cidr6 == false then return nil, format("bad prefix length in %q", term) end
    end
    if arg ~= "" then
      local spec = match(arg, "^:(.*)$")
      if not spec then return nil, format("unknown mechanism %q", term) end
      local parts, err = domain_spec(spec)
      if not parts then return nil, format("%s: %s", term, err) end
      d.target, d.target_parts = spec, parts
    elseif DOMAIN_ARG[mech] == "required" then
      return nil, format("%s needs a domain: %q", mech, term)
    end
  else
    return nil, format("unknown mechanism %q", term)
  end
  return d
end

function _M.parse(text)
  if type(text) ~= "string" then return nil, "an SPF record is a string" end
  local rest = match(text, "^[vV]=[sS][pP][fF]1(.*)$")
  if not rest or (rest ~= "" and sub(rest, 1, 1) ~= " ") then
    return nil, "not an SPF record: it does not begin with \"v=spf1\""
  end
  local rec = { directives = {}, modifiers = {} }
  -- terms are separated by spaces, and spaces only (4.6.1): a tab is part of a term
  for term in gmatch(rest, "[^ ]+") do
    local name, value = match(term, "^(%a[%w%-_%.]*)=(.*)$")
    if name then
      local known = lower(name)
      if known == "redirect" or known == "exp" then
        if rec[known] then return nil, format("%s= appears twice (RFC 7208 6)", known) end
        local parts, err = domain_spec(value)
        if not parts then return nil, format("%s: %s", term, err) end
        rec[known], rec[known .. "_parts"] = value, parts
      else
        local parts, err = scan(value, false)
        if not parts then return nil, format("%s: %s", term, err) end
        rec.modifiers[#rec.modifiers + 1] = { name = name, value = value }
      end
    else
      local d, err = parse_directive(term)
      if not d then return nil, err end
      rec.directives[#rec.directives + 1] = d
    end
  end
  return rec
end

function _M.expand(s, ctx)
  if type(s) ~= "string" or type(ctx) ~= "table" then error("spf.expand(string, ctx)", 2) end
  local who = client(ctx.ip or "0.0.0.0")
  if not who then return nil, format("not an IP address: %q", tostring(ctx.ip)) end
  local parts, err = scan(s, ctx.explanation)
  if not parts then return nil, err end
  local c = context(ctx, who)
  return expand_parts(parts, c, gsub(ctx.domain or c.o, "%.$", ""))
end

-- ---- evaluation ---------------------------------------------------------------------------

-- An evaluation ends early (a limit, a DNS error, a syntax error) by
-- raising one of these from wherever it is found, however deep in include
-- and redirect; check_host() turns it into the result. Any other error is
-- a bug and goes on up.
local Stop = {}
local function stop(result, reason)
  error(setmetatable({ result = result, reason = reason }, Stop), 0)
end

local function now()
  return uv.hrtime() / 1e9
end

-- A name DNS can carry: labels of 1 to 63 octets, 253 in all. Another
-- (from a macro expansion, most often) names nothing, and is not asked.
local function dns_name(name)
  if #name == 0 or #name > 253 then return false end
  for label in gmatch(name .. ".", "([^.]*)%.") do
    if #label == 0 or #label > 63 then return false end
  end
  return true
end

-- 4.3: a domain that is malformed, or not a multi-label one, gets "none";
-- so does an address literal ("[192.0.2.1]" as HELO name).
local function valid_domain(d)
  return dns_name(d) and find(d, ".", 1, true) ~= nil and not find(d, "^%[")
end

-- ask(st, name, rtype) -> records | nil, status: the resolver's query, in
-- a task of its own so that this one waits no longer than the budget.
local function ask(st, name, rtype)
  local left = st.deadline - now()
  if left <= 0 then stop("temperror", format("the check took longer than %g s (RFC 7208 4.6.4)", st.timeout)) end
  local task, token = sched.reserve()
  local r = st.dns
  sched.spawn(function()
    local ok, recs, status = pcall(r.query, r, name, rtype)
    if not ok then recs, status = nil, "error: " .. tostring(recs) end
    sched.wake_token(task, token, recs, status)
  end)
  local recs, status = sched.wait(left)
  if recs == nil and status == "timeout" and now() >= st.deadline then
    stop("temperror", format("the check took longer than %g s (RFC 7208 4.6.4)", st.timeout))
  end
  return recs, status
end

-- lookup(st, name, rtype, lenient, secondary) -> records (EMPTY for a void
-- lookup) | nil, status for a DNS error when lenient (ptr, 5.5); otherwise
-- a DNS error is a temperror (5). A void answer counts (4.6.4 limits the
-- terms whose query is void) unless secondary: the address lookups of an
-- mx's hosts and of the PTR names being validated are no term's own query,
-- and one of several MX hosts without an AAAA is normal, not abuse (pyspf
-- counts them). The exp= lookup is no term's either and does not count.
local function lookup(st, name, rtype, lenient, secondary)
  if not dns_name(name) then return EMPTY end
  local recs, status = ask(st, name, rtype)
  if recs then return recs end
  if status == "nxdomain" or status == "nodata" then
    if secondary then return EMPTY end
    st.voids = st.voids + 1
    if st.voids > MAX_VOID then
      stop("permerror", format("more than %d void DNS lookups, the last %s %s (RFC 7208 4.6.4)", MAX_VOID, rtype, name))
    end
    return EMPTY
  end
  if lenient then return nil, status end
  stop("temperror", format("DNS lookup of %s %s failed: %s", rtype, name, tostring(status)))
end

local function count_term(st, what, domain)
  st.terms = st.terms + 1
  if st.terms > MAX_TERMS then
    stop("permerror", format("more than %d DNS-querying terms, the last %q in the record of %s (RFC 7208 4.6.4)",
      MAX_TERMS, what, domain))
  end
end

local function norm(name)
  return lower((gsub(name, "%.$", "")))
end

local function any_address(st, recs, d)
  local bits = st.who.v4 and (d.cidr4 or 32) or (d.cidr6 or 128)
  local mine = net.mask(st.who.bytes, bits)
  for _, r in ipairs(recs) do
    local b = net.ip(r.data)
    if b and #b == #mine and net.mask(b, bits) == mine then return true end
  end
  return false
end

-- The client's validated names (5.5): the names its PTR records give (the
-- first 10) whose addresses include it. A DNS error leaves a name out
-- (or all of them, for the PTR query). Asked once per check; a void PTR
-- answer counts (4.6.4), a void address lookup does not.
local function validated_names(st)
  if st.ptr_names then return st.ptr_names end
  local names = {}
  local ptrs = lookup(st, st.who.reverse, "PTR", true)
  if ptrs then
    local rtype = st.who.v4 and "A" or "AAAA"
    for k = 1, math.min(#ptrs, MAX_PTR) do
      local name = norm(ptrs[k].data)
      local addrs = lookup(st, name, rtype, true, true)
      for _, a in ipairs(addrs or EMPTY) do
        if net.ip(a.data) == st.who.bytes then
          names[#names + 1] = name
          break
        end
      end
    end
  end
  st.ptr_names = names
  return names
end

-- %{p} (7.3): the domain itself among the validated names, else one of its
-- subdomains, else any, else "unknown". Its PTR query counts as a DNS term
-- (4.6.4), once per check.
local function p_macro(st, d)
  if not st.p_counted then
    st.p_counted = true
    count_term(st, "%{p}", d)
  end
  local names = validated_names(st)
  d = norm(d)
  for _, n in ipairs(names) do
    if n == d then return n end
  end
  for _, n in ipairs(names) do
    if sub(n, -#d - 1) == "." .. d then return n end
  end
  return names[1] or "unknown"
end

local check_domain -- (below: include and redirect call it again)

local function matches(st, d, domain)
  local mech = d.mechanism
  if mech == "all" then return true end
  if mech == "ip4" then return st.who.v4 and net.mask(st.who.bytes, d.cidr4) == net.mask(d.net, d.cidr4) end
  if mech == "ip6" then
    return not st.who.v4 and net.mask(st.who.bytes, d.cidr6) == net.mask(d.net, d.cidr6)
  end
  count_term(st, d.text, domain)
  local target = d.target_parts and expand_domain(d.target_parts, st.ctx, domain) or domain
  if mech == "include" then
    -- 5.2: pass matches; fail, softfail, neutral do not; none is a
    -- permerror; temperror and permerror have stopped the check already
    local v = check_domain(st, target)
    if v.result == "none" then
      stop("permerror", format("%s: %s: %s has no SPF record (RFC 7208 5.2)", domain, d.text, target))
    end
    return v.result == "pass"
  elseif mech == "a" then
    return any_address(st, lookup(st, target, st.who.v4 and "A" or "AAAA"), d)
  elseif mech == "mx" then
    local mxs = lookup(st, target, "MX")
    if #mxs > MAX_MX then
      stop("permerror", format("%s: %s: %s has %d MX records, more than %d (RFC 7208 4.6.4)", domain, d.text, target,
        #mxs, MAX_MX))
    end
    -- no implicit MX (5.4); a null MX (RFC 7505) names no host
    for _, mx in ipairs(mxs) do
      if mx.data ~= "" and any_address(st, lookup(st, mx.data, st.who.v4 and "A" or "AAAA", false, true), d) then
        return true
      end
    end
    return false
  elseif mech == "ptr" then
    target = norm(target)
    for _, n in ipairs(validated_names(st)) do
      if n == target or sub(n, -#target - 1) == "." .. target then return true end
    end
    return false
  elseif mech == "exists" then
    -- an A query, whatever the client's address family (5.7)
    return #lookup(st, target, "A") > 0
  end
  error("spf: no evaluation for mechanism " .. tostring(mech))
end

-- check_domain(st, domain) -> { result, domain, term, record }: check_host()
-- for one domain (4), the top one or an include's or a redirect's.
function check_domain(st, domain)
  if not valid_domain(domain) then
    return { result = "none", domain = domain, why = format("%q is not a valid domain name (RFC 7208 4.3)", domain) }
  end
  local found
  for _, r in ipairs(lookup(st, domain, "TXT")) do
    local t = r.data
    -- 4.5: "v=spf1" and then a space or the end; TXT strings are joined
    -- without spaces (3.3), as the resolver gives them
    if lower(sub(t, 1, 6)) == "v=spf1" and (#t == 6 or sub(t, 7, 7) == " ") then
      if found then stop("permerror", format("%s has more than one SPF record (RFC 7208 4.5)", domain)) end
      found = t
    end
  end
  if not found then return { result = "none", domain = domain, why = domain .. " has no SPF record" } end
  local rec, err = _M.parse(found)
  if not rec then stop("permerror", format("%s: %s", domain, err)) end
  for _, d in ipairs(rec.directives) do
    if matches(st, d, domain) then return { result = d.result, domain = domain, term = d.text, record = rec } end
  end
  if rec.redirect then
    -- 6.1: only when no mechanism matched (so never past an "all")
    count_term(st, "redirect=" .. rec.redirect, domain)
    local target = expand_domain(rec.redirect_parts, st.ctx, domain)
    local v = check_domain(st, target)
    if v.result == "none" then
      stop("permerror", format("%s: redirect=%s: %s (RFC 7208 6.1)", domain, rec.redirect, v.why))
    end
    return v
  end
  return { result = "neutral", domain = domain, term = "default", record = rec }
end

-- clean(text) -> text | nil: an explanation fit for an SMTP reply and a
-- header field. Its literal text is printable ASCII (scan() checks), but the
-- macros bring in what the client chose (%{l}, %{s}, %{h}) or its DNS did
-- (%{p}): every other byte becomes a space (a CR LF would end the reply),
-- runs of spaces become one, and it is cut at MAX_EXPLANATION characters.
local function clean(text)
  text = gsub(gsub(text, "[^\32-\126]", " "), "  +", " ")
  text = match(text, "^ ?(.-) ?$")
  if #text > MAX_EXPLANATION then text = match(sub(text, 1, MAX_EXPLANATION), "^(.-) ?$") end
  if text == "" then return nil end
  return text
end

-- The explanation of a fail (6.2): the TXT record exp= names, expanded with
-- the record's domain; any problem (DNS, more or fewer than one record, its
-- syntax: a byte other than printable ASCII in its text too) leaves it out.
-- Its lookup is not a DNS term nor a void one.
local function explain(st, v)
  local rec = v.record
  if not rec or not rec.exp then return nil end
  local ok, text = pcall(function()
    local name = expand_domain(rec.exp_parts, st.ctx, v.domain)
    if not dns_name(name) then return nil end
    local recs = ask(st, name, "TXT")
    if not recs or #recs ~= 1 then return nil end
    local parts = scan(recs[1].data, true)
    return parts and clean(expand_parts(parts, st.ctx, v.domain))
  end)
  if ok then return text end
  if getmetatable(text) ~= Stop then error(text, 0) end
  return nil
end

function _M.check_host(opts)
  if type(opts) ~= "table" or type(opts.dns) ~= "table" then
    error("spf.check_host: opts.dns (a resolver) is required", 2)
  end
  if not sched.current() then error("spf.check_host() outside a task", 2) end
  local who = client(opts.ip)
  if not who then error(format("spf.check_host: not an IP address: %q", tostring(opts.ip)), 2) end
  local st = { dns = opts.dns, who = who, terms = 0, voids = 0, timeout = opts.timeout or DEFAULT_TIMEOUT }
  st.deadline = now() + st.timeout
  local ctx = context(opts, who)
  ctx.p = function(d) return p_macro(st, d) end
  st.ctx = ctx
  local domain = gsub(opts.domain or ctx.o, "%.$", "")
  local ok, v = pcall(check_domain, st, domain)
  if not ok then
    if getmetatable(v) ~= Stop then error(v, 0) end
    return { result = v.result, domain = domain, reason = v.reason, local_part = ctx.local_part }
  end
  local res = { result = v.result, domain = domain }
  if v.result == "none" then
    res.reason = v.why
    res.local_part = ctx.local_part
    return res
  end
  res.mechanism = v.term
  if v.term == "default" then
    res.reason = format("%s: no mechanism matched %s (RFC 7208 4.7)", v.domain, who.c)
  else
    res.reason = format("%s: %s matched %s", v.domain, v.term, who.c)
  end
  -- explain = false: nobody will read it, so no query for it either
  if v.result == "fail" and opts.explain ~= false then res.explanation = explain(st, v) end
  res.local_part = ctx.local_part
  return res
end

return _M
