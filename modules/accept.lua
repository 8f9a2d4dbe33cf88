-- moonpost.accept: where mail comes in.
--
--   mta:use(require("moonpost.accept").smtp {
--     listen = { "0.0.0.0:25", "[::]:25" },
--     max_message_size = "50M",
--     max_recipients = 1000,
--   })
--
-- Every option is in docs/accept.md.
local config = require "moonpost.runtime.config"
local tls = require "moonpost.runtime.tls"
local log = require "moonpost.runtime.log"
local net = require "moonpost.runtime.net"
local passwd = require "moonpost.runtime.passwd"
local dns = require "moonpost.runtime.dns"

local _M = { _VERSION = "0.1" }

local EXTENSIONS = { "pipelining", "size", "8bitmime", "enhancedstatuscodes", "smtputf8",
  "chunking", "dsn" }

local SMTP_SCHEMA = {
  listen = { type = "list", default = function() return { "127.0.0.1:2525" } end },
  name = { type = "string" },
  hostname = { type = "string" },
  banner = { type = "string" },
  -- bodies are held in memory until spooled: the cap must be finite
  max_message_size = { type = "size", default = 52428800,
    check = function(v) return v >= 1, "must be at least 1 (there is always a limit)" end },
  max_recipients = { type = "posint", default = 1000 },
  max_errors = { type = "posint", default = 20 },
  max_connections = { type = "posint", default = 10000 },
  max_command_length = { type = "posint", default = 512,
    check = function(v) return v >= 64, "must be at least 64" end },
  max_line_length = { type = "nonneg", default = 1000 },
  command_timeout = { type = "duration", default = 300, check = function(v) return v > 0, "must be > 0" end },
  data_timeout = { type = "duration", default = 180, check = function(v) return v > 0, "must be > 0" end },
  send_timeout = { type = "duration", default = 300, check = function(v) return v > 0, "must be > 0" end },
  idle_park_after = { type = "duration", default = 1 },
  idle_park_busy = { type = "posint", default = 5000 },
  bare_lf = { type = "enum", values = { "normalize", "reject" }, default = "normalize" },
  extensions = { type = "table" },
  backlog = { type = "posint", default = 511 },
  log_messages = { type = "boolean", default = true },
  input_high_water = { type = "size", default = 1048576 },
  tls = { type = "table" },
  auth = { type = "table" },
  relay = { type = "table" },
  local_domains = { type = "list" },
  domain_literals = { type = "boolean", default = true },
  tenant = { type = "string" },
  tenant_header = { type = "string",
    check = function(v) return v:match("^[!-9;-~]+$") ~= nil, "must be a header field name like \"X-Tenant\"" end },
}

local AUTH_SCHEMA = {
  file = { type = "string" },
  check = { type = "function" },
  allow_plaintext = { type = "boolean", default = false },
  required = { type = "boolean", default = false },
  mechanisms = { type = "list", default = function() return { "PLAIN", "LOGIN" } end },
  failure_delay = { type = "duration", default = 1 },
  timeout = { type = "duration", default = 30, check = function(v) return v > 0, "must be > 0" end },
  -- how long a matched password is remembered (users file only); 0: never
  cache = { type = "duration", default = 300 },
}

local MECHANISMS = { PLAIN = true, LOGIN = true }

local RELAY_SCHEMA = {
  authenticated = { type = "boolean", default = true },
  networks = { type = "table" },
}

