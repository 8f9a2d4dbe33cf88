-- TLS settings: option checking and the OpenSSL contexts built from them.
--
--   local st = tls.server_state("accept.smtp", opts.tls)  -- at load; raises config errors
--   st.ctx                         the context new sessions use
--   st:reload()                    rebuild from the same files: true | nil, err
--                                  (on failure the old context stays)
--   tls.client_policy(where, v)    -> checked outbound policy table (raises config errors)
--   tls.client_context(policy)     -> ctx | nil, err (cached per distinct settings)
--
-- Connections keep the context they started with, so a reload never drops
-- one: only handshakes that start afterwards see the new certificate.
local core = require "moonpost.core.tls"
local config = require "moonpost.runtime.config"

local format, concat = string.format, table.concat

local _M = { _VERSION = "0.1" }

local VERSIONS = { "1.2", "1.3" }

local SERVER_SCHEMA = {
  cert = { type = "string" },
  key = { type = "string" },
  certs = { type = "table" },
  min_version = { type = "enum", values = VERSIONS, default = "1.2" },
  max_version = { type = "enum", values = VERSIONS },
  ciphers = { type = "string" },
  ciphersuites = { type = "string" },
  groups = { type = "string" },
  implicit = { type = "boolean", default = false },
  required = { type = "boolean", default = false },
  handshake_timeout = { type = "duration", default = 60,
    check = function(v) return v > 0, "must be > 0" end },
}

-- The certificate list: cert/key, then certs = { { cert, key }, ... }.
local function cert_list(where, o)
  local list = {}
  if o.cert or o.key then
    if not (o.cert and o.key) then
      config.raise(format("%s: field '%s' needs '%s' too", where, o.cert and "cert" or "key",
        o.cert and "key" or "cert"))
    end
    list[1] = { cert = o.cert, key = o.key }
  end
  if o.certs then
    for i, c in ipairs(o.certs) do
      if type(c) ~= "table" or type(c.cert) ~= "string" or type(c.key) ~= "string" then
        config.raise(format("%s: field 'certs' item %d: expected { cert = \"file\", key = \"file\" }", where, i))
      end
      list[#list + 1] = { cert = c.cert, key = c.key }
    end
  end
  return list
end

local function build_server(o)
  return core.context({
    server = true, certs = o.cert_list, min_version = o.min_version, max_version = o.max_version,
    ciphers = o.ciphers, ciphersuites = o.ciphersuites, groups = o.groups,
  })
end

local State = {}
local state_mt = { __index = State }

function State:reload()
  local ctx, err = build_server(self.opts)
  if not ctx then return nil, err end
  self.ctx = ctx
  self.reloaded = (self.reloaded or 0) + 1
  return true
end

-- server_state(block, t) -> state. Raises a config error naming the field
-- (or the file OpenSSL could not use).
function _M.server_state(block, t)
  local where = block .. ": field 'tls'"
  local o = config.check(where, t, SERVER_SCHEMA)
  o.cert_list = cert_list(where, o)
  if #o.cert_list == 0 then config.raise(where .. ": needs cert and key (or certs)") end
  local ctx, err = build_server(o)
  if not ctx then config.raise(where .. ": " .. tostring(err)) end
  return setmetatable({ ctx = ctx, opts = o, implicit = o.implicit, required = o.required,
    handshake_timeout = o.handshake_timeout }, state_mt)
end

-- ---- outbound ---------------------------------------------------------------------

local POLICIES = { "none", "opportunistic", "required", "verify" }

local CLIENT_SCHEMA = {
  policy = { type = "enum", values = POLICIES, default = "opportunistic" },
  ca_file = { type = "string" },
  ca_path = { type = "string" },
  cert = { type = "string" },
  key = { type = "string" },
  name = { type = "string" },        -- the name to verify instead of the host's
  implicit = { type = "boolean", default = false },
  min_version = { type = "enum", values = { "1.0", "1.1", "1.2", "1.3" } },
  max_version = { type = "enum", values = { "1.0", "1.1", "1.2", "1.3" } },
  ciphers = { type = "string" },
  ciphersuites = { type = "string" },
  groups = { type = "string" },
  broken_ttl = { type = "duration", default = 3600 },
  handshake_timeout = { type = "duration", default = 60,
    check = function(v) return v > 0, "must be > 0" end },
}

local contexts = {}

local function context_key(p)
  return concat({ p.policy == "verify" and "v" or "-", p.ca_file or "", p.ca_path or "", p.cert or "",
    p.key or "", p.min_version or "", p.max_version or "", p.ciphers or "", p.ciphersuites or "",
    p.groups or "" }, "\0")
end

-- client_context(policy) -> ctx | nil, err
function _M.client_context(p)
  local key = context_key(p)
  local ctx = contexts[key]
  if ctx then return ctx end
  local err
  ctx, err = core.context({
    server = false, verify = p.policy == "verify", ca_file = p.ca_file, ca_path = p.ca_path,
    certs = p.cert and { { cert = p.cert, key = p.key } } or nil,
    min_version = p.min_version, max_version = p.max_version, ciphers = p.ciphers,
    ciphersuites = p.ciphersuites, groups = p.groups,
  })
  if not ctx then return nil, err end
  contexts[key] = ctx
  return ctx
end

-- Forget cached client contexts (a reload re-reads client certificates).
function _M.reload_clients()
  contexts = {}
end

-- client_policy(where, v) -> policy table. v is a policy name or a table.
function _M.client_policy(where, v)
  if v == nil then v = "opportunistic" end
  if type(v) == "string" then v = { policy = v } end
  if type(v) ~= "table" then
    config.raise(format("%s: expected one of none, opportunistic, required, verify or a table, got %s",
      where, type(v)))
  end
  local p = config.check(where, v, CLIENT_SCHEMA)
  if (p.cert == nil) ~= (p.key == nil) then
    config.raise(format("%s: field '%s' needs '%s' too", where, p.cert and "cert" or "key",
      p.cert and "key" or "cert"))
  end
  if p.policy == "none" and p.implicit then
    config.raise(where .. ": implicit = true needs a policy other than none")
  end
  if p.policy ~= "none" then
    local _, err = _M.client_context(p)
    if err then config.raise(where .. ": " .. tostring(err)) end
  end
  return p
end

_M.library = core.openssl_version

return _M
