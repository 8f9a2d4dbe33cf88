-- moonpost ctl: the operator's command line over the HTTP API
-- (modules/admin.lua, docs/http-api.md; docs/cli.md#moonpost-ctl).
--
--   moonpost ctl [--url URL] [--token TOKEN] [--json] COMMAND [options]
--
-- The URL defaults to $MOONPOST_HTTP (host:port, as the examples listen)
-- or http://127.0.0.1:8025, the token to $MOONPOST_API_TOKEN. Output is a
-- readable table or summary, or with --json the API's JSON as it came.
-- Exit status: 0 done, 1 the API answered an error (or could not be
-- reached), 2 usage.
local uv = require "luv"
local cjson = require "cjson.safe"
local sched = require "moonpost.runtime.sched"
local http = require "moonpost.runtime.http"
local http_client = require "moonpost.runtime.http_client"

local format, concat, rep, gsub, byte = string.format, table.concat, string.rep, string.gsub, string.byte

local _M = {}

_M.USAGE = [==[
usage: moonpost ctl [--url URL] [--token TOKEN] [--json] [--timeout SECONDS] COMMAND [options]

  health                                        is the server alive and ready
  queues [--tenant T] [--domain D] [--site S]   depth, oldest and last error per queue and site
  inspect ID [--body [--body-max OCTETS]]      one queued message
  suspend [--tenant T] [--domain D] [--site S] [--reason TEXT]
  resume [--tenant T] [--domain D] [--site S] | resume --all
  suspensions
  bounce [--tenant T] [--domain D] [--from A] [--rcpt A] [--older-than DURATION] [--silent] [--all]
  inject --from A --to B [--to C ...] [--subject S] [--text T | --text-file F] [--html H | --html-file F]
         [--attach FILE[:TYPE] ...] [--header 'Name: value' ...] [--tenant T] [--pool P]
  inject --from A --to B --content-file MESSAGE.eml
  suppress add [--tenant T] [--reason R] ADDRESS...
  suppress remove [--tenant T] ADDRESS...
  suppress list [--tenant T] [--limit N] [--offset N]
  suppress export [--tenant T]                  CSV on standard output
  reload                                        load the policy again (as SIGHUP does)

URL defaults to $MOONPOST_HTTP or http://127.0.0.1:8025; TOKEN to $MOONPOST_API_TOKEN.
]==]

-- options that take a value (the ones marked many may be repeated), and flags
local VALUES = { url = 1, token = 1, timeout = 1, tenant = 1, domain = 1, site = 1, reason = 1, from = 1,
  to = "many", subject = 1, text = 1, ["text-file"] = 1, html = 1, ["html-file"] = 1, attach = "many",
  header = "many", pool = 1, ["content-file"] = 1, rcpt = 1, ["older-than"] = 1, limit = 1, offset = 1,
  ["body-max"] = 1 }
local FLAGS = { json = true, body = true, silent = true, all = true, help = true }

local function usage_error(why)
  io.stderr:write("moonpost: ctl: ", why, "\n", _M.USAGE)
  return 2
end

-- parse(argv, first) -> { opts, args } | nil, why
local function parse(argv, first)
  local opts, args = {}, {}
  local i = first
  while i <= #argv do
    local a = argv[i]
    local name, inline = a:match("^%-%-([%w%-]+)=(.*)$")
    name = name or a:match("^%-%-([%w%-]+)$")
    if name then
      if FLAGS[name] then
        if inline then return nil, "--" .. name .. " takes no value" end
        opts[name] = true
      elseif VALUES[name] then
        local v = inline
        if not v then
          i = i + 1
          v = argv[i]
          if v == nil then return nil, "--" .. name .. " needs a value" end
        end
        if VALUES[name] == "many" then
          opts[name] = opts[name] or {}
          table.insert(opts[name], v)
        else
          opts[name] = v
        end
      else
        return nil, "unknown option " .. a
      end
    elseif a:sub(1, 1) == "-" and a ~= "-" then
      return nil, "unknown option " .. a
    else
      args[#args + 1] = a
    end
    i = i + 1
  end
  return { opts = opts, args = args }
end

-- "http://127.0.0.1:8025", "127.0.0.1:8025", "[::1]:8025" -> host, port | nil, why
-- (the URL rules of moonpost.runtime.http_client; the port defaults to the
-- API's 8025, and the scheme to http)
local function parse_url(u)
  if u:match("^https://") then
    return nil, "https is not supported: reach the API over http on loopback (or through a TLS proxy)"
  end
  local p, why = http_client.parse_url(u:match("^%a[%w+.-]*://") and u or ("http://" .. u))
  if not p then return nil, "bad URL " .. u .. ": " .. why end
  return p.host, p.authority:match(":(%d+)$") and p.port or 8025
end

local function escape(s)
  return (tostring(s):gsub("[^%w%-%._~]", function(c) return format("%%%02X", c:byte()) end))
end

local function query(pairs_list)
  local q = {}
  for _, p in ipairs(pairs_list) do
    if p[2] ~= nil then q[#q + 1] = p[1] .. "=" .. escape(p[2]) end
  end
  return #q > 0 and ("?" .. concat(q, "&")) or ""
end

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local s = f:read("*a")
  f:close()
  return s
end

-- ---- output -------------------------------------------------------------------------------------

local function age(s)
  if type(s) ~= "number" then return "-" end
  if s < 120 then return format("%ds", s) end
  if s < 7200 then return format("%dm", math.floor(s / 60)) end
  if s < 172800 then return format("%dh", math.floor(s / 3600)) end
  return format("%dd", math.floor(s / 86400))
end

local function cell(v)
  if v == nil or v == cjson.null then return "-" end
  return tostring(v)
end

-- table_out(header, rows): columns padded to their widest cell
local function table_out(header, rows)
  local w = {}
  for i, h in ipairs(header) do w[i] = #h end
  for _, r in ipairs(rows) do
    for i = 1, #header do
      r[i] = cell(r[i])
      if i < #header and #r[i] > w[i] then w[i] = #r[i] end
    end
  end
  local function line(r)
    local out = {}
    for i = 1, #header do
      out[i] = i < #header and (r[i] .. rep(" ", w[i] - #r[i])) or r[i]
    end
    io.stdout:write((concat(out, "  "):gsub("%s+$", "")), "\n")
  end
  line(header)
  for _, r in ipairs(rows) do line(r) end
end

local function list_of(v)
  if type(v) ~= "table" then return {} end
  return v
end

local SHOW = {}

function SHOW.health(r)
  io.stdout:write(format("%s, %s%s\n", cell(r.alive and r.alive.status), cell(r.ready and r.ready.status),
    (r.ready and r.ready.reason) and (" (" .. r.ready.reason .. ")") or ""))
end

function SHOW.queues(r)
  io.stdout:write(format("%d messages queued\n\n", r.messages or 0))
  local rows = {}
  for _, q in ipairs(list_of(r.queues)) do
    rows[#rows + 1] = { q.unread and "(recovered, not read yet)" or (q.tenant ~= "" and q.tenant or "-"), q.domain,
      q.depth, age(q.oldest), q.last_error }
  end
  table_out({ "TENANT", "DOMAIN", "DEPTH", "OLDEST", "LAST ERROR" }, rows)
  local sites = list_of(r.sites)
  if #sites > 0 then
    io.stdout:write("\n")
    rows = {}
    for _, s in ipairs(sites) do
      local state = s.suspended and "suspended" or (s.shaping_suspended_for and "suspended by a rule")
        or (s.slowed_for and "slowed") or (s.bouncing_for and "bouncing") or ""
      rows[#rows + 1] = { s.site, s.inflight, s.parked, s.delivered, s.deferred, s.bounced, state, s.last_error }
    end
    table_out({ "SITE", "INFLIGHT", "PARKED", "DELIVERED", "DEFERRED", "BOUNCED", "STATE", "LAST ERROR" }, rows)
  end
  local susp = list_of(r.suspensions)
  if #susp > 0 then
    io.stdout:write("\n")
    SHOW.suspensions({ suspensions = susp })
  end
end

function SHOW.suspensions(r)
  local rows = {}
  for _, s in ipairs(list_of(r.suspensions)) do
    rows[#rows + 1] = { s.key, s.since_iso, s.held, s.reason }
  end
  if #rows == 0 then return io.stdout:write("no suspensions\n") end
  table_out({ "SUSPENDED", "SINCE", "HELD", "REASON" }, rows)
end

function SHOW.suspend(r)
  local s = r.suspended
  io.stdout:write(format("%s %s\n", r.existing and "already suspended:" or "suspended", s.key))
end

function SHOW.resume(r)
  io.stdout:write(format("resumed %s; %d messages released\n", concat(list_of(r.resumed), ", "), r.released or 0))
end

function SHOW.bounce(r)
  io.stdout:write(format("%d recipients in %d messages matched: %d bounced%s, %d pending\n", r.matched or 0,
    r.messages or 0, r.bounced or 0, r.dsn and " with DSN" or " silently", r.pending or 0))
end

function SHOW.inject(r)
  for _, id in ipairs(list_of(r.ids)) do io.stdout:write("queued ", id, "\n") end
  for _, x in ipairs(list_of(r.refused)) do
    io.stdout:write(format("refused <%s>: %s\n", tostring(x.address), tostring(x.reply)))
  end
end

function SHOW.inspect(r)
  local function kv(k, v) io.stdout:write(format("%-13s %s\n", k .. ":", cell(v))) end
  kv("id", r.id)
  kv("state", r.state .. (r.suspended_by and (" (" .. r.suspended_by .. ")") or ""))
  kv("from", "<" .. cell(r.from) .. ">")
  if r.tenant then kv("tenant", r.tenant) end
  if r.pool then kv("pool", r.pool) end
  kv("received", r.received and (os.date("!%Y-%m-%dT%H:%M:%SZ", r.received) .. " (" .. age(r.age) .. " ago)"))
  kv("size", r.size)
  kv("attempts", r.attempts)
  kv("next attempt", r.next_attempt and os.date("!%Y-%m-%dT%H:%M:%SZ", r.next_attempt) or "-")
  io.stdout:write("\n")
  local rows = {}
  for _, rc in ipairs(list_of(r.recipients)) do
    local lr = rc.last_result
    local said = lr and lr ~= cjson.null and concat({ lr.code and tostring(lr.code) or "", lr.enhanced or "",
      lr.text or "" }, " "):gsub("^%s+", "") or nil
    rows[#rows + 1] = { rc.address, rc.state, said }
  end
  table_out({ "RECIPIENT", "STATE", "LAST RESULT" }, rows)
  io.stdout:write("\n")
  for _, h in ipairs(list_of(r.headers)) do io.stdout:write(h.name, ": ", h.value, "\n") end
  if r.body then io.stdout:write("\n", r.body) end
  if r.body_truncated then
    io.stdout:write(format("\n[body cut at %d of %d octets: --body-max N for more]\n", #(r.body or ""),
      r.body_size or 0))
  end
end

function SHOW.suppress_list(r)
  local rows = {}
  for _, e in ipairs(list_of(r.entries)) do rows[#rows + 1] = { e.tenant ~= "" and e.tenant or "-", e.address,
    e.reason, e.since } end
  table_out({ "TENANT", "ADDRESS", "REASON", "SINCE" }, rows)
  io.stdout:write(format("%d of %d%s\n", r.count or #rows, r.total or #rows,
    r.next_offset and format(" (next: --offset %d)", r.next_offset) or ""))
end

function SHOW.suppress_add(r)
  io.stdout:write(format("%d added, %d there already\n", r.added or 0, r.existing or 0))
end

function SHOW.suppress_remove(r)
  io.stdout:write(format("%d removed, %d not there\n", r.removed or 0, r.missing or 0))
end

function SHOW.reload(r)
  io.stdout:write(r.policy and "policy reloaded\n" or "reloaded (certificates, keys and users files)\n")
end

-- ---- commands -> requests -----------------------------------------------------------------------

local CONTENT_TYPES = { pdf = "application/pdf", txt = "text/plain", csv = "text/csv", html = "text/html",
  htm = "text/html", png = "image/png", jpg = "image/jpeg", jpeg = "image/jpeg", gif = "image/gif",
  zip = "application/zip", json = "application/json", ics = "text/calendar", xml = "application/xml" }

local function inject_body(o)
  if not o.from then return nil, "inject needs --from" end
  if not o.to then return nil, "inject needs --to" end
  local b = { from = o.from, to = o.to, tenant = o.tenant, pool = o.pool }
  local err
  if o["content-file"] then
    b.content, err = read_file(o["content-file"])
    if not b.content then return nil, err end
    return b
  end
  b.subject = o.subject
  b.text = o.text
  if o["text-file"] then
    b.text, err = read_file(o["text-file"])
    if not b.text then return nil, err end
  end
  b.html = o.html
  if o["html-file"] then
    b.html, err = read_file(o["html-file"])
    if not b.html then return nil, err end
  end
  if o.header then
    b.headers = {}
    for _, h in ipairs(o.header) do
      local name, value = h:match("^([^:]+):%s*(.*)$")
      if not name then return nil, "--header: expected 'Name: value', got " .. h end
      b.headers[#b.headers + 1] = { name, value }
    end
  end
  if o.attach then
    local passwd = require "moonpost.runtime.passwd"
    b.attachments = {}
    for _, spec in ipairs(o.attach) do
      local path, ctype = spec:match("^(.-):([%w%-%.%+]+/[%w%-%.%+]+)$")
      path = path or spec
      local data, rerr = read_file(path)
      if not data then return nil, "--attach: " .. tostring(rerr) end
      local name = path:match("([^/]+)$")
      local ext = (name:match("%.(%w+)$") or ""):lower()
      b.attachments[#b.attachments + 1] = { name = name, content_type = ctype or CONTENT_TYPES[ext]
        or "application/octet-stream", data = passwd.b64encode(data) }
    end
  end
  return b
end

-- plan(cmd, p) -> { method, path, body, show } | nil, why
local function plan(cmd, p)
  local o, a = p.opts, p.args
  if cmd == "queues" then
    return { "GET", "/api/v1/queues" .. query({ { "tenant", o.tenant }, { "domain", o.domain }, { "site", o.site } }),
      show = "queues" }
  elseif cmd == "inspect" then
    if #a ~= 1 then return nil, "inspect needs one message id" end
    local q = o.body and "?body=1" or ""
    if o["body-max"] then
      if not o.body then return nil, "--body-max goes with --body" end
      q = q .. "&body_max=" .. escape(o["body-max"])
    end
    return { "GET", "/api/v1/messages/" .. escape(a[1]) .. q, show = "inspect" }
  elseif cmd == "suspend" or cmd == "resume" then
    local b = { tenant = o.tenant, domain = o.domain, site = o.site }
    if cmd == "suspend" then b.reason = o.reason end
    if cmd == "resume" and o.all then b.all = true end
    if not (b.tenant or b.domain or b.site or b.all) then
      return nil, cmd .. " needs --tenant, --domain and/or --site" .. (cmd == "resume" and ", or --all" or "")
    end
    return { "POST", "/api/v1/" .. cmd, b, show = cmd }
  elseif cmd == "suspensions" then
    return { "GET", "/api/v1/suspensions", show = "suspensions" }
  elseif cmd == "bounce" then
    local b = { tenant = o.tenant, domain = o.domain, from = o.from, rcpt = o.rcpt, older_than = o["older-than"],
      dsn = not o.silent, all = o.all or nil }
    return { "POST", "/api/v1/bounce", b, show = "bounce" }
  elseif cmd == "inject" then
    local b, err = inject_body(o)
    if not b then return nil, err end
    return { "POST", "/api/v1/messages", b, show = "inject" }
  elseif cmd == "suppress" then
    local sub = table.remove(a, 1)
    if sub == "add" or sub == "remove" then
      if #a == 0 then return nil, "suppress " .. sub .. " needs at least one address" end
      local b = { tenant = o.tenant, addresses = a, reason = sub == "add" and o.reason or nil }
      return { sub == "add" and "POST" or "DELETE", "/api/v1/suppressions", b, show = "suppress_" .. sub }
    elseif sub == "list" then
      return { "GET", "/api/v1/suppressions" .. query({ { "tenant", o.tenant }, { "limit", o.limit },
        { "offset", o.offset } }), show = "suppress_list" }
    elseif sub == "export" then
      return { "GET", "/api/v1/suppressions/export" .. query({ { "tenant", o.tenant } }), raw = true }
    end
    return nil, "suppress needs add, remove, list or export"
  elseif cmd == "reload" then
    return { "POST", "/api/v1/reload", {}, show = "reload" }
  end
  return nil, cmd and ("unknown command " .. cmd) or "no command"
end

-- ---- main ---------------------------------------------------------------------------------------

-- Run fn in a task on the loop until it returns.
local function in_loop(fn)
  local results
  local task = sched.spawn_named("ctl", function(e) results = { nil, tostring(e) } end, function()
    results = { fn() }
  end)
  while not task.done do uv.run("once") end
  for _ = 1, 10 do
    if not uv.run("nowait") then break end
  end
  return unpack(results or {})
end

-- Untrusted text for the terminal: header fields, bodies, a remote
-- server's reply and a suppression's reason come from anyone, and an ESC in
-- them would drive the terminal (clear it, retitle it, rewrite what was
-- printed). C0 controls other than tab, DEL and the C1 controls (U+0080 to
-- U+009F) are shown escaped: "\x1b", "\u009b". In a body (lines) CRLF
-- becomes a newline and a newline stays; elsewhere a newline is escaped too.
local function term(s, lines)
  s = tostring(s)
  if lines then s = gsub(s, "\r\n", "\n") end
  s = gsub(s, lines and "[%z\1-\8\11-\31\127]" or "[%z\1-\8\10-\31\127]", function(c)
    return format("\\x%02x", byte(c))
  end)
  return (gsub(s, "\194([\128-\159])", function(c) return format("\\u%04x", byte(c)) end))
end
_M.term = term

-- every string in an answer, for the terminal (the body keeps its lines)
local function term_all(v, key)
  if type(v) == "string" then return term(v, key == "body") end
  if type(v) ~= "table" then return v end
  local out = {}
  for k, x in pairs(v) do out[k] = term_all(x, k) end
  return setmetatable(out, getmetatable(v))
end

local function api_error(status, body)
  local v = cjson.decode(body or "")
  local why = type(v) == "table" and v.error or (body ~= "" and body) or http.REASONS[status] or "error"
  io.stderr:write(format("moonpost: ctl: %d %s: %s\n", status, http.REASONS[status] or "", term(why)))
  return 1
end

-- main(argv): argv[1] is "ctl"
function _M.main(argv)
  local p, why = parse(argv, 2)
  if not p then return usage_error(why) end
  local o = p.opts
  if o.help then
    io.stdout:write(_M.USAGE)
    return 0
  end
  local cmd = table.remove(p.args, 1)
  local url = o.url or os.getenv("MOONPOST_HTTP")
  if url == nil or url == "" then url = "http://127.0.0.1:8025" end
  local host, port = parse_url(url)
  if not host then return usage_error(port) end
  local token = o.token or os.getenv("MOONPOST_API_TOKEN")
  if token == "" then token = nil end
  local timeout = tonumber(o.timeout or "60")
  if not timeout or timeout ~= timeout or timeout <= 0 then -- (nan is no number of seconds)
    return usage_error("--timeout needs a number of seconds")
  end
  local headers = token and { Authorization = "Bearer " .. token } or nil
  local function request(method, path, body)
    return in_loop(function() return http.request(host, port, method, path, body, headers, timeout) end)
  end
  local where = (host:find(":", 1, true) and ("[" .. host .. "]") or host) .. ":" .. port
  -- show(name, v, what): print an answer readably; JSON of another shape
  -- than the API's (another server on that port, another version) is an
  -- error of one line, not a Lua error
  local function show(name, v, what)
    local ok, err = pcall(SHOW[name], term_all(v))
    if ok then return 0 end
    io.stderr:write(format("moonpost: ctl: unexpected answer from %s to %s: %s\n", where, what,
      term((tostring(err):gsub("^[^\n]-:%d+: ", "")))))
    return 1
  end
  if cmd == "health" then
    local s1, b1 = request("GET", "/healthz")
    if not s1 then
      io.stderr:write(format("moonpost: ctl: cannot reach %s: %s\n", where, tostring(b1)))
      return 1
    end
    local s2, b2 = request("GET", "/readyz")
    if not s2 then
      io.stderr:write(format("moonpost: ctl: cannot reach %s: %s\n", where, tostring(b2)))
      return 1
    end
    local r = { alive = cjson.decode(b1), ready = cjson.decode(b2) }
    if o.json then
      io.stdout:write(cjson.encode(r), "\n")
    elseif show("health", r, "GET /healthz") ~= 0 then
      return 1
    end
    if s1 ~= 200 then return api_error(s1, b1) end
    return s2 == 200 and 0 or 1
  end
  local req, perr = plan(cmd, p)
  if not req then return usage_error(perr) end
  local status, body = request(req[1], req[2], req[3])
  if not status then
    io.stderr:write(format("moonpost: ctl: cannot reach %s: %s\n", where, tostring(body)))
    return 1
  end
  if status >= 400 then return api_error(status, body) end
  if req.raw or o.json then
    io.stdout:write(body)
    if body:sub(-1) ~= "\n" then io.stdout:write("\n") end
    return 0
  end
  local v = cjson.decode(body)
  if type(v) ~= "table" then
    io.stdout:write(term(body, true), "\n")
    return 0
  end
  return show(req.show, v, req[1] .. " " .. req[2])
end

return _M
