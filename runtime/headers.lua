-- Header fields of a received message, found in its header section
-- (msg:headers()) so that a block can read one and take it out of the
-- message (msg:remove(first, last)) without copying the body.
--
--   local headers = require "moonpost.runtime.headers"
--   for _, f in ipairs(headers.find(msg:headers(), "x-tenant")) do
--     print(f.value, f.first, f.last)   -- octets first..last: the field with its line ends
--   end
local find, sub, byte, lower, match, gsub =
  string.find, string.sub, string.byte, string.lower, string.match, string.gsub

local _M = { _VERSION = "0.1" }

-- find(head, lname) -> list of { first, last, value }: every field named
-- lname (lower case), in order. The value is unfolded and trimmed; a field
-- runs over its continuation lines (RFC 5322 2.2.3). A line is tested for
-- the name before any string is made of it: the callers ask on every
-- message (DKIM's From, a tenant or pool header), and most lines are other
-- fields.
function _M.find(head, lname)
  local out = {}
  local n, ln = #head, #lname
  local c1 = byte(lname, 1)
  local C1 = c1 and c1 >= 97 and c1 <= 122 and c1 - 32 or c1
  local pos = 1
  while pos <= n do
    local e = find(head, "\r\n", pos, true) or (n + 1)
    if e == pos then break end -- the empty line that ends the header section
    local start = pos
    local b = byte(head, pos)
    local colon
    if (b == c1 or b == C1) and lower(sub(head, pos, pos + ln - 1)) == lname then
      local _
      _, colon = find(head, "^[ \t]*:", pos + ln)
      if colon and colon >= e then colon = nil end
    end
    local stop = e -- where the field's text ends (its last line end)
    pos = e + 2
    while pos <= n do
      local c = byte(head, pos)
      if c ~= 32 and c ~= 9 then break end
      stop = find(head, "\r\n", pos, true) or (n + 1)
      pos = stop + 2
    end
    if colon then
      -- unfolded in one pass: appending line by line copied the value so
      -- far for each continuation, quadratic in a field of many short
      -- lines that a sender controls
      local line = sub(head, colon + 1, stop - 1)
      if stop ~= e then line = gsub(line, "\r\n", "") end
      -- trimmed (not with "^%s*(.-)%s*$": its lazy run tries the end at
      -- every octet, half of what finding the field cost)
      local s1 = find(line, "%S")
      local value = s1 and match(line, "^.*%S", s1) or ""
      out[#out + 1] = { first = start, last = pos - 1 > n and n or pos - 1, value = value }
    end
  end
  return out
end

-- The characters that end an atom (RFC 5322 3.2.3 specials, and space).
local SPECIAL = {}
for c in ("()<>[]:;@\\,.\"\t "):gmatch(".") do SPECIAL[byte(c)] = true end

-- tokens(s) -> { kind, text, kind, text, ... }: the tokens of a structured
-- field's value (RFC 5322 3.2): atoms as "w" with their text, quoted
-- strings as "q" with their content (backslash escapes undone), domain
-- literals as "l", and the specials as themselves (text false).
-- Comments are dropped, nested or not; an unclosed quote, comment or
-- literal runs to the end (mail in the wild has them, the verdict must not
-- fail on them).
function _M.tokens(s)
  local out, pos, n = {}, 1, #s
  while pos <= n do
    local c = byte(s, pos)
    if c == 32 or c == 9 or c == 13 or c == 10 then
      pos = pos + 1
    elseif c == 40 then -- "(": a comment
      local depth = 0
      repeat
        c = byte(s, pos)
        if c == 92 then pos = pos + 1
        elseif c == 40 then depth = depth + 1
        elseif c == 41 then depth = depth - 1
        end
        pos = pos + 1
      until depth == 0 or pos > n
    elseif c == 34 then -- a quoted string
      local first = pos + 1
      pos = first
      while pos <= n do
        c = byte(s, pos)
        if c == 92 then pos = pos + 1 elseif c == 34 then break end
        pos = pos + 1
      end
      out[#out + 1] = "q"
      out[#out + 1] = (gsub(sub(s, first, pos - 1), "\\(.)", "%1"))
      pos = pos + 1
    elseif c == 91 then -- "[": a domain literal
      local e = find(s, "]", pos, true) or n
      out[#out + 1] = "l"
      out[#out + 1] = sub(s, pos, e)
      pos = e + 1
    elseif SPECIAL[c] then
      out[#out + 1] = sub(s, pos, pos)
      out[#out + 1] = false
      pos = pos + 1
    else
      local e = pos
      while e < n and not SPECIAL[byte(s, e + 1)] do e = e + 1 end
      out[#out + 1] = "w"
      out[#out + 1] = sub(s, pos, e)
      pos = e + 1
    end
  end
  return out
end

return _M
