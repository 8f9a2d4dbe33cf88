-- Builds RFC 5322 / MIME messages from structured parts, for the HTTP
-- API's injection (modules/admin.lua).
--
--   local mime = require "moonpost.runtime.mime"
--   local text, err = mime.render {
--     hostname = "mta1.example.net", id = "6b0db8ed00000",
--     from = "Acme <news@acme.example>", to = { "a@x.example" },
--     subject = "Grüße", text = "plain body", html = "<p>html body</p>",
--     headers = { { "X-Campaign", "c1" } },
--     attachments = { { name = "a.pdf", content_type = "application/pdf", data = "<octets>" } },
--   }
--   mime.encode_words("Grüße")            -- "=?UTF-8?B?R3LDvMOfZQ==?="
--   mime.qp("text")                       -- quoted-printable, CRLF line ends
--
-- Shape: text or html alone is one part; text and html are a
-- multipart/alternative; attachments make a multipart/mixed around that.
-- Text goes as 7bit when it is ASCII with short lines, else as
-- quoted-printable; attachments as base64 in 76-column lines. Header text
-- that is not ASCII becomes RFC 2047 encoded words (UTF-8, B encoding);
-- attachment names that are not ASCII use RFC 2231 parameters. Every
-- input error comes back as nil, "field: what is wrong".
local passwd = require "moonpost.runtime.passwd"
local kdf = require "moonpost.core.kdf"
local smtp = require "moonpost.core.smtp"

local byte, char, sub, find, format, concat, gsub = string.byte, string.char, string.sub, string.find,
  string.format, table.concat, string.gsub
local _M = { _VERSION = "0.1" }

-- n random octets as hex (OpenSSL's generator: math.random is not seeded,
-- and a Message-ID must not repeat across processes)
local function random_hex(n)
  local r = kdf.random(n) or tostring(os.time()) .. tostring(math.random())
  return (gsub(r, ".", function(c) return format("%02x", byte(c)) end)):sub(1, 2 * n)
end

-- ---- text checks ------------------------------------------------------------------------

-- The index after the UTF-8 sequence at i, or nil when none starts there
-- (well-formed only: no overlongs, no surrogates, nothing past U+10FFFF).
local function utf8_next(s, i, n)
  local c = byte(s, i)
  if c < 0x80 then return i + 1 end
  local len, min
  if c >= 0xC2 and c <= 0xDF then len, min = 2, 0x80
  elseif c >= 0xE0 and c <= 0xEF then len, min = 3, 0x800
  elseif c >= 0xF0 and c <= 0xF4 then len, min = 4, 0x10000
  else return nil end
  if i + len - 1 > n then return nil end
  local cp = c % (2 ^ (7 - len))
  for k = 1, len - 1 do
    local cc = byte(s, i + k)
    if cc < 0x80 or cc > 0xBF then return nil end
    cp = cp * 64 + (cc - 0x80)
  end
  if cp < min or cp > 0x10FFFF or (cp >= 0xD800 and cp <= 0xDFFF) then return nil end
  return i + len
end

-- utf8_valid(s) -> true | false: well-formed UTF-8
local function utf8_valid(s)
  if not find(s, "[\128-\255]") then return true end
  local i, n = 1, #s
  while i <= n do
    i = utf8_next(s, i, n)
    if not i then return false end
  end
  return true
end

_M.utf8_valid = utf8_valid

local function ascii(s)
  return not find(s, "[\128-\255]")
end

-- Every line end (CRLF, LF, CR) as CRLF.
local function crlf(s)
  return (gsub(gsub(s, "\r\n?", "\n"), "\n", "\r\n"))
end
_M.crlf = crlf

local function longest_line(s)
  local m = 0
  for line in (s .. "\r\n"):gmatch("(.-)\r\n") do
    if #line > m then m = #line end
  end
  return m
end

-- ---- encodings --------------------------------------------------------------------------

