-- A small HTTP/1.1 client over cosocket streams, for code running in a task
-- (the event log's webhook). http:// only, to an address (a loopback
-- receiver, a sidecar); no TLS, no redirects, no proxies.
--
--   local http = require "moonpost.runtime.http_client"
--   local c, err = http.new("http://127.0.0.1:9000/events", { timeout = 10, headers = { ... } })
--   local res, err = c:request("POST", body, { ["Content-Type"] = "application/json" })
--   -- res = { status = 200, reason = "OK", headers = { ["content-type"] = ... }, body = "..." }
--   c:close()                      -- the kept connection; c:abort() also ends a request in progress,
--                                  -- c:retire() lets it finish first
--   http.parse_date("Sun, 06 Nov 1994 08:49:37 GMT") -> 784111777 (seconds since 1970) | nil
--   http.retry_after(value [, now]) -> seconds to wait | nil   (a Retry-After field)
--
-- The connection is kept alive between requests when the server allows it;
-- a request on a kept connection that the server closed meanwhile is sent
-- again once on a new one (the caller must accept a repeated request: the
-- webhook is at-least-once anyway). Request bodies carry Content-Length;
-- responses may use Content-Length, chunked encoding or end at close.
-- Expected failures return nil and a short token with the detail:
-- "timeout", "closed", "connect: ECONNREFUSED", "bad response: ...".
local uv = require "luv"
local stream = require "moonpost.runtime.stream"
local sched = require "moonpost.runtime.sched"

local format, concat, lower, find, tonumber, pairs, type = string.format, table.concat, string.lower, string.find,
  tonumber, pairs, type

local _M = { _VERSION = "0.1" }

local Client = {}
local mt = { __index = Client }

-- Limits on what a server may send back: header fields, and the body unless
-- opts.max_body says otherwise (the webhook does not use it; moonpost ctl's
-- exports do).
local MAX_HEADERS = 100
local MAX_BODY = 1048576
local MAX_LINE = 65536 -- a status line, header or chunk-size line

-- ---- dates (RFC 9110 5.6.7) ------------------------------------------------------

local MONTHS = { jan = 1, feb = 2, mar = 3, apr = 4, may = 5, jun = 6, jul = 7, aug = 8, sep = 9, oct = 10,
  nov = 11, dec = 12 }

local days_from_civil = require("moonpost.runtime.config").days_from_civil

local function epoch(y, mon, d, hh, mm, ss)
  local m = MONTHS[lower(mon)]
  y, d, hh, mm, ss = tonumber(y), tonumber(d), tonumber(hh), tonumber(mm), tonumber(ss)
  if not m or d < 1 or d > 31 or hh > 23 or mm > 59 or ss > 60 then return nil end
  return days_from_civil(y, m, d) * 86400 + hh * 3600 + mm * 60 + ss
end

-- parse_date(s) -> seconds since 1970 (UTC) | nil: an HTTP-date in any of
-- the three forms a recipient must accept: IMF-fixdate ("Sun, 06 Nov 1994
-- 08:49:37 GMT"), RFC 850 ("Sunday, 06-Nov-94 08:49:37 GMT", a two-digit
-- year more than 50 years ahead taken as the century before) and asctime
-- ("Sun Nov  6 08:49:37 1994").
function _M.parse_date(s, now)
  if type(s) ~= "string" then return nil end
  local d, mon, y, hh, mm, ss = s:match("^%s*%a+, (%d%d) (%a%a%a) (%d%d%d%d) (%d%d):(%d%d):(%d%d) GMT%s*$")
  if d then return epoch(y, mon, d, hh, mm, ss) end
  d, mon, y, hh, mm, ss = s:match("^%s*%a+, (%d%d)%-(%a%a%a)%-(%d%d) (%d%d):(%d%d):(%d%d) GMT%s*$")
  if d then
    local this = tonumber(os.date("!%Y", now or os.time()))
    local full = math.floor(this / 100) * 100 + tonumber(y)
    if full > this + 50 then full = full - 100 end
    return epoch(full, mon, d, hh, mm, ss)
  end
  mon, d, hh, mm, ss, y = s:match("^%s*%a+ (%a%a%a) ([ %d]%d) (%d%d):(%d%d):(%d%d) (%d%d%d%d)%s*$")
  if mon then return epoch(y, mon, d:gsub(" ", ""), hh, mm, ss) end
  return nil
end

