-- Delivery status notifications (RFC 3464 in a multipart/report, RFC 6522).
--
--   local text = dsn.build(opts)   -- the DSN message, CRLF line ends
--
-- opts = {
--   hostname,                -- the reporting MTA
--   env,                     -- the original envelope (env.from, env.envid, env.ret, env.t)
--   body,                    -- the original message (string or message handle)
--   action,                  -- "failed" | "delayed" | "delivered" | "relayed"
--   recipients = { { address, orcpt, status, code, enhanced, text, host, attempt_time, last,
--                    class, class_text } },  -- class: moonpost.bounce's, with its description
--   max_full = 65536,        -- return the full message up to this size (when RET is not given)
-- }
--
-- The report part is message/delivery-status; with RET=HDRS, or when the
-- message is larger than max_full and RET is not FULL, only the header
-- section is returned (text/rfc822-headers), else the whole message
-- (message/rfc822). For a message that came with SMTPUTF8, or an address
-- that is not ASCII, the DSN is an internationalized one (RFC 6533):
-- message/global-delivery-status with "utf-8" address types in UTF-8,
-- message/global or message/global-headers, a UTF-8 notification.
--
--   local short = dsn.headers_only(text, why)   -- a built DSN, cut down
--
-- A DSN returns the message as it was, 8-bit octets and all: its sender is
-- <>, so a DSN that cannot be sent is lost. When the next hop cannot take
-- it (no 8BITMIME, or too large), the SMTP client sends headers_only()
-- instead: the header section of the returned message alone, in US-ASCII,
-- with a sentence in the notification that says why.
local format, concat, gsub, upper, lower = string.format, table.concat, string.gsub, string.upper, string.lower
local find, sub, match = string.find, string.sub, string.match

local _M = { _VERSION = "0.1" }

local function date(t)
  return os.date("!%a, %d %b %Y %H:%M:%S +0000", t or os.time())
end

-- xtext (RFC 3461 4) to text: "+2B" -> "+". Only printable US-ASCII is
-- decoded (what ENVID and ORCPT may hold): "+0D+0A" stays as it is, since a
-- line break written into a DSN field would start a field of the sender's
-- choosing. (The SMTP server refuses such values; a message stored before
-- it did, or given another way, must not get through here either.)
local function xtext_decode(s)
  return (gsub(s, "%+(%x%x)", function(h)
    local c = tonumber(h, 16)
    if c < 0x20 or c > 0x7E then return nil end
    return string.char(c)
  end))
end