-- qp(s) -> quoted-printable (RFC 2045 6.7) of text with CRLF line ends:
-- line ends stay hard breaks, lines are cut at 76 columns with soft breaks.
function _M.qp(s)
  local out = {}
  for line in (crlf(s) .. "\r\n"):gmatch("(.-)\r\n") do
    local enc, col = {}, 0
    local n = #line
    for i = 1, n do
      local c = byte(line, i)
      local piece
      if (c >= 33 and c <= 126 and c ~= 61) or ((c == 32 or c == 9) and i < n) then
        piece = char(c)
      else
        piece = format("=%02X", c)
      end
      -- a soft break ("=") keeps every encoded line at 76 columns at most
      if col + #piece > 75 and not (i == n and col + #piece <= 76) then
        enc[#enc + 1] = "=\r\n"
        col = 0
      end
      enc[#enc + 1] = piece
      col = col + #piece
    end
    out[#out + 1] = concat(enc)
  end
  out[#out] = nil -- the split added one empty line at the end
  return concat(out, "\r\n") .. "\r\n"
end

-- base64 in lines of 76 columns, CRLF after each
function _M.base64_lines(data)
  local b = passwd.b64encode(data)
  local out = {}
  for i = 1, #b, 76 do out[#out + 1] = sub(b, i, i + 75) end
  return concat(out, "\r\n") .. "\r\n"
end

-- Cut UTF-8 text into pieces of at most `max` octets, never inside a character.
local function utf8_chunks(s, max)
  local out, i, n = {}, 1, #s
  while i <= n do
    local j = i + max - 1
    if j >= n then
      j = n
    else
      -- back off to the end of a character: the next octet must start one
      while j > i and (byte(s, j + 1) or 0) >= 0x80 and (byte(s, j + 1) or 0) < 0xC0 do j = j - 1 end
    end
    out[#out + 1] = sub(s, i, j)
    i = j + 1
  end
  return out
end

-- encode_words(s) -> RFC 2047 encoded words (UTF-8, B), each at most 75
-- characters, separated by CRLF SP (folded): for header text that is not ASCII.
function _M.encode_words(s)
  local words = {}
  -- 45 octets make 60 base64 characters: "=?UTF-8?B?" + 60 + "?=" = 72
  for i, piece in ipairs(utf8_chunks(s, 45)) do
    words[i] = "=?UTF-8?B?" .. passwd.b64encode(piece) .. "?="
  end
  return concat(words, "\r\n ")
end

-- Unstructured header text: as is when ASCII (folded at blanks past 78
-- columns), else encoded words.
local function unstructured(name, value)
  if not ascii(value) or find(value, "=?", 1, true) then return _M.encode_words(value) end
  if #name + 2 + #value <= 78 then return value end
  -- folding is at blanks only: a word that would make a line longer than
  -- RFC 5322's 998 octets goes as encoded words, which fold anywhere
  for word in value:gmatch("%S+") do
    if #name + 2 + #word > 998 then return _M.encode_words(value) end
  end
  local out, col = {}, #name + 2
  for word, sp in value:gmatch("(%S+)(%s*)") do
    if col + #word > 78 and #out > 0 then
      out[#out + 1] = "\r\n "
      col = 1
    end
    out[#out + 1] = word .. sp
    col = col + #word + #sp
  end
  return (gsub(concat(out), "[ \t]+\r\n", "\r\n"))
end

-- ---- addresses --------------------------------------------------------------------------

local SPECIALS = '[%(%)<>%[%]:;@\\,%."]'

-- One mailbox for a header: "Name <a@b>", { name = ..., address = ... } or
-- "a@b" -> the field text | nil, err
-- A control character in a header value, other than tab: a C0 control
-- (line breaks and NUL too), DEL, or a C1 control (U+0080 to U+009F).
-- -> its description | nil
local function control(s)
  local c = s:match("[%z\1-\8\10-\31\127]") or s:match("\194[\128-\159]")
  if not c then return nil end
  if c == "\r" or c == "\n" then return "a line break" end
  return format("a control character (U+%04X; only tab is allowed)", c:byte(-1))
end
_M.control = control

local function mailbox(v, field)
  local name, addr
  if type(v) == "table" then
    name, addr = v.name, v.address
    if name ~= nil and type(name) ~= "string" then return nil, field .. ": name must be a string" end
    if type(addr) ~= "string" then return nil, field .. ": address must be a string" end
  elseif type(v) == "string" then
    name, addr = v:match("^%s*(.-)%s*<([^<>]*)>%s*$")
    if not addr then addr = v:match("^%s*(.-)%s*$") end
    if name then name = name:match('^"(.*)"$') or name end
  else
    return nil, field .. ": expected an address (a string or { name, address })"
  end
  if addr == "" or find(addr, "[%s%c<>]") or not find(addr, "@", 1, true)
    or not smtp.parse_path("TO:<" .. addr .. ">", "rcpt") then
    -- one address, as SMTP takes it: "a@x.test,evil@z.test" is two
    return nil, format("%s: bad address %q", field, addr)
  end
  if name == nil or name == "" then return addr end
  local bad = control(name)
  if bad then return nil, field .. ": the name holds " .. bad end
  if not utf8_valid(name) then return nil, field .. ": the name is not valid UTF-8" end
  if not ascii(name) then
    name = _M.encode_words(name)
  elseif find(name, SPECIALS) then
    name = '"' .. gsub(name, '(["\\])', "\\%1") .. '"'
  end
  return name .. " <" .. addr .. ">"
end

-- address_list(v, field) -> "a, b" | nil, err. A group with no members
-- ("undisclosed-recipients:;") passes as it is.
function _M.address_list(v, field)
  if type(v) == "string" and v:match("^%s*[%w][%w%s%-]*:%s*;%s*$") then return (v:match("^%s*(.-)%s*$")) end
  local list = (type(v) == "table" and v[1] ~= nil) and v or { v }
  local out = {}
  for i, item in ipairs(list) do
    local m, err = mailbox(item, #list > 1 and format("%s item %d", field, i) or field)
    if not m then return nil, err end
    out[i] = m
  end
  if #out == 0 then return nil, field .. ": no address" end
  return concat(out, ",\r\n ")
end

-- ---- header fields -----------------------------------------------------------------------

-- Fields the renderer writes itself: a caller's headers may not set them.
local STRUCTURAL = { ["mime-version"] = true, ["content-type"] = true, ["content-transfer-encoding"] = true }
local ADDRESS_FIELDS = { from = true, to = true, cc = true, ["reply-to"] = true, sender = true }

-- headers: { Name = value } or { { name, value }, ... } -> list of {name, value} | nil, err
local function header_list(h)
  if h == nil then return {} end
  if type(h) ~= "table" then return nil, "headers: expected an object or a list of [name, value]" end
  local out = {}
  if h[1] ~= nil then
    for i, pair in ipairs(h) do
      local name, value
      if type(pair) == "table" then name, value = pair[1] or pair.name, pair[2] or pair.value end
      if type(name) ~= "string" or type(value) ~= "string" then
        return nil, format("headers item %d: expected [name, value] with two strings", i)
      end
      out[#out + 1] = { name, value }
    end
  else
    local names = {}
    for k in pairs(h) do names[#names + 1] = k end
    table.sort(names, function(a, b) return tostring(a) < tostring(b) end)
    for _, k in ipairs(names) do
      local v = h[k]
      if type(k) ~= "string" or type(v) ~= "string" then
        return nil, "headers: names and values must be strings"
      end
      out[#out + 1] = { k, v }
    end
  end
  for _, f in ipairs(out) do
    local name, value = f[1], f[2]
    if not name:match("^[!-9;-~]+$") then return nil, format("headers: bad field name %q", name) end
    if STRUCTURAL[name:lower()] then
      return nil, format("headers: %s is written by Moonpost (use text, html and attachments)", name)
    end
    local bad = control(value)
    if bad then return nil, format("headers: %s: the value holds %s", name, bad) end
    if not utf8_valid(value) then return nil, format("headers: %s: the value is not valid UTF-8", name) end
  end
  return out
end

local function field(name, value)
  return name .. ": " .. value .. "\r\n"
end

-- ---- parts -------------------------------------------------------------------------------

local seq = 0

local function boundary(id)
  seq = seq + 1
  return format("=_moonpost_%s_%d_%s", id or "x", seq, random_hex(6))
end

-- A text part: "Content-Type ...\r\n...\r\n\r\n" .. body
local function text_part(subtype, s, where)
  if type(s) ~= "string" then return nil, where .. ": expected a string" end
  if not utf8_valid(s) then return nil, where .. ": not valid UTF-8" end
  s = crlf(s)
  if sub(s, -2) ~= "\r\n" then s = s .. "\r\n" end
  local head = "Content-Type: text/" .. subtype .. "; charset=utf-8\r\n"
  if ascii(s) and longest_line(s) <= 998 then
    return head .. "Content-Transfer-Encoding: 7bit\r\n\r\n" .. s
  end
  return head .. "Content-Transfer-Encoding: quoted-printable\r\n\r\n" .. _M.qp(s)
end

-- RFC 2231 value: utf-8''percent-encoded
local function ext_value(s)
  return "utf-8''" .. gsub(s, "[^%w!#%$&%+%-%.%^_`|~]", function(c) return format("%%%02X", byte(c)) end)
end

local function attachment_part(a, i)
  local where = format("attachments item %d", i)
  if type(a) ~= "table" then return nil, where .. ": expected an object" end
  local name = a.name or a.filename or "attachment"
  if type(name) ~= "string" or name == "" or find(name, "[%c/\\]") then
    return nil, where .. ": name must be a file name (no slashes or control characters)"
  end
  if not utf8_valid(name) then return nil, where .. ": name is not valid UTF-8" end
  local ct = a.content_type or "application/octet-stream"
  if type(ct) ~= "string" or not ct:match("^[%w!#%$&%^_%.%+%-]+/[%w!#%$&%^_%.%+%-]+$") then
    return nil, where .. ": content_type must be a MIME type like application/pdf"
  end
  local data = a.data
  if type(data) ~= "string" then return nil, where .. ": data must be base64 text" end
  local octets = passwd.b64decode((gsub(data, "%s+", "")))
  if not octets then return nil, where .. ": data is not valid base64" end
  local disposition = a.disposition or "attachment"
  if disposition ~= "attachment" and disposition ~= "inline" then
    return nil, where .. ": disposition must be attachment or inline"
  end
  local pname, dname
  if ascii(name) and not find(name, '["\\]') then
    pname = '; name="' .. name .. '"'
    dname = '; filename="' .. name .. '"'
  else
    pname = "; name*=" .. ext_value(name)
    dname = "; filename*=" .. ext_value(name)
  end
  local head = { "Content-Type: " .. ct .. pname .. "\r\n", "Content-Transfer-Encoding: base64\r\n",
    "Content-Disposition: " .. disposition .. dname .. "\r\n" }
  if a.content_id ~= nil then
    if type(a.content_id) ~= "string" or not a.content_id:match("^[!-;=?-~]+$") then
      return nil, where .. ": content_id must be printable ASCII without < > or blanks"
    end
    head[#head + 1] = "Content-ID: <" .. a.content_id .. ">\r\n"
  end
  return concat(head) .. "\r\n" .. _M.base64_lines(octets)
end

-- multipart(subtype, parts, id) -> "Content-Type: multipart/...\r\n\r\n" .. body
local function multipart(subtype, parts, id)
  local b
  repeat
    b = boundary(id)
    local clash = false
    for _, p in ipairs(parts) do if find(p, b, 1, true) then clash = true end end
  until not clash
  local out = { format('Content-Type: multipart/%s;\r\n boundary="%s"\r\n\r\n', subtype, b),
    "This is a multi-part message in MIME format.\r\n" }
  for _, p in ipairs(parts) do
    out[#out + 1] = "\r\n--" .. b .. "\r\n"
    out[#out + 1] = p
  end
  out[#out + 1] = "\r\n--" .. b .. "--\r\n"
  return concat(out)
end

local function rfc5322_date(t)
  return os.date("!%a, %d %b %Y %H:%M:%S +0000", t or os.time())
end
_M.date = rfc5322_date

-- message_id(id, hostname) -> "<id.random@hostname>"
function _M.message_id(id, hostname)
  return format("<%s.%s@%s>", id, random_hex(6), hostname)
end

-- render(o) -> message text (CRLF) | nil, err. o: hostname, id, from, to
-- (the header values: a string, { name, address } or a list), subject,
-- text, html, headers, attachments; date (Unix time) optional.
function _M.render(o)
  local hdrs, err = header_list(o.headers)
  if not hdrs then return nil, err end
  local given = {}
  for _, f in ipairs(hdrs) do given[f[1]:lower()] = true end
  local head = {}
  if not given.date then head[#head + 1] = field("Date", rfc5322_date(o.date)) end
  if not given["message-id"] then head[#head + 1] = field("Message-ID", _M.message_id(o.id, o.hostname)) end
  if not given.from then
    local v
    v, err = _M.address_list(o.from, "from_header")
    if not v then return nil, err end
    head[#head + 1] = field("From", v)
  end
  if not given.to and o.to ~= nil then
    local v
    v, err = _M.address_list(o.to, "to_header")
    if not v then return nil, err end
    head[#head + 1] = field("To", v)
  end
  if o.subject ~= nil and not given.subject then
    if type(o.subject) ~= "string" then return nil, "subject: expected a string" end
    local bad = control(o.subject)
    if bad then return nil, "subject: holds " .. bad end
    if not utf8_valid(o.subject) then return nil, "subject: not valid UTF-8" end
    head[#head + 1] = field("Subject", unstructured("Subject", o.subject))
  end
  for _, f in ipairs(hdrs) do
    local lname = f[1]:lower()
    local v = f[2]
    if ADDRESS_FIELDS[lname] and not ascii(v) then
      -- display names that are not ASCII become encoded words, one mailbox
      -- at a time (a comma inside a quoted name is not supported here)
      local list = {}
      for piece in v:gmatch("[^,]+") do list[#list + 1] = piece end
      v, err = _M.address_list(list, "headers: " .. f[1])
      if not v then return nil, err end
    else
      v = unstructured(f[1], v)
    end
    head[#head + 1] = field(f[1], v)
  end
  head[#head + 1] = "MIME-Version: 1.0\r\n"

  local body
  local tp, hp
  if o.text ~= nil then
    tp, err = text_part("plain", o.text, "text")
    if not tp then return nil, err end
  end
  if o.html ~= nil then
    hp, err = text_part("html", o.html, "html")
    if not hp then return nil, err end
  end
  if tp and hp then
    body = multipart("alternative", { tp, hp }, o.id)
  else
    body = tp or hp
  end
  local atts = o.attachments
  if atts ~= nil then
    -- an object ({"name": ...}) is no list: refused, not dropped
    if type(atts) ~= "table" or (next(atts) ~= nil and atts[1] == nil) then
      return nil, "attachments: expected a list"
    end
    if #atts > 0 then
      local parts = { body }
      for i, a in ipairs(atts) do
        local p
        p, err = attachment_part(a, i)
        if not p then return nil, err end
        parts[#parts + 1] = p
      end
      body = multipart("mixed", parts, o.id)
    end
  end
  body = body or text_part("plain", "", "text")
  return concat(head) .. body
end

-- split_header(text) -> head (with its CRLF), body | text, "" when no blank line
function _M.split(text)
  local e = find(text, "\r\n\r\n", 1, true)
  if not e then return text, "" end
  return sub(text, 1, e + 1), sub(text, e + 4)
end

-- fields(head) -> { { name = ..., value = ... } } unfolded, in order
function _M.fields(head)
  local out = {}
  for line in gsub(head, "\r\n[ \t]", " "):gmatch("([^\r\n]+)") do
    local name, value = line:match("^([!-9;-~]+)[ \t]*:[ \t]*(.-)%s*$")
    if name then out[#out + 1] = { name = name, value = value } end
  end
  return out
end

return _M
