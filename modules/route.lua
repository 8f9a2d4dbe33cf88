-- moonpost.route: where spooled mail goes next.
--
--   mta:use(require("moonpost.route").smtp {
--     relay = "10.0.0.5:25",                       -- every message to one next hop, or
--     routes = { ["example.org"] = "192.0.2.1:25" }, -- per domain (the rest: relay, or MX)
--     helo = "mta1.example.net", source = "192.0.2.10",
--     max_connections = 20, max_messages_per_connection = 100, idle_timeout = "5s",
--   })
--
-- The block is the SMTP transport of the queue: each destination (a next
-- hop) gets a pool of connections with its own limits; see runtime/client.lua.
-- docs/route.md has every option.
local config = require "moonpost.runtime.config"
local client = require "moonpost.runtime.client"
local dns = require "moonpost.runtime.dns"
local log = require "moonpost.runtime.log"
local tls = require "moonpost.runtime.tls"

local _M = { _VERSION = "0.1" }

-- "host:port", a list of them, or a list with a tls field:
-- { "192.0.2.1:25", "192.0.2.2:25", tls = "verify" } -> hosts, policy or nil
local function hosts_of(spec, what)
  if type(spec) ~= "string" and type(spec) ~= "table" then
    config.raise(string.format("route.smtp: %s: expected host:port or a list of them, got %s", what, type(spec)))
  end
  local list = type(spec) == "string" and { spec } or spec
  local policy
  if type(spec) == "table" then
    for k in pairs(spec) do
      if type(k) ~= "number" and k ~= "tls" then
        config.raise(string.format("route.smtp: %s: unknown field '%s' (known: tls)", what, tostring(k)))
      end
    end
    if spec.tls ~= nil then policy = tls.client_policy("route.smtp: " .. what .. ".tls", spec.tls) end
    if #list == 0 then config.raise(string.format("route.smtp: %s: no address", what)) end
  end
  local out = {}
  for i, a in ipairs(list) do
    local host, port = config.parse_address(a)
    if not host then
      config.raise(string.format("route.smtp: %s item %d: %s", what, i, port))
    end
    out[i] = { host = host, port = port }
  end
  return out, policy
end

local SCHEMA = {
  relay = { type = "any" },
  tls = { type = "any" },
  tls_policies = { type = "table" },
  routes = { type = "table" },
  domains = { type = "list" },
  helo = { type = "string" },
  source = { type = "string" },
  max_connections = { type = "posint", default = 20 },
  max_messages_per_connection = { type = "posint", default = 100 },
  idle_timeout = { type = "duration", default = 5, check = function(v) return v > 0, "must be > 0" end },
  pipelining = { type = "boolean", default = true },
  timeouts = { type = "table" },
  mx = { type = "boolean", default = true },
  mx_port = { type = "posint", default = 25, check = function(v) return v <= 65535, "must be a port" end },
  ip_order = { type = "enum", values = { "ipv6", "ipv4", "ipv4-only", "ipv6-only" }, default = "ipv6" },
}