-- utf-8-addr-xtext / utf-8-addr-unitext (RFC 6533 3) to the address:
-- "\x{E9}" -> "é". As with xtext, what would be a control character stays
-- as it was written.
local function utf8_char(cp)
  if cp < 0x80 then return string.char(cp) end
  if cp < 0x800 then return string.char(0xC0 + math.floor(cp / 0x40), 0x80 + cp % 0x40) end
  if cp < 0x10000 then
    return string.char(0xE0 + math.floor(cp / 0x1000), 0x80 + math.floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
  end
  return string.char(0xF0 + math.floor(cp / 0x40000), 0x80 + math.floor(cp / 0x1000) % 0x40,
    0x80 + math.floor(cp / 0x40) % 0x40, 0x80 + cp % 0x40)
end

local function utf8_addr_decode(s)
  return (gsub(s, "\\x{(%x%x?%x?%x?%x?%x?)}", function(h)
    local cp = tonumber(h, 16)
    if cp < 0x20 or cp == 0x7F or (cp >= 0x80 and cp < 0xA0) or (cp >= 0xD800 and cp < 0xE000)
      or cp > 0x10FFFF then
      return nil
    end
    return utf8_char(cp)
  end))
end

-- A field value as written: any control character left (a raw one in a
-- stored value) becomes "?".
local function field(s)
  return (gsub(s, "[%z\1-\31\127]", "?"))
end

local function headers_of(body)
  local s = type(body) == "string" and body or body:headers()
  local h = s:match("^(.-\r\n)\r\n") or s
  return h
end

local function text_of(body)
  return type(body) == "string" and body or body:tostring()
end

local SUBJECTS = {
  failed = "Undelivered Mail Returned to Sender",
  delayed = "Delayed Mail (still being retried)",
  delivered = "Successful Mail Delivery Report",
  relayed = "Mail Relayed Report",
}

local INTROS = {
  failed = "Your message could not be delivered to the following recipients. This is a permanent\r\n"
    .. "error; the message will not be retried.",
  delayed = "Your message has not been delivered yet to the following recipients. The mail system\r\n"
    .. "will keep trying; you do not need to send it again.",
  delivered = "Your message was delivered to the following recipients.",
  relayed = "Your message was relayed to the following recipients, to a system that does not send\r\n"
    .. "delivery notifications of its own.",
}

local seq = 0

-- Does the DSN carry UTF-8 (RFC 6533): the message came with SMTPUTF8, or
-- an address it names is not ASCII.
local function is_global(o)
  if o.env.utf8 or find(o.env.from or "", "[\128-\255]") then return true end
  for _, r in ipairs(o.recipients) do
    if find(r.address, "[\128-\255]") then return true end
  end
  return false
end

-- Original-Recipient's value: the ORCPT parameter, decoded. "utf-8" type
-- addresses (RFC 6533) only go into a message/global-delivery-status;
-- in a plain one they stay encoded, as ASCII.
local function original_recipient(orcpt, global)
  local typ, addr = orcpt:match("^([^;]+);(.*)$")
  if not typ then return nil end
  if lower(typ:match("^%s*(.-)%s*$")) == "utf-8" then
    return field(typ .. ";" .. (global and utf8_addr_decode(addr) or addr))
  end
  return field(typ .. ";" .. xtext_decode(addr))
end

function _M.build(o)
  local env, host = o.env, o.hostname
  local global = is_global(o)
  seq = seq + 1
  local boundary = format("%d.%d.%x/%s", os.time(), seq, math.random(0, 0x7fffffff), host)
  local action = o.action or "failed"
  local human = { INTROS[action], "" }
  local fields = { "Reporting-MTA: dns; " .. host }
  if env.envid then fields[#fields + 1] = "Original-Envelope-Id: " .. field(xtext_decode(env.envid)) end
  if env.t then fields[#fields + 1] = "Arrival-Date: " .. date(env.t) end
  for _, r in ipairs(o.recipients) do
    local said = gsub(r.text or action, "[\r\n]+", " ")
    if r.class_text then
      -- what the failure means (moonpost.bounce), then what the server said
      human[#human + 1] = format("<%s>: %s (%s)", r.address, r.class_text, r.class)
      if r.code then said = format("%d %s%s", r.code, r.enhanced and (r.enhanced .. " ") or "", said) end
      human[#human + 1] = "    " .. said
    else
      human[#human + 1] = format("<%s>: %s", r.address, said)
    end
    fields[#fields + 1] = ""
    if r.orcpt then
      local v = original_recipient(r.orcpt, global)
      if v then fields[#fields + 1] = "Original-Recipient: " .. v end
    end
    -- a non-ASCII address is of type utf-8 (RFC 6533 3), as UTF-8 itself in
    -- a message/global-delivery-status
    fields[#fields + 1] = (find(r.address, "[\128-\255]") and "Final-Recipient: utf-8; " or "Final-Recipient: rfc822; ")
      .. field(r.address)
    fields[#fields + 1] = "Action: " .. action
    fields[#fields + 1] = "Status: " .. (r.enhanced or (action == "failed" and "5.0.0" or
      (action == "delayed" and "4.0.0" or "2.0.0")))
    if r.host then
      -- "[192.0.2.1]:25" -> "[192.0.2.1]": the MTA, not the port
      fields[#fields + 1] = "Remote-MTA: dns; " .. gsub(tostring(r.host), "^(%[.-%]):%d+$", "%1")
    end
    if r.code then
      fields[#fields + 1] = format("Diagnostic-Code: smtp; %d %s%s", r.code,
        r.enhanced and (r.enhanced .. " ") or "", gsub(r.text or "", "[\r\n]+", " "))
    elseif r.last and r.last.code then
      -- an expired message: the reply to its last attempt
      local l = r.last
      fields[#fields + 1] = format("Diagnostic-Code: smtp; %d %s%s", l.code,
        l.enhanced and (l.enhanced .. " ") or "", gsub(l.text or "", "[\r\n]+", " "))
    elseif r.text then
      fields[#fields + 1] = "Diagnostic-Code: x-moonpost; " .. gsub(r.text, "[\r\n]+", " ")
    end
    fields[#fields + 1] = "Last-Attempt-Date: " .. date(r.attempt_time)
    if action == "delayed" and r.will_retry_until then
      fields[#fields + 1] = "Will-Retry-Until: " .. date(r.will_retry_until)
    end
    -- an extension field (RFC 3464 extension-field; an "X-" name needs no registration)
    if r.class then fields[#fields + 1] = "X-Moonpost-Bounce-Class: " .. r.class end
  end
  local size = type(o.body) == "string" and #o.body or o.body:size()
  local ret = env.ret and upper(env.ret) or nil
  local full = ret == "FULL" or (ret == nil and size <= (o.max_full or 65536))
  local returned_type, returned = global and "message/global-headers" or "text/rfc822-headers", headers_of(o.body)
  if full and action ~= "delivered" and action ~= "relayed" then
    returned_type, returned = global and "message/global" or "message/rfc822", text_of(o.body)
  end
  local msgid = format("<%d.%d.dsn@%s>", os.time(), seq, host)
  local parts = {
    "From: Mail Delivery System <MAILER-DAEMON@" .. host .. ">",
    "To: <" .. env.from .. ">",
    "Subject: " .. SUBJECTS[action],
    "Date: " .. date(),
    "Message-ID: " .. msgid,
    "Auto-Submitted: auto-replied",
    "MIME-Version: 1.0",
    -- (report-type stays delivery-status for an internationalized one too:
    -- only the parts' types change, as Postfix writes them)
    format('Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="%s"', boundary),
    "",
    "This is a MIME-encapsulated message.",
    "",
    "--" .. boundary,
    "Content-Description: Notification",
    global and "Content-Type: text/plain; charset=utf-8" or "Content-Type: text/plain; charset=us-ascii",
    "",
    concat(human, "\r\n"),
    "",
    "--" .. boundary,
    "Content-Description: Delivery report",
    global and "Content-Type: message/global-delivery-status" or "Content-Type: message/delivery-status",
    "",
    concat(fields, "\r\n"),
    "",
    "--" .. boundary,
    "Content-Description: " .. (returned_type:find("headers", 1, true) and "Returned headers" or "Returned message"),
    "Content-Type: " .. returned_type,
    "",
  }
  local head = concat(parts, "\r\n") .. "\r\n"
  if returned:sub(-2) ~= "\r\n" then returned = returned .. "\r\n" end
  return head .. returned .. "\r\n--" .. boundary .. "--\r\n"
end

-- Octets outside US-ASCII as "?": one for each UTF-8 sequence, one for
-- each other octet.
local function ascii(s)
  return (gsub(gsub(s, "[\194-\244][\128-\191]+", "?"), "[\128-\255]", "?"))
end

-- headers_only(dsn, why) -> the DSN (a string or a message made by build())
-- with the header section of the returned message in place of the message,
-- as text/rfc822-headers, every octet above 127 after the DSN's own header
-- section made "?", and a paragraph after the notification's first one:
-- "Only the header section of your message is returned below:\r\n<why>." |
-- nil when the text is not a DSN that build() made.
function _M.headers_only(dsn, why)
  local text = type(dsn) == "string" and dsn or dsn:tostring()
  local head_end = find(text, "\r\n\r\n", 1, true)
  local boundary = head_end and match(sub(text, 1, head_end), 'boundary="([^"]+)"')
  if not boundary then return nil end
  local delim, close = "\r\n--" .. boundary .. "\r\n", "\r\n--" .. boundary .. "--\r\n"
  local p1 = find(text, delim .. "Content-Description: Notification\r\n", head_end, true)
  local p3 = p1 and find(text, delim .. "Content-Description: Returned ", p1 + 1, true)
  local b3 = p3 and find(text, "\r\n\r\n", p3 + #delim, true)
  if not b3 or sub(text, -#close) ~= close then return nil end
  -- the notification's first paragraph ends after the part's header and one more empty line
  local b1 = find(text, "\r\n\r\n", p1 + #delim, true)
  local intro_end = b1 and find(text, "\r\n\r\n", b1 + 4, true)
  if not intro_end or intro_end > p3 then return nil end
  local returned = headers_of(sub(text, b3 + 4, #text - #close))
  local notice = "Only the header section of your message is returned below:\r\n" .. gsub(why, "[\r\n]+", " ")
    .. ".\r\nOctets outside US-ASCII in it are shown as \"?\"."
  return sub(text, 1, head_end + 3) .. ascii(concat({
    sub(text, head_end + 4, intro_end + 3), notice, "\r\n", sub(text, intro_end + 2, p3 - 1), delim,
    "Content-Description: Returned headers\r\nContent-Type: text/rfc822-headers\r\n\r\n", returned,
  })) .. (sub(returned, -2) == "\r\n" and "" or "\r\n") .. close
end

-- wants(notify, action): does this recipient's NOTIFY ask for the action?
-- Without NOTIFY, only failures are reported (RFC 3461 4.1).
function _M.wants(notify, action)
  if not notify then return action == "failed" end
  notify = upper(notify)
  if notify == "NEVER" then return false end
  if action == "failed" then return notify:find("FAILURE", 1, true) ~= nil end
  if action == "delayed" then return notify:find("DELAY", 1, true) ~= nil end
  return notify:find("SUCCESS", 1, true) ~= nil
end

_M.xtext_decode = xtext_decode

return _M