-- retry_after(value [, now]) -> seconds | nil: a Retry-After field, either
-- seconds or an HTTP-date (then the time left until it, 0 when past).
function _M.retry_after(v, now)
  if type(v) ~= "string" then return nil end
  local secs = v:match("^%s*(%d+)%s*$")
  if secs then return tonumber(secs) end
  now = now or os.time()
  local t = _M.parse_date(v, now)
  if not t then return nil end
  return math.max(0, t - now)
end

-- parse_url("http://127.0.0.1:9000/events") -> { host, port, path, authority } | nil, err
function _M.parse_url(url)
  if type(url) ~= "string" then return nil, "expected a string" end
  local scheme, rest = url:match("^(%a[%w+.-]*)://(.*)$")
  if not scheme then return nil, "not an absolute URL" end
  -- it goes as it is into the request line and the Host field: a space, a
  -- control character (CR LF would add header fields) or an 8-bit octet
  -- would make a request that no server reads as meant
  if find(url, "[%z\1-\32\127-\255]") then
    return nil, "a space, control character or non-ASCII octet in the URL (percent-encode it)"
  end
  if lower(scheme) ~= "http" then return nil, "only http:// is supported, got " .. scheme .. "://" end
  local authority, path = rest:match("^([^/?#]*)(.*)$")
  if path == "" then path = "/" end
  path = path:gsub("#.*$", "")
  if path:sub(1, 1) == "?" then path = "/" .. path end
  local host, port
  if authority:sub(1, 1) == "[" then
    host, port = authority:match("^%[([%x:.]+)%]:?(%d*)$")
  else
    host, port = authority:match("^([^:@]+):?(%d*)$")
  end
  if not host then return nil, "bad host in " .. url end
  port = port ~= "" and tonumber(port) or 80
  if port < 1 or port > 65535 then return nil, "bad port in " .. url end
  if lower(host) == "localhost" then host = "127.0.0.1" end
  -- stream.connect takes addresses: no resolver here
  if not host:match("^%d+%.%d+%.%d+%.%d+$") and not host:find(":", 1, true) then
    return nil, "the host must be an IP address or localhost, got " .. host
  end
  return { host = host, port = port, path = path, authority = authority }
end

-- new(url, opts) -> client | nil, err. opts.timeout (seconds, default 10)
-- bounds each request as a whole; opts.headers are sent with every request;
-- opts.max_body (octets, default 1 MiB) is the largest response body taken.
function _M.new(url, opts)
  opts = opts or {}
  local u, err = _M.parse_url(url)
  if not u then return nil, err end
  return setmetatable({ url = u, timeout = opts.timeout or 10, headers = opts.headers or {}, s = nil,
    requests = 0, connects = 0, max_body = opts.max_body or MAX_BODY }, mt)
end

local function left(deadline)
  return math.max(0.001, (deadline - uv.now()) / 1000)
end

local function getline(s, deadline)
  local line, err = s:receive("*l", left(deadline), MAX_LINE)
  if not line and err == "too long" then return nil, "bad response: a line over " .. MAX_LINE .. " bytes" end
  return line, err
end