function _M.smtp(opts)
  local o = config.check("route.smtp", opts, SCHEMA)
  -- TLS policies: per recipient domain, then per route (or relay), then
  -- the block's own
  local default_tls = tls.client_policy("route.smtp: field 'tls'", o.tls)
  local relay, relay_tls
  if o.relay then relay, relay_tls = hosts_of(o.relay, "field 'relay'") end
  local routes, route_tls = {}, {}
  for domain, spec in pairs(o.routes or {}) do
    if type(domain) ~= "string" then config.raise("route.smtp: field 'routes': keys must be domains") end
    routes[domain:lower()], route_tls[domain:lower()] = hosts_of(spec, "field 'routes' [" .. domain .. "]")
  end
  local domain_tls = {}
  for domain, v in pairs(o.tls_policies or {}) do
    if type(domain) ~= "string" then config.raise("route.smtp: field 'tls_policies': keys must be domains") end
    domain_tls[domain:lower()] = tls.client_policy("route.smtp: field 'tls_policies' [" .. domain .. "]", v)
  end
  local function policy_for(domain)
    domain = domain:lower()
    return domain_tls[domain] or route_tls[domain] or (not routes[domain] and relay_tls) or default_tls
  end
  local timeouts = {}
  for k, v in pairs(client.TIMEOUTS) do timeouts[k] = v end
  for k, v in pairs(o.timeouts or {}) do
    if client.TIMEOUTS[k] == nil then
      config.raise("route.smtp: field 'timeouts': unknown timeout '" .. tostring(k) .. "'")
    end
    local d = config.duration(v)
    if not d or d <= 0 then config.raise("route.smtp: field 'timeouts." .. k .. "': expected a duration > 0") end
    timeouts[k] = d
  end
  local pools = {}
  local block = { name = "route.smtp", opts = o, pools = pools }

  -- the next hops for a domain: hosts, key | nil, why, permanent
  local function resolve(domain)
    local r = routes[domain:lower()] or relay
    if r then return r, nil end
    if not o.mx then
      return nil, "4.4.3 no route to " .. domain .. " (no relay, no route, MX routing off)", false
    end
    -- RFC 5321 5.1: the MX hosts in order, every address of each
    local mxs, why, permanent = dns.default():mx_hosts(domain, { order = o.ip_order })
    if not mxs then return nil, why, permanent end
    local hosts, names = {}, {}
    for _, mx in ipairs(mxs) do
      names[#names + 1] = mx.name
      for _, a in ipairs(mx.addrs) do hosts[#hosts + 1] = { host = a, port = o.mx_port, name = mx.name } end
    end
    -- one pool per set of MX hosts: domains that share them share connections
    table.sort(names)
    return hosts, "mx:" .. table.concat(names, ",") .. ":" .. o.mx_port
  end

  function block.attach(_, mta)
    local helo = o.helo or mta.hostname
    -- one pool per destination and TLS policy: connections made under
    -- one policy are not reused under another
    local policy_ids = setmetatable({}, { __mode = "k" })
    local npolicies = 0
    local function pool_for(hosts, key, policy)
      if not key then
        local parts = {}
        for i, h in ipairs(hosts) do parts[i] = "[" .. h.host .. "]:" .. h.port end
        key = table.concat(parts, ",")
      end
      local pid = policy_ids[policy]
      if not pid then
        npolicies = npolicies + 1
        pid = npolicies
        policy_ids[policy] = pid
      end
      local pkey = pid == 1 and key or (key .. " tls#" .. pid)
      local p = pools[pkey]
      if not p then
        p = client.pool({ name = key, helo = helo, bind = o.source, timeouts = timeouts,
          max_connections = o.max_connections, max_messages = o.max_messages_per_connection,
          idle_timeout = o.idle_timeout, pipelining = o.pipelining, tls = policy })
        pools[pkey] = p
      end
      return p
    end
    policy_ids[default_tls] = 1
    npolicies = 1
    mta:add_transport({
      name = "smtp",
      domains = o.domains,
      deliver = function(env, body, rcpts)
        local hosts, key, permanent = resolve(rcpts[1].domain)
        if not hosts then
          local why = key
          log.warn("%s: %s", env.id, why)
          local enh = why:match("^([245]%.%d+%.%d+) ") or (permanent and "5.4.4" or "4.4.3")
          local res = { status = permanent and "bounced" or "deferred", code = permanent and 550 or 451,
            enhanced = enh, text = why:gsub("^[245]%.%d+%.%d+ ", ""), stage = "routing" }
          local results = {}
          for _, r in ipairs(rcpts) do results[r.index] = res end
          return results
        end
        return pool_for(hosts, key ~= true and key or nil, policy_for(rcpts[1].domain))
          :deliver(env, body, rcpts, hosts)
      end,
      close = function()
        for _, p in pairs(pools) do p:close() end
      end,
    })
  end
  return block
end

return _M
