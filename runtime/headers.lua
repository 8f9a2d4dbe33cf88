-- Header fields of a received message, found in its header section
-- (msg:headers()) so that a block can read one and take it out of the
-- message (msg:remove(first, last)) without copying the body.
--
--   local headers = require "moonpost.runtime.headers"
--   for _, f in ipairs(headers.find(msg:headers(), "x-tenant")) do
--     print(f.value, f.first, f.last)   -- octets first..last: the field with its line ends
--   end
local find, sub, byte = string.find, string.sub, string.byte

local _M = { _VERSION = "0.1" }

-- find(head, lname) -> list of { first, last, value }: every field named
-- lname (lower case), in order. The value is unfolded and trimmed; a field
-- runs over its continuation lines (RFC 5322 2.2.3).
function _M.find(head, lname)
  local out = {}
  local n = #head
  local pos = 1
  while pos <= n do
    local e = find(head, "\r\n", pos, true) or (n + 1)
    if e == pos then break end -- the empty line that ends the header section
    local start = pos
    local line = sub(head, pos, e - 1)
    pos = e + 2
    while pos <= n do
      local c = byte(head, pos)
      if c ~= 32 and c ~= 9 then break end
      local e2 = find(head, "\r\n", pos, true) or (n + 1)
      line = line .. sub(head, pos, e2 - 1)
      pos = e2 + 2
    end
    local fname, value = line:match("^([!-9;-~]+)[ \t]*:(.*)$")
    if fname and fname:lower() == lname then
      out[#out + 1] = { first = start, last = pos - 1 > n and n or pos - 1, value = value:match("^%s*(.-)%s*$") }
    end
  end
  return out
end

return _M
