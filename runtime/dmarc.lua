-- DMARC (RFC 7489): the RFC5322.From domain of a message, organizational
-- domains by the Public Suffix List, DMARC records, and the verdict for a
-- message from its SPF and DKIM results.
--
--   local dmarc = require "moonpost.runtime.dmarc"
--   local domain, why = dmarc.from_domain(head)      -- "example.org" | nil, reason
--   local domains, why = dmarc.author_domains(head)  -- { "example.org", ... } | nil, reason
--   dmarc.org_domain("a.b.example.co.uk")            -- "example.co.uk"
--   dmarc.load_psl(path)                             -- true | nil, err
--   local rec, err = dmarc.parse("v=DMARC1; p=reject")
--   local res = dmarc.check {                        -- in a task
--     dns = resolver,                                -- (default: dns.default())
--     from_domain = domain,
--     spf = { result = "pass", domain = "bounce.example.org" },     -- or nil
--     dkim = { { result = "pass", domain = "example.org" }, ... },  -- or {}
--     random = nil,                                  -- function() -> [0, 1), for pct
--   }
--   local res = dmarc.check_authors { ..., from_domains = domains }  -- the strictest
--
-- from_domain(head) takes a header section (CRLF or LF line ends, folded
-- lines) and returns the domain of its one From address, lower case, in
-- A-labels; or nil and "no From header" | "several From headers" |
-- "several addresses in From" | "no domain in From" (also for an empty
-- group, a domain literal, or a name that has no ASCII form).
--
-- author_domains(head) returns the distinct domains of every address of
-- every From field (lower case, A-labels, in the order they appear), or
-- nil and "no From header" | "no domain in From" (no address at all) |
-- "an author address without a usable domain" (a domain literal, a stray
-- byte: such an address may be what the reader sees, so it is not passed
-- over for the others) | "too many author domains" (more than 8).
-- Addresses are what a reader could
-- take for one: each angle-addr ("<a@x> <b@y>" is two), a bare addr-spec,
-- and a display name or group name that holds an "@" outside quotes
-- ("ceo@bank.example <x@evil.example>" is both).
--
-- org_domain(domain) is the public suffix of the domain and one label more
-- (the domain itself when it is a public suffix), lower case, in A-labels
-- ("a.b.example.co.uk" -> "example.co.uk"). The list is read once,
-- on first use, from /usr/share/publicsuffix/public_suffix_list.dat unless
-- load_psl(path) was called. Without a list (a warning is logged once) it
-- is the domain itself: only identical domains align, and check() still
-- looks for the policy of a subdomain's parent at its ancestors (the
-- DMARCbis tree walk: from the last 7 labels down to 2, at most 6 names).
--
-- parse(text) returns { v, p, sp, adkim, aspf, pct, rua, ruf, fo, rf, ri }
-- with the defaults of RFC 7489 6.3 filled in (rua and ruf are lists of
-- URIs, nil when absent), or nil and an error. A known tag with a value it
-- cannot have takes its default; unknown tags are ignored. A record whose
-- p (or sp) is missing or not valid reads as p=none, sp=none when it has a
-- reporting URI in rua, and is an error otherwise (6.6.3).
--
-- check(opts) returns { result, policy, disposition, domain, org_domain,
-- record_domain, record, spf_aligned, dkim_aligned, reason }: result is
-- "pass" | "fail" | "none" | "temperror" | "permerror"; policy the p (or sp)
-- that applies; disposition what to do with the message: the policy for a
-- failing message, one step milder when pct sampled it out (6.6.4), and
-- "none" for every other result. No record (NXDOMAIN, NODATA, no TXT
-- record that starts "v=DMARC1") or several is "none"; any other DNS
-- failure is "temperror"; a record that parse() refuses, or no from_domain,
-- "permerror". spf_aligned and dkim_aligned are false without a record.
--
-- check_authors(opts) takes the opts of check() with from_domains (a list,
-- as author_domains() gives it) for from_domain, checks each domain, and
-- returns the strictest result (RFC 7489 6.6.1, several authors): the
-- strictest disposition (reject > quarantine > none), then the strictest
-- result (fail > temperror > permerror > none > pass), then the first. It
-- is a copy of that domain's check() result with two fields more: domains
-- (the list) and each (the check() result of every domain, in order). An
-- empty list is check() without a from_domain: a permerror.
local dns = require "moonpost.runtime.dns"
local log = require "moonpost.runtime.log"