-- Loopback may relay unless the policy says otherwise (docs/accept.md#relay-control).
local DEFAULT_NETWORKS = { "127.0.0.0/8", "::1/128" }

local function check_auth(v)
  local where = "accept.smtp: field 'auth'"
  local a = config.check(where, v, AUTH_SCHEMA)
  if (a.file == nil) == (a.check == nil) then
    config.raise(where .. ": give either 'file' (a users file) or 'check' (a function), not " ..
      (a.file and "both" or "neither"))
  end
  local mechs, list = {}, {}
  for i, m in ipairs(a.mechanisms) do
    local u = m:upper()
    if not MECHANISMS[u] then
      config.raise(string.format("%s: field 'mechanisms' item %d: unknown mechanism '%s' (known: PLAIN, LOGIN)",
        where, i, m))
    end
    if not mechs[u] then list[#list + 1] = u end
    mechs[u] = true
  end
  a.mechanisms, a.mechanism_list = mechs, list
  if a.file then
    local users, err = passwd.load_users(a.file)
    if not users then config.raise(where .. ": " .. err) end
    a.users = users
    if a.cache > 0 then a.cache_state = passwd.cache(a.cache) end
  end
  return a
end

local function check_relay(v)
  local where = "accept.smtp: field 'relay'"
  local r = config.check(where, v or {}, RELAY_SCHEMA)
  local list = r.networks or DEFAULT_NETWORKS
  for i, s in ipairs(list) do
    if type(s) ~= "string" then
      config.raise(string.format("%s: field 'networks' item %d: expected a string like \"10.0.0.0/8\"", where, i))
    end
  end
  local m, why = net.list(list)
  if not m then config.raise(where .. ": field 'networks' " .. why) end
  r.networks, r.matcher = list, m
  return r
end

-- local_domains: "example.com" (that domain) or "*.example.com" (its
-- subdomains); an internationalized one in either form, kept as A-labels
local function check_domains(list)
  if not list then return nil end
  local exact, suffixes = {}, {}
  for i, d in ipairs(list) do
    local dl = d:lower()
    if dl:find("[\128-\255]") then
      local star, name = dl:match("^(%*?%.?)(.*)$")
      local a, why = dns.to_ascii(name)
      if not a then
        config.raise(string.format("accept.smtp: field 'local_domains' item %d: not a domain: %q (%s)", i, d, why))
      end
      dl = star .. a
    end
    local suffix = dl:match("^%*(%..+)$")
    if suffix then
      suffixes[#suffixes + 1] = suffix
    elseif dl:match("^[%w_%-%.]+$") or dl:match("^%[[%w:%.]+%]$") then
      exact[dl] = true
    else
      config.raise(string.format("accept.smtp: field 'local_domains' item %d: not a domain: %q", i, d))
    end
  end
  return { exact = exact, suffixes = suffixes }
end

-- Tenants named by this block must be declared in moonpost.new { tenants = ... }.
local function check_tenants(o, mta)
  local function known(name, what)
    if not mta.tenants:get(name) then
      local names = mta.tenants:names()
      config.raise(string.format("accept.smtp: %s: tenant '%s' is not declared in moonpost.new { tenants = ... }%s",
        what, name, #names > 0 and (" (declared: " .. table.concat(names, ", ") .. ")") or ""))
    end
  end
  if o.tenant then known(o.tenant, "field 'tenant'") end
  local a = o.auth
  if a and a.users then
    for user, u in pairs(a.users) do
      if u.tenant then known(u.tenant, string.format("field 'auth': %s:%d: user '%s'", a.file, u.line, user)) end
    end
  end
end

local function check_extensions(t)
  local out = {}
  for _, name in ipairs(EXTENSIONS) do out[name] = true end
  if t == nil then return out end
  for k, v in pairs(t) do
    if out[k] == nil then
      config.raise(string.format("accept.smtp: field 'extensions': unknown extension '%s' (known: %s)",
        tostring(k), table.concat(EXTENSIONS, ", ")))
    end
    if type(v) ~= "boolean" then
      config.raise(string.format("accept.smtp: field 'extensions.%s': expected true or false, got %s",
        k, tostring(v)))
    end
    out[k] = v
  end
  return out
end

-- smtp(opts) -> block: SMTP listeners on every address in opts.listen.
function _M.smtp(opts)
  local o = config.check("accept.smtp", opts, SMTP_SCHEMA)
  o.extensions = check_extensions(o.extensions)
  o.timeouts = { command = o.command_timeout, data = o.data_timeout, send = o.send_timeout,
    park = o.idle_park_after, park_busy = o.idle_park_busy }
  local addrs = {}
  for i, a in ipairs(o.listen) do
    local host, port = config.parse_address(a)
    if not host then
      config.raise(string.format("accept.smtp: field 'listen' item %d: %s", i, port))
    end
    addrs[i] = { host = host, port = port }
  end
  if o.tls then o.tls_state = tls.server_state("accept.smtp", o.tls) end
  if o.auth then
    o.auth = check_auth(o.auth)
    if not o.tls_state and not o.auth.allow_plaintext then
      log.warn("accept.smtp %s: 'auth' without 'tls' (and without allow_plaintext): AUTH will not be offered "
        .. "and every attempt gets 538", o.name or o.listen[1])
    end
  end
  o.relay = check_relay(o.relay)
  o.local_domains = check_domains(o.local_domains)
  if o.tenant and not o.tenant:match(passwd.TENANT_PATTERN) then
    config.raise(string.format("accept.smtp: field 'tenant': bad tenant name %q", o.tenant))
  end
  local block = { name = "accept.smtp", opts = o }
  local attached
  -- SIGHUP: certificates, keys and the users file are read again; a file
  -- that cannot be used keeps the old state
  function block.reload()
    local name = o.name or o.listen[1]
    local ok, err = true, nil
    local st = o.tls_state
    if st then
      ok, err = st:reload()
      if ok then
        log.info("accept.smtp %s: TLS certificates reloaded", name)
      else
        log.error("accept.smtp %s: TLS reload failed, keeping the old certificates: %s", name, tostring(err))
      end
    end
    local a = o.auth
    if a and a.file then
      local users, uerr = passwd.load_users(a.file)
      if users and attached then
        for user, u in pairs(users) do
          if u.tenant and not attached.tenants:get(u.tenant) then
            users, uerr = nil, string.format("%s:%d: user '%s': tenant '%s' is not declared", a.file, u.line, user,
              u.tenant)
            break
          end
        end
      end
      if users then
        a.users = users
        log.info("accept.smtp %s: users file %s reloaded", name, a.file)
      else
        log.error("accept.smtp %s: users file not reloaded, keeping the old users: %s", name, tostring(uerr))
        if ok then ok, err = nil, uerr else err = tostring(err) .. "; " .. tostring(uerr) end
      end
    end
    return ok, err
  end
  function block.attach(_, mta)
    check_tenants(o, mta)
    attached = mta
    for _, a in ipairs(addrs) do
      mta:add_listener({ host = a.host, port = a.port, opts = o, name = o.name })
    end
  end
  return block
end

return _M
