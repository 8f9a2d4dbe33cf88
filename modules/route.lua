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
local log = require "moonpost.runtime.log"

local _M = { _VERSION = "0.1" }

local function hosts_of(spec, what)
  local list = type(spec) == "string" and { spec } or spec
  local out = {}
  for i, a in ipairs(list) do
    local host, port = config.parse_address(a)
    if not host then
      config.raise(string.format("route.smtp: %s item %d: %s", what, i, port))
    end
    out[i] = { host = host, port = port }
  end
  return out
end

local SCHEMA = {
  relay = { type = "string" },
  routes = { type = "table" },
  domains = { type = "list" },
  helo = { type = "string" },
  source = { type = "string" },
  max_connections = { type = "posint", default = 20 },
  max_messages_per_connection = { type = "posint", default = 100 },
  idle_timeout = { type = "duration", default = 5, check = function(v) return v > 0, "must be > 0" end },
  pipelining = { type = "boolean", default = true },
  timeouts = { type = "table" },
}

function _M.smtp(opts)
  local o = config.check("route.smtp", opts, SCHEMA)
  local relay = o.relay and hosts_of(o.relay, "field 'relay'")
  local routes = {}
  for domain, spec in pairs(o.routes or {}) do
    if type(domain) ~= "string" then config.raise("route.smtp: field 'routes': keys must be domains") end
    routes[domain:lower()] = hosts_of(spec, "field 'routes' [" .. domain .. "]")
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

  -- the next hops for a domain: { hosts, key } or nil, why
  local function resolve(domain)
    local r = routes[domain:lower()] or relay
    if r then return r end
    return nil, "no route to " .. domain .. " (no relay, and MX routing is not configured)"
  end

  function block.attach(_, mta)
    local helo = o.helo or mta.hostname
    local function pool_for(hosts)
      local parts = {}
      for i, h in ipairs(hosts) do parts[i] = "[" .. h.host .. "]:" .. h.port end
      local key = table.concat(parts, ",")
      local p = pools[key]
      if not p then
        p = client.pool({ name = key, helo = helo, bind = o.source, timeouts = timeouts,
          max_connections = o.max_connections, max_messages = o.max_messages_per_connection,
          idle_timeout = o.idle_timeout, pipelining = o.pipelining })
        pools[key] = p
      end
      return p
    end
    mta:add_transport({
      name = "smtp",
      domains = o.domains,
      deliver = function(env, body, rcpts)
        local hosts, why = resolve(rcpts[1].domain)
        if not hosts then
          log.warn("%s: %s", env.id, why)
          local res, results = { status = "deferred", code = 451, enhanced = "4.4.3", text = why }, {}
          for _, r in ipairs(rcpts) do results[r.index] = res end
          return results
        end
        return pool_for(hosts):deliver(env, body, rcpts, hosts)
      end,
      close = function()
        for _, p in pairs(pools) do p:close() end
      end,
    })
  end
  return block
end

return _M