local find, sub, byte, lower, match, gsub, gmatch =
  string.find, string.sub, string.byte, string.lower, string.match, string.gsub, string.gmatch
local tonumber, type, ipairs, pairs, next = tonumber, type, ipairs, pairs, next

local _M = { _VERSION = "0.1" }

local PSL_PATH = "/usr/share/publicsuffix/public_suffix_list.dat"

-- ---- the RFC5322.From domain ----------------------------------------------

local headers -- moonpost.runtime.headers, on first use

-- The domain of one address, from its tokens (kinds and texts in pairs
-- first..last): what follows the last "@", atoms and dots joined.
local function address_domain(t, first, last)
  local at
  for i = last - 1, first, -2 do
    if t[i] == "@" then at = i break end
  end
  if not at then return nil end
  local parts = {}
  for i = at + 2, last, 2 do
    local kind = t[i]
    if kind == "w" then parts[#parts + 1] = t[i + 1]
    elseif kind == "." then parts[#parts + 1] = "."
    else return nil -- a domain literal or a stray special
    end
  end
  return table.concat(parts)
end

-- The addresses of an address list (RFC 5322 3.4, with the obsolete forms
-- of 4.4): each is the tokens of an angle-addr or of a bare addr-spec.
-- Empty list elements are no addresses. A display name, or a group's
-- name, is skipped unless it has an "@" (outside quotes and comments):
-- then it is no valid name, and some reader may take it for the address
-- ("ceo@bank.example <x@evil.example>"), so it counts as one more. An
-- element with two angle-addrs ("<a@x> <b@y>", no comma between) is two
-- addresses too: where readers disagree on the author, every candidate
-- is an author (the verdict takes the strictest, RFC 7489 6.6.1).
local function addresses(value)
  headers = headers or require "moonpost.runtime.headers"
  local t = headers.tokens(value)
  local out = {}
  local first, angled = 1, false -- start of the current run of tokens; whether its element had an angle-addr
  local i, n = 1, #t
  local function add(a, b, from_name)
    if b >= a then out[#out + 1] = { a, b, name = from_name } end
  end
  -- the tokens first..last around angle-addrs, or before a group's ":"
  local function name(last)
    for k = first, last, 2 do
      if t[k] == "@" then return add(first, last, true) end
    end
  end
  while i <= n do
    local kind = t[i]
    if kind == "<" then
      name(i - 1)
      -- an angle-addr; an obsolete route ("<@a,@b:user@host>") ends at ":"
      local j, start = i + 2, i + 2
      while j <= n and t[j] ~= ">" do
        if t[j] == ":" then start = j + 2 end
        j = j + 2
      end
      add(start, j - 1)
      angled = true
      i = j + 2
      first = i
    elseif kind == ":" then
      name(i - 1)
      first = i + 2 -- a group: its members follow
      angled = false
      i = i + 2
    elseif kind == "," or kind == ";" then
      if angled then name(i - 1) else add(first, i - 1) end
      first, angled = i + 2, false
      i = i + 2
    else
      i = i + 2
    end
  end
  if angled then name(n) else add(first, n) end
  return out, t
end

-- The domain of an address as DMARC looks it up: lower case, in A-labels,
-- without a final dot; nil when it has none that is a host name.
local function domain_of(t, a)
  local domain = address_domain(t, a[1], a[2])
  if not domain then return nil end
  domain = dns.to_ascii((gsub(domain, "%.$", "")))
  if not domain or not dns.is_name(domain) then return nil end
  return domain
end

-- The From fields of a header section.
local function from_fields(head)
  headers = headers or require "moonpost.runtime.headers"
  -- the header reader splits at CRLF: bare LF line ends are made CRLF
  if find(head, "[^\r]\n") or byte(head, 1) == 10 then head = gsub(head, "\r?\n", "\r\n") end
  return headers.find(head, "from")
end

function _M.from_domain(head)
  local fields = from_fields(head)
  if #fields == 0 then return nil, "no From header" end
  if #fields > 1 then return nil, "several From headers" end
  local list, t = addresses(fields[1].value)
  -- a name that repeats the address's domain ("joe@example.org
  -- <joe@example.org>", as some mailers write it) names no other author
  local real = {}
  for _, a in ipairs(list) do
    if not a.name then real[#real + 1] = a end
  end
  if #real == 0 then real = list end
  if #real > 1 then return nil, "several addresses in From" end
  local domain = real[1] and domain_of(t, real[1])
  for _, a in ipairs(list) do
    if a ~= real[1] and domain_of(t, a) ~= domain then return nil, "several addresses in From" end
  end
  if not domain then return nil, "no domain in From" end
  return domain
end

-- More author domains than this is no mail anyone sends, and would cost a
-- DNS lookup or two each.
local MAX_AUTHOR_DOMAINS = 8

function _M.author_domains(head)
  local fields = from_fields(head)
  if #fields == 0 then return nil, "no From header" end
  local list, seen = {}, {}
  for _, field in ipairs(fields) do
    local addrs, t = addresses(field.value)
    for _, a in ipairs(addrs) do
      local domain = domain_of(t, a)
      -- an address whose domain cannot be read (a stray byte, a control
      -- character, a literal) may still be shown to the reader as the
      -- author: passing over it would let it past the policy
      if not domain then return nil, "an author address without a usable domain" end
      if not seen[domain] then
        if #list == MAX_AUTHOR_DOMAINS then return nil, "too many author domains" end
        seen[domain] = true
        list[#list + 1] = domain
      end
    end
  end
  if #list == 0 then return nil, "no domain in From" end
  return list
end

-- ---- organizational domains -------------------------------------------------

-- The rules, keyed by the suffix they name: "example.co.uk" is found by
-- looking up "example.co.uk", "co.uk" and "uk" (at most one lookup per
-- label). "*.ck" is kept as wild["ck"], "!www.ck" as except["www.ck"].
local psl -- { exact, wild, except } | false when there is no list

-- load_psl(path) -> true | nil, err. Both sections of the list are read:
-- ICANN's suffixes and the PRIVATE ones (blogspot.com, github.io, ...),
-- as most receivers do, so that two customers of one hosting name are two
-- organizations. Rules in Unicode are kept by their A-labels, which is
-- how domains reach org_domain().
function _M.load_psl(path)
  local f, err = io.open(path or PSL_PATH, "rb")
  if not f then return nil, err end
  local text = f:read("*a")
  f:close()
  local exact, wild, except = {}, {}, {}
  for line in gmatch(text, "[^\n]+") do
    -- a rule runs up to the first space; "//" starts a comment
    local kind, rule = match(line, "^%s*([!]?)([^%s/][^%s]*)")
    if rule then
      if kind == "" and find(rule, "^%*%.") then kind, rule = "*", sub(rule, 3) end
      if find(rule, "[\128-\255]") then
        rule = dns.to_ascii(rule)
      else
        rule = lower(rule)
      end
      if rule then
        local into = kind == "!" and except or kind == "*" and wild or exact
        into[rule] = true
      end
    end
  end
  if not next(exact) and not next(wild) then return nil, (path or PSL_PATH) .. ": no rules" end
  psl = { exact = exact, wild = wild, except = except }
  return true
end

local function load_default()
  local ok, err = _M.load_psl(PSL_PATH)
  if not ok then
    psl = false
    -- (the last two labels would be wrong for a.co.uk and b.co.uk, and
    -- make them one organization: relaxed alignment would pass between
    -- strangers. Without a list only identical domains align.)
    log.warn("dmarc: no public suffix list (%s): only identical domains align", err)
  end
end

-- The public suffix of a domain (PSL algorithm): an exception rule wins,
-- then the longest rule that matches, else the last label ("*").
local function public_suffix(domain)
  local exact, wild, except = psl.exact, psl.wild, psl.except
  -- starts[k] is where the k-th longest suffix begins
  local starts, k, pos = { 1 }, 1, 1
  while true do
    local dot = find(domain, ".", pos, true)
    if not dot then break end
    k = k + 1
    starts[k] = dot + 1
    pos = dot + 1
  end
  for j = 1, k do
    local s = sub(domain, starts[j])
    if except[s] then return starts[j + 1] and sub(domain, starts[j + 1]) or s end
  end
  for j = 1, k do
    local s = sub(domain, starts[j])
    if exact[s] or (j < k and wild[sub(domain, starts[j + 1])]) then return s, j end
  end
  return sub(domain, starts[k]), k
end

local function normal(domain)
  domain = gsub(domain, "%.$", "")
  if find(domain, "[\128-\255]") then return dns.to_ascii(domain) or lower(domain) end
  return lower(domain)
end

function _M.org_domain(domain)
  domain = normal(domain)
  if psl == nil then load_default() end
  if not psl then return domain end
  local suffix = public_suffix(domain)
  if #suffix >= #domain then return domain end
  -- the suffix and the label before it
  return match(sub(domain, 1, #domain - #suffix - 1), "[^.]*$") .. "." .. suffix
end

-- ---- records ---------------------------------------------------------------

local POLICY = { none = true, quarantine = true, reject = true }
local ALIGN = { r = true, s = true }

-- The URIs of rua or ruf (6.4: URIs, each with an optional "!size"), or
-- nil when none is valid.
local function uris(value)
  local list
  for item in gmatch(value, "[^,]+") do
    local uri = match(item, "^%s*(.-)%s*$")
    local u, size = match(uri, "^([^!]*)(.*)$")
    if find(u, "^%a[%w+.-]*:%S+$") and (size == "" or find(size, "^!%d+[kmgtKMGT]?$")) then
      list = list or {}
      list[#list + 1] = uri
    end
  end
  return list
end

-- A colon-separated list whose items all match item (fo, rf), spaces
-- removed; nil when one does not.
local function colon_list(value, item)
  if not value then return nil end
  value = gsub(lower(value), "%s", "")
  local rest = gsub(value .. ":", item .. ":", "")
  if rest ~= "" or value == "" then return nil end
  return value
end

function _M.parse(text)
  if type(text) ~= "string" then return nil, "not a string" end
  -- v first, exactly DMARC1 (6.4 spells it case-sensitively)
  local v, rest = match(text, "^%s*[vV]%s*=%s*(DMARC1)%s*(.*)$")
  if not v or (rest ~= "" and byte(rest, 1) ~= 59) then return nil, "not a DMARC1 record" end
  local tags = {}
  for part in gmatch(rest, "[^;]+") do
    local name, value = match(part, "^%s*([%w_]+)%s*=%s*(.-)%s*$")
    -- (a part that is no tag=value is passed over, like an unknown tag:
    -- refusing the record for it would drop the owner's policy)
    if name then
      name = lower(name)
      if tags[name] == nil then tags[name] = value end
    end
  end
  local rec = { v = "DMARC1" }
  rec.rua = tags.rua and uris(tags.rua)
  rec.ruf = tags.ruf and uris(tags.ruf)
  local p, sp = tags.p and lower(tags.p), tags.sp and lower(tags.sp)
  if not POLICY[p] or (sp and not POLICY[sp]) then
    -- 6.6.3: such a record still asks for reports, and acts as p=none
    if not rec.rua then return nil, p and POLICY[p] and "bad sp" or (p and "bad p" or "no p") end
    p, sp = "none", "none"
  end
  rec.p, rec.sp = p, sp or p
  local adkim, aspf = tags.adkim and lower(tags.adkim), tags.aspf and lower(tags.aspf)
  rec.adkim = ALIGN[adkim] and adkim or "r"
  rec.aspf = ALIGN[aspf] and aspf or "r"
  local pct = tags.pct and match(tags.pct, "^%d%d?%d?$") and tonumber(tags.pct)
  rec.pct = pct and pct <= 100 and pct or 100
  rec.fo = colon_list(tags.fo, "[01ds]") or "0"
  rec.rf = colon_list(tags.rf, "%a[%w]*") or "afrf"
  local ri = tags.ri and match(tags.ri, "^%d+$") and tonumber(tags.ri)
  rec.ri = ri or 86400
  return rec
end

-- ---- the verdict -----------------------------------------------------------

-- The DMARC records of a domain: "found", text | "none" | "several" |
-- "temperror", status. Other TXT records are no DMARC records (6.6.3).
local function discover(resolver, name)
  local records, status = resolver:query(name, "TXT")
  if not records then
    if status == "nxdomain" or status == "nodata" then return "none" end
    return "temperror", status
  end
  local found
  for _, r in ipairs(records) do
    if find(r.data, "^%s*[vV]%s*=%s*DMARC1%s*;") or find(r.data, "^%s*[vV]%s*=%s*DMARC1%s*$") then
      if found then return "several" end
      found = r.data
    end
  end
  if not found then return "none" end
  return "found", found
end

local function aligned(a, b, mode)
  if not a or a == "" then return false end
  a, b = normal(a), normal(b)
  if a == b then return true end
  return mode == "r" and _M.org_domain(a) == _M.org_domain(b)
end

-- Ancestors looked at for a policy without a suffix list: as DMARCbis's
-- tree walk, a name of more labels is first cut to its last MAX_WALK, then
-- one label at a time down to two; a name of many labels (which need not
-- exist) still reaches the organization's own
local MAX_WALK = 7

local MILDER = { reject = "quarantine", quarantine = "none", none = "none" }

function _M.check(opts)
  local resolver = opts.dns or dns.default()
  local random = opts.random or math.random
  local res = { result = "none", disposition = "none", spf_aligned = false, dkim_aligned = false }
  if type(opts.from_domain) ~= "string" or opts.from_domain == "" then
    res.result, res.reason = "permerror", "no From domain"
    return res
  end
  local domain = normal(opts.from_domain)
  local org = _M.org_domain(domain)
  res.domain, res.org_domain = domain, org

  -- where to look when the From domain has no record (6.6.3): the
  -- organization's; without a list that is the domain itself, and the
  -- policy of a subdomain's parent would be lost, so its ancestors, from
  -- the last MAX_WALK labels (or the parent) down to the last two (a
  -- record found there is a policy; alignment stays exact)
  local parents = {}
  if org ~= domain then
    parents[1] = org
  elseif not psl then
    local labels = {}
    for l in gmatch(domain, "[^.]+") do labels[#labels + 1] = l end
    local n = #labels
    for k = math.min(n - 1, MAX_WALK), 2, -1 do
      parents[#parents + 1] = table.concat(labels, ".", n - k + 1, n)
    end
  end

  local name = "_dmarc." .. domain
  local state, text = discover(resolver, name)
  for _, parent in ipairs(parents) do
    if state ~= "none" then break end
    name = "_dmarc." .. parent
    state, text = discover(resolver, name)
  end
  if state == "temperror" then
    res.result, res.reason = "temperror", name .. ": " .. tostring(text)
    return res
  elseif state == "several" then
    res.reason = name .. ": several DMARC records"
    return res
  elseif state == "none" then
    res.reason = "no DMARC record"
    return res
  end

  res.record_domain = name
  local rec, err = _M.parse(text)
  if not rec then
    res.result, res.reason = "permerror", name .. ": " .. err
    return res
  end
  res.record = rec
  res.policy = (name ~= "_dmarc." .. domain) and rec.sp or rec.p

  local spf = opts.spf
  res.spf_aligned = spf ~= nil and spf.result == "pass" and aligned(spf.domain, domain, rec.aspf)
  for _, sig in ipairs(opts.dkim or {}) do
    if sig.result == "pass" and aligned(sig.domain, domain, rec.adkim) then
      res.dkim_aligned = true
      break
    end
  end
  if res.spf_aligned or res.dkim_aligned then
    res.result = "pass"
    res.reason = res.dkim_aligned and (res.spf_aligned and "SPF and DKIM aligned" or "DKIM aligned")
      or "SPF aligned"
    return res
  end

  res.result = "fail"
  local policy = res.policy
  -- 6.6.4: pct of the failing messages get the policy, the rest the
  -- next milder one
  if rec.pct >= 100 or random() * 100 < rec.pct then
    res.disposition = policy
    res.reason = "no aligned pass; p=" .. policy
  else
    res.disposition = MILDER[policy]
    res.reason = "no aligned pass; p=" .. policy .. " sampled out (pct=" .. rec.pct .. ")"
  end
  return res
end

-- The order of check_authors(): higher is stricter.
local DISPOSITION_RANK = { none = 1, quarantine = 2, reject = 3 }
local RESULT_RANK = { pass = 1, none = 2, permerror = 3, temperror = 4, fail = 5 }

local function stricter(a, b)
  local da, db = DISPOSITION_RANK[a.disposition], DISPOSITION_RANK[b.disposition]
  if da ~= db then return da > db end
  return RESULT_RANK[a.result] > RESULT_RANK[b.result]
end

function _M.check_authors(opts)
  local domains = opts.from_domains
  if type(domains) ~= "table" then domains = {} end
  local each, worst = {}, nil
  -- each domain in turn: a handful at most (author_domains() caps them),
  -- and the resolver answers a repeated name from its cache
  local one = {}
  for k, v in pairs(opts) do one[k] = v end
  one.from_domains = nil
  if #domains == 0 then
    one.from_domain = nil
    worst = _M.check(one)
  end
  for i, domain in ipairs(domains) do
    one.from_domain = domain
    each[i] = _M.check(one)
    if not worst or stricter(each[i], worst) then worst = each[i] end
  end
  -- a copy: the result is not one of its own .each
  local res = {}
  for k, v in pairs(worst) do res[k] = v end
  res.domains, res.each = domains, each
  return res
end

return _M