local function read_body(s, h, deadline, max_body)
  local te = h["transfer-encoding"]
  if te and lower(te):find("chunked", 1, true) then
    local parts, size = {}, 0
    while true do
      local line, err = getline(s, deadline)
      if not line then return nil, err end
      local n = tonumber(line:match("^%s*(%x+)"), 16)
      if not n then return nil, "bad response: chunk size " .. line:sub(1, 40) end
      if n == 0 then
        -- trailer fields up to the empty line
        local fields = 0
        repeat
          line, err = getline(s, deadline)
          if not line then return nil, err end
          fields = fields + 1
          if fields > MAX_HEADERS then return nil, "bad response: too many trailer fields" end
        until line == ""
        return concat(parts), true
      end
      size = size + n
      if size > max_body then return nil, "bad response: body too large" end
      local data, derr = s:receive(n, left(deadline))
      if not data then return nil, derr end
      parts[#parts + 1] = data
      local crlf, cerr = getline(s, deadline)
      if not crlf then return nil, cerr end
    end
  end
  local cl = h["content-length"]
  if cl then
    local n = tonumber(cl)
    if not n or n < 0 or n % 1 ~= 0 then return nil, "bad response: Content-Length " .. cl end
    if n > max_body then return nil, "bad response: body too large" end
    local data, err = s:receive(n, left(deadline))
    if not data then return nil, err end
    return data, true
  end
  -- no framing: the body ends when the server closes
  local data, err, partial = s:receive(max_body + 1, left(deadline))
  if data then return nil, "bad response: body too large" end
  if err == "closed" then return partial or "", false end
  return nil, err
end

local MAX_INTERIM = 8 -- 1xx answers read before the final one

-- One exchange on the open connection: the response, and whether the
-- connection may be used again.
local function exchange(self, req, deadline, method)
  local s = self.s
  local ok, err = s:send(req, left(deadline))
  if not ok then return nil, err end
  local v, status, reason, h
  -- interim answers (100 Continue, 103 Early Hints) come before the final
  -- one, which answers this request (RFC 9110 15.2); the next request must
  -- not read it as its own. 101 would switch protocols: not for us.
  for i = 1, MAX_INTERIM + 1 do
    local line
    line, err = getline(s, deadline)
    if not line then return nil, err end
    v, status, reason = line:match("^HTTP/1%.(%d) (%d%d%d) ?(.*)$")
    if not v then return nil, "bad response: status line " .. format("%q", line:sub(1, 60)) end
    local n = 0
    h = {}
    while true do
      local hl, herr = getline(s, deadline)
      if not hl then return nil, herr end
      if hl == "" then break end
      n = n + 1
      if n > MAX_HEADERS then return nil, "bad response: too many header fields" end
      local name, value = hl:match("^([^:%s]+):%s*(.-)%s*$")
      if not name then return nil, "bad response: header line " .. format("%q", hl:sub(1, 60)) end
      name = lower(name)
      h[name] = h[name] and (h[name] .. ", " .. value) or value
    end
    status = tonumber(status)
    if status >= 200 or status == 101 then break end
    if i == MAX_INTERIM + 1 then return nil, "bad response: more than " .. MAX_INTERIM .. " interim answers" end
  end
  if status == 101 then return nil, "bad response: 101 Switching Protocols" end
  local body, framed = "", true
  -- no body: informational, 204, 304, and any answer to HEAD (RFC 9110 9.3.2)
  if not (status < 200 or status == 204 or status == 304 or method == "HEAD") then
    body, framed = read_body(s, h, deadline, self.max_body)
    if not body then return nil, framed end
  end
  local conn = lower(h["connection"] or "")
  local keep = framed and v == "1" and not conn:find("close", 1, true)
  return { status = status, reason = reason, headers = h, body = body }, keep
end

function Client:connect(deadline)
  local u = self.url
  self.connecting = sched.current()
  local s, err = stream.connect(u.host, u.port, left(deadline))
  self.connecting = nil
  if s and self.aborted then
    s:close()
    s, err = nil, "aborted"
  end
  if not s then return nil, "connect: " .. tostring(err) end
  self.connects = self.connects + 1
  self.s = s
  return true
end

-- request(method, body, headers) -> res | nil, err
function Client:request(method, body, headers)
  if self.aborted then return nil, "aborted" end
  body = body or ""
  local u = self.url
  local lines = { format("%s %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n", method, u.path, u.authority, #body) }
  for k, v in pairs(self.headers) do lines[#lines + 1] = k .. ": " .. tostring(v) .. "\r\n" end
  for k, v in pairs(headers or {}) do lines[#lines + 1] = k .. ": " .. tostring(v) .. "\r\n" end
  lines[#lines + 1] = "\r\n"
  lines[#lines + 1] = body
  local req = concat(lines)
  local deadline = uv.now() + self.timeout * 1000
  self.requests = self.requests + 1
  for try = 1, 2 do
    local reused = self.s ~= nil
    if not reused then
      local ok, err = self:connect(deadline)
      if not ok then return nil, err end
    end
    self.busy = true
    local res, keep = exchange(self, req, deadline, method)
    self.busy = false
    if res then
      if not keep or self.retiring then self:close() end
      return res
    end
    self:close()
    if self.aborted then return nil, "aborted" end
    -- a kept connection the server has closed since: once more on a new one
    if not (reused and try == 1 and (keep == "closed" or (type(keep) == "string" and keep:match("^E")))) then
      return nil, keep
    end
  end
end

-- retire(): the connection closes when the request in progress (if any)
-- has ended; the client is not used again.
function Client:retire()
  self.retiring = true
  if not self.busy then self:close() end
end

function Client:close()
  if self.s then
    self.s:close()
    self.s = nil
  end
  return true
end

-- abort(): close, and end a request in progress (even one waiting for its
-- connection) with "aborted"; later requests fail the same way.
function Client:abort()
  self.aborted = true
  if self.connecting then
    local t = self.connecting
    self.connecting = nil
    sched.wake(t, nil, "aborted")
  end
  return self:close()
end

return _M
