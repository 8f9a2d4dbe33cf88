-- moonpost.bounce: what a delivery failure means. Every deferred or bounced
-- result gets a class from the industry's taxonomy (invalid-recipient,
-- quota-issues, spam-related, ...) and a hard/soft verdict; the queue puts
-- them on the result (result.class, result.permanent) before the
-- delivery_deferred / delivery_bounced events, and DSNs say the class.
--
--   local bounce = require "moonpost.bounce"
--   local class, permanent, description = bounce.classify {
--     code = 550, enhanced = "5.1.1", text = "no such user here", stage = "RCPT TO" }
--
--   mta:use(bounce.setup {
--     rules = {                                   -- tried before the shipped rules
--       { pattern = "mailbox is frozen", class = "inactive-mailbox", permanent = true },
--       { pattern = { regex = [[^5\d\d .*(listed|blocked) at]] }, class = "spam-related" },
--     },
--   })
--
-- Order: an expired message is message-expired; then the rules on the reply
-- (the policy's, then the shipped ones in moonpost.bounce.rules), then the
-- enhanced status code (RFC 3463 and its registry), then the reply code,
-- else uncategorized. Without the block the queue uses the shipped
-- classifier. docs/bounce.md has the classes and every option.
local config = require "moonpost.runtime.config"
local regex = require "moonpost.runtime.regex"
local shipped = require "moonpost.bounce.rules"

local type, tostring, tonumber, ipairs, pairs = type, tostring, tonumber, ipairs, pairs
local find, lower, gsub, format, sub = string.find, string.lower, string.gsub, string.format, string.sub

local _M = { _VERSION = "0.1" }

-- The classes, with the text a DSN gives for each.
local CLASSES = {
  { "invalid-recipient", "The recipient address does not exist" },
  { "inactive-mailbox", "The recipient's mailbox is disabled or no longer in use" },
  { "bad-domain", "The recipient's domain does not exist or accepts no mail" },
  { "invalid-sender", "The sender address was refused as invalid" },
  { "quota-issues", "The recipient's mailbox or the receiving system is full" },
  { "spam-related", "The message or the sending server was blocked as spam" },
  { "virus-related", "The message was refused as carrying a virus or malware" },
  { "content-related", "The message was refused for its content, format or size" },
  { "policy-related", "The message was refused by the receiving system's policy" },
  { "relaying-issues", "The receiving server refused to relay the message" },
  { "routing-errors", "The message could not be routed to the recipient's domain" },
  { "no-answer-from-host", "The receiving server could not be reached" },
  { "bad-connection", "The connection to the receiving server failed" },
  { "message-expired", "The message could not be delivered before it expired" },
  { "protocol-errors", "The receiving server reported an SMTP protocol error" },
  { "bad-configuration", "The sending or receiving system is misconfigured" },
  { "other", "The delivery failed for a reason the receiving server did not detail" },
  { "uncategorized", "The delivery failed for a reason that could not be classified" },
}
local DESCRIPTION, NAMES = {}, {}
for i, c in ipairs(CLASSES) do
  DESCRIPTION[c[1]] = c[2]
  NAMES[i] = c[1]
end
_M.CLASSES = NAMES

-- describe(class) -> the DSN text of a class, or nil for an unknown name.
function _M.describe(class)
  return DESCRIPTION[class]
end

-- ---- enhanced status codes: "subject.detail" -> class -------------------------------------
-- RFC 3463 section 3, and the codes registered since (IANA "SMTP Enhanced
-- Status Codes": RFC 3886, 4468, 4954, 5248, 6531, 6710, 7293, 7372, 7505,
-- 8617, 8689). A detail not listed falls back to "subject.0".
local ENHANCED = {
  ["0.0"] = "other",                 -- other undefined status
  ["1.0"] = "invalid-recipient",     -- other address status
  ["1.1"] = "invalid-recipient",     -- bad destination mailbox address
  ["1.2"] = "bad-domain",            -- bad destination system address
  ["1.3"] = "invalid-recipient",     -- bad destination mailbox address syntax
  ["1.4"] = "invalid-recipient",     -- destination mailbox address ambiguous
  ["1.5"] = "other",                 -- destination address valid
  ["1.6"] = "inactive-mailbox",      -- destination mailbox has moved, no forwarding address
  ["1.7"] = "invalid-sender",        -- bad sender's mailbox address syntax
  ["1.8"] = "invalid-sender",        -- bad sender's system address
  ["1.9"] = "other",                 -- message relayed to non-compliant mailer (RFC 3886)
  ["1.10"] = "bad-domain",           -- recipient address has null MX (RFC 7505)
  ["2.0"] = "other",                 -- other or undefined mailbox status
  ["2.1"] = "inactive-mailbox",      -- mailbox disabled, not accepting messages
  ["2.2"] = "quota-issues",          -- mailbox full ("a persistent transient failure": soft, below)
  ["2.3"] = "content-related",       -- message length exceeds administrative limit
  ["2.4"] = "routing-errors",        -- mailing list expansion problem
  ["3.0"] = "other",                 -- other or undefined mail system status
  ["3.1"] = "quota-issues",          -- mail system full
  ["3.2"] = "bad-configuration",     -- system not accepting network messages
  ["3.3"] = "protocol-errors",       -- system not capable of selected features
  ["3.4"] = "content-related",       -- message too big for system
  ["3.5"] = "bad-configuration",     -- system incorrectly configured
  ["3.6"] = "other",                 -- requested priority was changed (RFC 6710)
  ["4.0"] = "routing-errors",        -- other or undefined network or routing status
  ["4.1"] = "no-answer-from-host",   -- no answer from host
  ["4.2"] = "bad-connection",        -- bad connection
  ["4.3"] = "routing-errors",        -- directory server failure
  ["4.4"] = "routing-errors",        -- unable to route
  ["4.5"] = "bad-connection",        -- mail system congestion
  ["4.6"] = "routing-errors",        -- routing loop detected
  ["4.7"] = "message-expired",       -- delivery time expired
  ["5.0"] = "protocol-errors",       -- other or undefined protocol status
  ["5.1"] = "protocol-errors",       -- invalid command
  ["5.2"] = "protocol-errors",       -- syntax error
  ["5.3"] = "protocol-errors",       -- too many recipients
  ["5.4"] = "protocol-errors",       -- invalid command arguments
  ["5.5"] = "protocol-errors",       -- wrong protocol version
  ["5.6"] = "protocol-errors",       -- authentication exchange line is too long (RFC 4954)
  ["6.0"] = "content-related",       -- other or undefined media error
  ["6.1"] = "content-related",       -- media not supported
  ["6.2"] = "content-related",       -- conversion required and prohibited
  ["6.3"] = "content-related",       -- conversion required but not supported
  ["6.4"] = "content-related",       -- conversion with loss performed
  ["6.5"] = "content-related",       -- conversion failed
  ["6.6"] = "content-related",       -- message content not available (RFC 4468)
  ["6.7"] = "content-related",       -- non-ASCII addresses not permitted (RFC 6531)
  ["6.8"] = "content-related",       -- UTF-8 string reply is required (RFC 6531)
  ["6.9"] = "content-related",       -- UTF-8 header message cannot be transferred (RFC 6531)
  ["6.10"] = "content-related",      -- (RFC 6531 errata: as 6.8)
  ["7.0"] = "policy-related",        -- other or undefined security status
  ["7.1"] = "policy-related",        -- delivery not authorized, message refused
  ["7.2"] = "policy-related",        -- mailing list expansion prohibited
  ["7.3"] = "policy-related",        -- security conversion required but not possible
  ["7.4"] = "policy-related",        -- security features not supported
  ["7.5"] = "policy-related",        -- cryptographic failure
  ["7.6"] = "policy-related",        -- cryptographic algorithm not supported
  ["7.7"] = "policy-related",        -- message integrity failure
  ["7.8"] = "bad-configuration",     -- authentication credentials invalid (RFC 4954)
  ["7.9"] = "bad-configuration",     -- authentication mechanism is too weak (RFC 4954)
  ["7.10"] = "policy-related",       -- encryption needed (RFC 5248)
  ["7.11"] = "policy-related",       -- encryption required for requested authentication mechanism
  ["7.12"] = "bad-configuration",    -- a password transition is needed (RFC 4954)
  ["7.13"] = "bad-configuration",    -- user account disabled (RFC 5248: the authenticated sender's)
  ["7.14"] = "policy-related",       -- trust relationship required (RFC 5248)
  ["7.15"] = "policy-related",       -- priority level is too low (RFC 6710)
  ["7.16"] = "content-related",      -- message is too big for the specified priority (RFC 6710)
  ["7.17"] = "inactive-mailbox",     -- mailbox owner has changed (RFC 7293)
  ["7.18"] = "bad-domain",           -- domain owner has changed (RFC 7293)
  ["7.19"] = "policy-related",       -- RRVS test cannot be completed (RFC 7293)
  ["7.20"] = "policy-related",       -- no passing DKIM signature found (RFC 7372)
  ["7.21"] = "policy-related",       -- no acceptable DKIM signature found
  ["7.22"] = "policy-related",       -- no valid author-matched DKIM signature found
  ["7.23"] = "policy-related",       -- SPF validation failed
  ["7.24"] = "policy-related",       -- SPF validation error
  ["7.25"] = "policy-related",       -- reverse DNS validation failed
  ["7.26"] = "policy-related",       -- multiple authentication checks failed
  ["7.27"] = "invalid-sender",       -- sender address has null MX (RFC 7505)
  ["7.28"] = "spam-related",         -- mail flood detected
  ["7.29"] = "policy-related",       -- ARC validation failure (RFC 8617)
  ["7.30"] = "policy-related",       -- REQUIRETLS support required (RFC 8689)
}
_M.ENHANCED = ENHANCED

-- Hard or soft other than the reply code says (RFC 3463: X.2.2 "should be
-- used as a persistent transient failure").
local ENHANCED_PERMANENT = { ["2.2"] = false }

-- ---- reply codes (RFC 5321 4.2.3, RFC 4954, RFC 7504) -------------------------------------
-- A class, or a table of classes by stage (with a default).
local REPLY = {
  [421] = "bad-connection",          -- service not available, closing transmission channel
  [450] = "other",                   -- mailbox unavailable (busy, or blocked for a while)
  [451] = "other",                   -- local error in processing
  [452] = "quota-issues",            -- insufficient system storage
  [454] = "policy-related",          -- TLS or authentication temporarily unavailable
  [455] = "protocol-errors",         -- server unable to accommodate parameters
  [500] = "protocol-errors",
  [501] = "protocol-errors",
  [502] = "protocol-errors",
  [503] = "protocol-errors",
  [504] = "protocol-errors",
  [521] = "bad-domain",              -- host does not accept mail (RFC 7504)
  [530] = "policy-related",          -- authentication required
  [534] = "bad-configuration",       -- authentication mechanism is too weak
  [535] = "bad-configuration",       -- authentication credentials invalid
  [538] = "policy-related",          -- encryption required for the mechanism
  [550] = { ["rcpt to"] = "invalid-recipient", default = "other" }, -- mailbox unavailable / not found
  [551] = "invalid-recipient",       -- user not local
  [552] = { ["data"] = "content-related", ["end of data"] = "content-related", default = "quota-issues" },
  [553] = { ["mail from"] = "invalid-sender", default = "invalid-recipient" }, -- mailbox name not allowed
  [554] = { connect = "policy-related", default = "other" }, -- no SMTP service here / transaction failed
  [555] = "protocol-errors",         -- MAIL/RCPT parameters not recognized
  [556] = "bad-domain",              -- domain does not accept mail (RFC 7504)
}

-- ---- matching ---------------------------------------------------------------------------------

-- "<code> <enhanced> <text>", lowercased, blanks folded: what rules match.
local function subject_of(res)
  local parts = {}
  local code = tonumber(res.code)
  if code then parts[#parts + 1] = tostring(code) end
  if type(res.enhanced) == "string" then parts[#parts + 1] = res.enhanced end
  if res.text ~= nil then parts[#parts + 1] = tostring(res.text) end
  return (gsub(lower(table.concat(parts, " ")), "%s+", " "))
end

-- Lower the letters of a Lua pattern, but not those after a "%" ("%S",
-- "%W" mean other things than "%s", "%w"), so that it matches the
-- lowercased subject whatever case the user wrote it in.
local function lower_pattern(p)
  local out, i, n = {}, 1, #p
  while i <= n do
    local c = sub(p, i, i)
    if c == "%" then
      out[#out + 1] = sub(p, i, i + 1)
      i = i + 2
    else
      out[#out + 1] = lower(c)
      i = i + 1
    end
  end
  return table.concat(out)
end

-- check_pattern(p) -> nil | why: the mistakes Lua only reports when a match
-- reaches them (a trailing "%", an open "[" or capture), found at load time.
local function check_pattern(p)
  local i, n, depth = 1, #p, 0
  while i <= n do
    local c = sub(p, i, i)
    if c == "%" then
      local d = sub(p, i + 1, i + 1)
      if d == "" then return "malformed pattern (ends with '%')" end
      if d == "b" then
        if i + 3 > n then return "missing arguments to '%b'" end
        i = i + 4
      elseif d == "f" then
        if sub(p, i + 2, i + 2) ~= "[" then return "missing '[' after '%f' in pattern" end
        i = i + 2
      else
        if d:match("%d") and tonumber(d) > depth then return "invalid capture index %" .. d end
        i = i + 2
      end
    elseif c == "[" then
      local j = i + 1
      if sub(p, j, j) == "^" then j = j + 1 end
      if sub(p, j, j) == "]" then j = j + 1 end
      while true do
        local d = sub(p, j, j)
        if d == "" then return "malformed pattern (missing ']')" end
        if d == "%" then j = j + 2 elseif d == "]" then break else j = j + 1 end
      end
      i = j + 1
    elseif c == "(" then
      depth = depth + 1
      i = i + 1
    elseif c == ")" then
      depth = depth - 1
      if depth < 0 then return "invalid pattern capture" end
      i = i + 1
    else
      i = i + 1
    end
  end
  if depth > 0 then return "unfinished capture" end
  return nil
end

-- compile(list, where) -> rules: { match = fn(subject) -> bool, class, permanent }
-- where(i, field) names a rule's field in error messages.
local function compile(list, where)
  local out = {}
  for i, r in ipairs(list) do
    local pattern, class, permanent = r.pattern or r[1], r.class or r[2], r.permanent
    local match
    if type(pattern) == "string" then
      local p = lower_pattern(pattern)
      local ok, err = pcall(find, "", p)
      local why = check_pattern(p) or (not ok and tostring(err):gsub("^.-: ", ""))
      if why then config.raise(format("%s: bad Lua pattern %q: %s", where(i, "pattern"), pattern, why)) end
      match = function(s) return find(s, p) ~= nil end
    elseif type(pattern) == "table" and type(pattern.regex) == "string" then
      local re, err = regex.compile(pattern.regex, { icase = true })
      if not re then
        config.raise(format("%s: bad regex %q: %s", where(i, "pattern"), pattern.regex, err))
      end
      match = function(s) return re:find(s) ~= nil end
    else
      config.raise(format("%s: expected a Lua pattern or { regex = \"...\" }, got %s", where(i, "pattern"),
        type(pattern)))
    end
    if not DESCRIPTION[class] then
      config.raise(format("%s: unknown class %s (known: %s)", where(i, "class"),
        type(class) == "string" and format("'%s'", class) or type(class), table.concat(NAMES, ", ")))
    end
    if permanent ~= nil and type(permanent) ~= "boolean" then
      config.raise(format("%s: expected true or false, got %s", where(i, "permanent"), type(permanent)))
    end
    out[i] = { match = match, class = class, permanent = permanent, source = pattern }
  end
  return out
end

local SHIPPED = compile(shipped, function(i, field)
  return format("moonpost.bounce.rules[%d].%s", i, field)
end)

local function first_match(rules, s)
  for i = 1, #rules do
    local r = rules[i]
    if r.match(s) then return r, i end
  end
end

-- The enhanced code of a result: its own, or the one its text starts with
-- (maildir: "4.3.0 maildir ...", the queue's "4.4.7 message expired: ...").
local function enhanced_of(res)
  local e = res.enhanced
  if type(e) ~= "string" then e = type(res.text) == "string" and res.text:match("^%s*([245]%.%d+%.%d+)") end
  if not e then return nil end
  local cls, detail = e:match("^([245])%.(%d+%.%d+)$")
  if not cls then return nil end
  return tonumber(cls), detail
end

local function permanent_by_code(res, ecls)
  local code = tonumber(res.code)
  if code and code >= 400 and code < 600 then return code >= 500 end
  if ecls == 5 or ecls == 4 then return ecls == 5 end
  return res.status == "bounced"
end

-- classify(res, [user_rules], [no_shipped]) -> class, permanent, description, source
-- source says what decided: "expired", "rule <n>", "shipped rule <n>",
-- "enhanced <x.y.z>", "reply <code>" or "none".
-- Classes that name the recipient: given at MAIL FROM, the same words are
-- about the sender (5.1.1 "sender address rejected", "account suspended").
local RECIPIENT_CLASS = { ["invalid-recipient"] = true, ["inactive-mailbox"] = true, ["bad-domain"] = true }

local classify_any

local function classify(res, user, no_shipped)
  local class, p, desc, source = classify_any(res, user, no_shipped)
  if RECIPIENT_CLASS[class] and res.stage == "MAIL FROM" then
    return "invalid-sender", p, DESCRIPTION["invalid-sender"], source .. " at MAIL FROM"
  end
  return class, p, desc, source
end

function classify_any(res, user, no_shipped)
  if type(res) ~= "table" then error("bounce.classify: expected a result table, got " .. type(res), 3) end
  local ecls, detail = enhanced_of(res)
  local default_perm = permanent_by_code(res, ecls)
  if res.expired then
    return "message-expired", true, DESCRIPTION["message-expired"], "expired"
  end
  local s = subject_of(res)
  if user then
    local r, i = first_match(user, s)
    if r then
      local p = r.permanent
      if p == nil then p = default_perm end
      return r.class, p, DESCRIPTION[r.class], "rule " .. i
    end
  end
  local r, i
  if not no_shipped then r, i = first_match(SHIPPED, s) end
  if r then
    local p = r.permanent
    if p == nil then p = default_perm end
    return r.class, p, DESCRIPTION[r.class], "shipped rule " .. i
  end
  if detail then
    local key = detail
    local class = ENHANCED[key]
    if not class then
      key = detail:match("^(%d+)%.") .. ".0"
      class = ENHANCED[key]
    end
    if class then
      local p = ENHANCED_PERMANENT[key]
      if p == nil then p = default_perm end
      return class, p, DESCRIPTION[class], "enhanced " .. ecls .. "." .. detail
    end
  end
  local code = tonumber(res.code)
  local class = code and REPLY[code]
  if type(class) == "table" then
    class = class[lower(tostring(res.stage or ""))] or class.default
  end
  if class then
    return class, default_perm, DESCRIPTION[class], "reply " .. code
  end
  return "uncategorized", default_perm, DESCRIPTION.uncategorized, "none"
end

-- classify(res) -> class, permanent, description, source: the shipped
-- classifier (what the queue uses without a moonpost.bounce block).
function _M.classify(res)
  return classify(res, nil)
end

-- ---- the block --------------------------------------------------------------------------------

local SCHEMA = {
  rules = { type = "table" },
  shipped_rules = { type = "boolean", default = true },
}

local RULE_FIELDS = { pattern = true, class = true, permanent = true }

function _M.setup(opts)
  local o = config.check("bounce.setup", opts, SCHEMA)
  local list = o.rules or {}
  local n = 0
  for k in pairs(list) do
    n = n + 1
    if type(k) ~= "number" or k < 1 or k % 1 ~= 0 or k > #list then
      config.raise(format("bounce.setup: field 'rules': expected a list of rules, got a key %s", tostring(k)))
    end
  end
  for i, r in ipairs(list) do
    if type(r) ~= "table" then
      config.raise(format("bounce.setup: field 'rules[%d]': expected a table { pattern = ..., class = ... }, got %s",
        i, type(r)))
    end
    for k in pairs(r) do
      if not RULE_FIELDS[k] then
        config.raise(format("bounce.setup: field 'rules[%d]': unknown field '%s' (known: class, pattern, permanent)",
          i, tostring(k)))
      end
    end
    if r.pattern == nil then config.raise(format("bounce.setup: field 'rules[%d].pattern' is required", i)) end
    if r.class == nil then config.raise(format("bounce.setup: field 'rules[%d].class' is required", i)) end
  end
  local user = compile(list, function(i, field)
    return format("bounce.setup: field 'rules[%d].%s'", i, field)
  end)
  local shipped_on = o.shipped_rules
  local block = { name = "bounce", rules = user }
  -- the block's classifier: the policy's rules, then (unless turned off)
  -- the shipped ones, then the codes
  function block.classify(res)
    return classify(res, user, not shipped_on)
  end
  function block.attach(self, mta)
    if mta.classify and mta.classify ~= self.classify then
      config.raise("bounce.setup: this MTA already uses another moonpost.bounce block")
    end
    mta.classify = self.classify
  end
  return block
end

return _M
