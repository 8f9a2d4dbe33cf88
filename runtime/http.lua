-- A small HTTP/1.1 server for the operator's side: the API, /metrics and
-- the health checks. One task per connection over runtime/stream.lua,
-- keep-alive, Content-Length bodies, JSON in and out.
--
--   local http = require "moonpost.runtime.http"
--   local router = http.router()
--   router:add("GET", "/api/v1/messages/:id", function(req) return 200, { id = req.params.id } end)
--   router:add("GET", "/healthz", fn, { open = true })   -- open: no token needed
--   local srv, err = http.listen { host = "127.0.0.1", port = 8025, router = router, token = "secret" }
--   srv:close()
--
-- A handler gets req = { method, path, query, headers (lower-case names),
-- body, params, remote, json = fn() -> value | nil, err } and returns
-- status, body, headers: a table body is sent as JSON, a string as is (with
-- the Content-Type the headers give, text/plain by default). A handler may
-- wait (it runs in the connection's task); one that raises gets a 500 and
-- its error is logged, not sent.
--
-- Authorization: with a token, every route that is not open needs
-- "Authorization: Bearer <token>" (401 otherwise); without one, routes
-- that are not open answer only clients on loopback (403 otherwise).
local uv = require "luv"
local cjson = require "cjson.safe"
local bit = require "bit"
local sched = require "moonpost.runtime.sched"
local stream = require "moonpost.runtime.stream"
local log = require "moonpost.runtime.log"
local http_client = require "moonpost.runtime.http_client"

local format, concat, lower, find, byte = string.format, table.concat, string.lower, string.find,
  string.byte

local _M = { _VERSION = "0.1" }

local REASONS = {
  [200] = "OK", [201] = "Created", [202] = "Accepted", [204] = "No Content",
  [400] = "Bad Request", [401] = "Unauthorized", [403] = "Forbidden", [404] = "Not Found",
  [405] = "Method Not Allowed", [408] = "Request Timeout", [409] = "Conflict", [411] = "Length Required",
  [413] = "Content Too Large", [414] = "URI Too Long", [415] = "Unsupported Media Type",
  [422] = "Unprocessable Content", [429] = "Too Many Requests",
  [431] = "Request Header Fields Too Large", [500] = "Internal Server Error", [501] = "Not Implemented",
  [503] = "Service Unavailable",
}
_M.REASONS = REASONS

local MAX_LINE = 8192
local MAX_HEADERS = 100
local LINGER = 5 -- seconds a refused request's unread rest is read and dropped before the close

-- ---- routes ---------------------------------------------------------------------------

local Router = {}
local router_mt = { __index = Router }

function _M.router()
  return setmetatable({ routes = {} }, router_mt)
end

-- add(method, path, handler [, opts]): path segments ":name" match one
-- segment and come to the handler as req.params.name. opts.open: no token.
function Router:add(method, path, handler, opts)
  local names = {}
  local pat = "^" .. path:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0"):gsub("/:([%w_]+)", function(name)
    names[#names + 1] = name
    return "/([^/]+)"
  end) .. "$"
  self.routes[#self.routes + 1] = { method = method:upper(), path = path, pattern = pat, names = names,
    handler = handler, open = opts and opts.open or false }
end

-- match(method, path) -> route, params | nil, status (404 or 405)
function Router:match(method, path)
  local allowed
  for _, r in ipairs(self.routes) do
    local caps = { path:match(r.pattern) }
    if caps[1] ~= nil then
      if r.method == method or (method == "HEAD" and r.method == "GET") then
        local params = {}
        for i, name in ipairs(r.names) do params[name] = caps[i] end
        return r, params
      end
      allowed = allowed or {}
      allowed[#allowed + 1] = r.method
    end
  end
  if allowed then return nil, 405, concat(allowed, ", ") end
  return nil, 404
end

-- ---- helpers ------------------------------------------------------------------------------

local function unescape(s)
  s = s:gsub("+", " ")
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end
_M.unescape = unescape

local function parse_query(q)
  local out = {}
  if not q or q == "" then return out end
  for pair in q:gmatch("[^&]+") do
    local k, v = pair:match("^([^=]*)=?(.*)$")
    out[unescape(k)] = unescape(v)
  end
  return out
end

-- Compare a string a client sent with the secret b, in time that depends on
-- neither where they differ nor how long a is (an early return on unequal
-- lengths told the secret's length).
local function same(a, b)
  local diff = bit.bxor(#a, #b)
  for i = 1, #b do diff = bit.bor(diff, bit.bxor(byte(a, i) or 0, byte(b, i))) end
  return diff == 0
end

-- authorized(field, token): the Authorization field is "Bearer <token>",
-- the scheme in any case (RFC 9110, 11.1), the token compared as same() does.
local function authorized(field, token)
  local scheme, cred = (field or ""):match("^(%S+)[ \t]+(.-)$")
  if not scheme or lower(scheme) ~= "bearer" then return false end
  return same(cred, token)
end

local function is_loopback(ip)
  return ip ~= nil and (ip:match("^127%.") ~= nil or ip == "::1" or ip:match("^::ffff:127%.") ~= nil)
end
_M.is_loopback = is_loopback

-- encode_body(body, headers) -> data | nil, err (a table cjson cannot write:
-- inf or NaN, a function, nesting past 1000)
local function encode_body(body, headers)
  if type(body) == "table" then
    local s, err = cjson.encode(body)
    if not s then return nil, err end
    -- cjson writes an empty table as {}; an empty list means []
    headers["content-type"] = headers["content-type"] or "application/json"
    -- cjson passes octets >= 0x80 through as they are, and they are only
    -- ever inside strings: the text is made UTF-8 as it stands
    return log.utf8_clean(s)
  end
  if body == nil then return "" end
  headers["content-type"] = headers["content-type"] or "text/plain; charset=utf-8"
  return tostring(body)
end

-- respond(s, status, body, headers, head_only, keep [, what]): what names
-- the request in the log when the body cannot be written (a 500 goes instead).
local function respond(s, status, body, headers, head_only, keep, what)
  local h = {}
  for k, v in pairs(headers or {}) do h[lower(k)] = v end
  local data, err = encode_body(body, h)
  if not data then
    log.error("http %s: the answer cannot be sent as JSON: %s", what or "?", tostring(err))
    status, data, h = 500, '{"error":"internal error"}', { ["content-type"] = "application/json" }
  end
  h["content-length"] = tostring(#data)
  h["connection"] = keep and "keep-alive" or "close"
  local out = { format("HTTP/1.1 %d %s\r\n", status, REASONS[status] or "Unknown") }
  for k, v in pairs(h) do out[#out + 1] = k .. ": " .. tostring(v) .. "\r\n" end
  out[#out + 1] = "\r\n"
  if not head_only then out[#out + 1] = data end
  return s:send(concat(out), 30)
end

local function error_body(why)
  return { error = why }
end

-- ---- a connection ---------------------------------------------------------------------------

-- read_head(s, srv) -> req | nil, status, why (status nil: the peer went
-- away or was idle). The request line may take idle_timeout to come; the
-- rest of the head has srv.timeout in all, however it trickles in. Nothing
-- a client sends is held past MAX_LINE per line and MAX_HEADERS lines.
local function read_head(s, srv)
  local line, err
  -- empty lines before a request line are ignored (RFC 9112, 2.2: a client
  -- may end a POST body with an extra CRLF); a few, not for ever
  for _ = 1, 4 do
    line, err = s:receive("*l", srv.idle_timeout, MAX_LINE)
    if line ~= "" then break end
  end
  if not line then
    if err == "too long" then return nil, 414, "request line too long" end
    return nil, nil, err
  end
  local method, target, version = line:match("^(%u+) (%S+) HTTP/(%d%.%d)$")
  if not method then return nil, 400, "malformed request line" end
  -- the absolute form (RFC 9112, 3.2.2: a server must accept it): its path
  local rest = target:match("^[Hh][Tt][Tt][Pp][Ss]?://[^/?#]*(.*)$")
  if rest then target = rest:sub(1, 1) == "/" and rest or ("/" .. rest) end
  local deadline = uv.now() + srv.timeout * 1000
  local headers, n = {}, 0
  while true do
    local h
    h, err = s:receive("*l", math.max(0.001, (deadline - uv.now()) / 1000), MAX_LINE)
    if not h then
      if err == "too long" then return nil, 431, "a header field over " .. MAX_LINE .. " bytes" end
      if err == "timeout" then return nil, 408, "the request head took too long" end
      return nil, nil, err
    end
    if h == "" then break end
    n = n + 1
    if n > MAX_HEADERS then return nil, 431, "more than " .. MAX_HEADERS .. " header fields" end
    local name, value = h:match("^([!#$%%&'*+%-.^_`|~%w]+):[ \t]*(.-)[ \t]*$")
    if not name then return nil, 400, "malformed header field" end
    name = lower(name)
    headers[name] = headers[name] and (headers[name] .. ", " .. value) or value
  end
  local path, query = target:match("^([^?#]*)%??([^#]*)")
  local req = { method = method, target = target, path = path, query = parse_query(query), headers = headers,
    version = version, body = "", length = 0 }
  if headers["transfer-encoding"] then return nil, 411, "send the body with Content-Length" end
  local len = headers["content-length"]
  if len then
    if not len:match("^%d+$") then return nil, 400, "bad Content-Length" end
    len = tonumber(len)
    -- /healthz, /readyz and /metrics need no token: a body they do not use
    -- would be read and held all the same
    if len > 0 and (method == "GET" or method == "HEAD") then
      return nil, 413, format("a %s request takes no body", method)
    end
    if len > srv.max_body then return nil, 413, format("the body is over %d bytes", srv.max_body) end
    req.length = len
  end
  return req
end

-- read_body(s, srv, req) -> true | nil, err: only for a request that may
-- reach its handler.
local function read_body(s, srv, req)
  if req.length == 0 then return true end
  local body, err = s:receive(req.length, srv.timeout)
  if not body then return nil, err end
  req.body = body
  return true
end

local function json_of(req)
  return function()
    if req.body == "" then return nil, "the request has no body" end
    local ct = req.headers["content-type"]
    if ct and not lower(ct):find("json", 1, true) then return nil, "Content-Type is not application/json" end
    local v, err = cjson.decode(req.body)
    if v == nil then return nil, "bad JSON: " .. tostring(err) end
    return v
  end
end

-- linger(s): the answer is out and the connection ends, but the client may
-- still be sending what was not read (a refused body, the rest of a long
-- line). Closed at once, the socket would answer that with a reset, and a
-- reset makes the client's kernel drop the answer it has not read yet
-- (RFC 9112, 9.6). So: half-close, then read and drop for a while, holding
-- nothing, until the client closes.
local function linger(s)
  local tcp = s.tcp
  if s.closed or s.eof or tcp:is_closing() then return end
  pcall(tcp.shutdown, tcp)
  local deadline = uv.now() + LINGER * 1000
  while true do
    s.rbuf, s.rlen = nil, 0
    local left = (deadline - uv.now()) / 1000
    if left <= 0 or not s:wait_input(left) then return end
  end
end

local function serve(srv, s, remote)
  while not srv.closed do
    local req, status, why = read_head(s, srv)
    if not req then
      if status and respond(s, status, error_body(why), nil, false, false) and status ~= 408 then linger(s) end
      break
    end
    req.remote = remote
    local keep = (req.version == "1.1" and lower(req.headers.connection or "") ~= "close")
      or (req.version == "1.0" and lower(req.headers.connection or "") == "keep-alive")
    local route, params, allow = srv.router:match(req.method, req.path)
    local code, body, headers
    local refused = true -- answered without reading the body: the connection ends
    if not route then
      code = params
      body = error_body(code == 405 and ("method " .. req.method .. " not allowed here") or
        ("no such endpoint: " .. req.path))
      headers = code == 405 and { allow = allow } or nil
    elseif not route.open and srv.token and not authorized(req.headers.authorization, srv.token) then
      code, body, headers = 401, error_body("a valid bearer token is required"), { ["www-authenticate"] = "Bearer" }
    elseif not route.open and not srv.token and not is_loopback(remote) then
      code, body = 403, error_body("the API answers loopback clients only when no token is configured")
    elseif not read_body(s, srv, req) then
      break
    else
      refused = false
      req.params = params
      req.json = json_of(req)
      local ok, c, b, h = xpcall(route.handler, debug.traceback, req)
      if ok then
        code, body, headers = c or 200, b, h
      else
        log.error("http %s %s: %s", req.method, req.path, tostring(c))
        code, body = 500, error_body("internal error")
      end
    end
    srv.stats.requests = srv.stats.requests + 1
    local unread = refused and req.length > 0
    if unread then keep = false end
    if not respond(s, code, body, headers, req.method == "HEAD", keep, req.method .. " " .. req.path) then break end
    if not keep then
      if unread then linger(s) end
      break
    end
  end
  s:close()
end

-- ---- the listener -----------------------------------------------------------------------------

local Server = {}
local server_mt = { __index = Server }

-- What a connection past max_connections gets before it is closed.
local BUSY = "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
  .. 'content-length: 32\r\n\r\n{"error":"too many connections"}'

-- listen{ host, port, router, token, max_body, max_connections, timeout,
-- idle_timeout } -> server | nil, err. Past max_connections open at once,
-- a new connection gets a 503 and is closed: each one holds a descriptor
-- (which the SMTP listeners need too) and up to a line, a body and 1 MiB.
function _M.listen(o)
  local srv = setmetatable({ router = o.router, token = o.token, max_body = o.max_body or 10485760,
    max_connections = o.max_connections or 256, active = 0,
    timeout = o.timeout or 30, idle_timeout = o.idle_timeout or 60, conns = {}, closed = false,
    stats = { connections = 0, requests = 0, refused = 0 } }, server_mt)
  local tcp = uv.new_tcp()
  local pok, ok, err = pcall(tcp.bind, tcp, o.host, o.port, find(o.host, ":", 1, true) and { ipv6only = true } or nil)
  if not pok then ok, err = nil, ok end
  if ok then
    ok, err = tcp:listen(128, sched.callback(function(lerr)
      if lerr then return end
      local c = uv.new_tcp()
      if not tcp:accept(c) then
        c:close()
        return
      end
      if srv.active >= srv.max_connections then
        srv.stats.refused = srv.stats.refused + 1
        pcall(uv.try_write, c, BUSY)
        c:close()
        if srv.stats.refused == 1 or srv.stats.refused % 1000 == 0 then
          log.warn("http %s: connection refused, %d open (%d refused so far)", srv.name, srv.active,
            srv.stats.refused)
        end
        return
      end
      srv.stats.connections = srv.stats.connections + 1
      local s = stream.new(c)
      local peer = c:getpeername()
      srv.conns[s] = true
      srv.active = srv.active + 1
      local function done()
        if srv.conns[s] then
          srv.conns[s] = nil
          srv.active = srv.active - 1
        end
      end
      sched.spawn_named("http", function(e)
        log.error("http: %s", tostring(e))
        s:close()
        done()
      end, function()
        serve(srv, s, peer and peer.ip)
        done()
      end)
    end, "http listener"))
  end
  if not ok then
    tcp:close()
    local shown = find(o.host, ":", 1, true) and ("[" .. o.host .. "]:" .. o.port) or (o.host .. ":" .. o.port)
    return nil, format("cannot listen (http) on %s: %s", shown, tostring(err))
  end
  srv.tcp = tcp
  local a = tcp:getsockname()
  srv.host, srv.port = a.ip, a.port
  srv.name = (find(a.ip, ":", 1, true) and ("[" .. a.ip .. "]") or a.ip) .. ":" .. a.port
  return srv
end

-- close(): stop listening and close every connection.
function Server:close()
  self.closed = true
  if self.tcp and not self.tcp:is_closing() then self.tcp:close() end
  self.tcp = nil
  for s in pairs(self.conns) do s:close() end
end

-- A one-shot request for the specs and `moonpost ctl`, on
-- moonpost.runtime.http_client: request(host, port, method, path, body,
-- headers, timeout) -> status, body, headers | nil, err. A table body goes
-- as JSON. Response bodies up to 64 MiB (ctl's exports).
function _M.request(host, port, method, path, body, headers, timeout)
  local h = { Connection = "close" }
  for k, v in pairs(headers or {}) do h[k] = v end
  if type(body) == "table" then
    body = cjson.encode(body)
    h["Content-Type"] = "application/json"
  end
  local authority = (host:find(":", 1, true) and ("[" .. host .. "]") or host) .. ":" .. port
  local c, err = http_client.new("http://" .. authority .. path, { timeout = timeout or 30, max_body = 64 * 1048576 })
  if not c then return nil, err end
  local res
  res, err = c:request(method, body, h)
  c:close()
  if not res then return nil, err end
  return res.status, res.body, res.headers
end

return _M
