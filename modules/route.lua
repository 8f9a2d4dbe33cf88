-- moonpost.route: where spooled mail goes next.
--
--   mta:use(require("moonpost.route").smtp {
--     relay = "10.0.0.5:25",                       -- every message to one next hop, or
--     routes = { ["example.org"] = "192.0.2.1:25" }, -- per domain (the rest: relay, or MX)
--     helo = "mta1.example.net", source = "192.0.2.10",
--     max_connections = 20, max_messages_per_connection = 100, idle_timeout = "5s",
--     pools = { acme = { { source = "192.0.2.20", helo = "o1.acme.example", weight = 2 }, ... } },
--     tenant_pools = { acme = "acme" }, default_pool = "shared", pool_header = "X-Virtual-MTA",
--   })
--
-- The block is the SMTP transport of the queue. Each delivery goes to a
-- site (the destination: a relay, a static route, or the recipient domain's
-- MX set, so domains hosted on the same MX hosts share one site) from a
-- source (an address and HELO name from the tenant's egress pool), and each
-- source x site pair (a ready queue) has its own connections; when a
-- moonpost.shape block is used, its limits gate each delivery first.
-- docs/route.md has every option.
local config = require "moonpost.runtime.config"
local client = require "moonpost.runtime.client"
local dns = require "moonpost.runtime.dns"
local log = require "moonpost.runtime.log"
local tls = require "moonpost.runtime.tls"
local hooks = require "moonpost.runtime.hooks"
local headers = require "moonpost.runtime.headers"
local sched = require "moonpost.runtime.sched"
local fs = require "moonpost.runtime.fs"
local cjson = require "cjson"

local _M = { _VERSION = "0.1" }

local blocks_made = 0 -- route.smtp blocks made in this process

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
    -- (0 means any free port to a listener; nothing listens on it)
    if port == 0 then
      config.raise(string.format("route.smtp: %s item %d: port 0 in %q: a next hop needs its port", what, i, a))
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
  pools = { type = "table" },
  tenant_pools = { type = "table" },
  default_pool = { type = "string" },
  pool_header = { type = "string" },
  warmup = { type = "table" },
}

local SOURCE_SCHEMA = {
  name = { type = "string" },
  source = { type = "string" },
  helo = { type = "string" },
  weight = { type = "number", default = 1, check = function(v) return v > 0, "must be > 0" end },
  warmup = { type = "string" },
}

local WARMUP_SCHEMA = {
  schedule = { type = "table", required = true },
  state = { type = "string" },
  save_interval = { type = "duration", default = 5, check = function(v) return v > 0, "must be > 0" end },
}

-- "2026-11-28" -> days since the epoch (UTC)
local function day_of(date)
  local y, m, d = tostring(date):match("^(%d%d%d%d)%-(%d%d)%-(%d%d)$")
  if not y then return nil end
  return config.days_from_civil(tonumber(y), tonumber(m), tonumber(d))
end
_M.day_of = day_of

local function check_schedule(list, where)
  if type(list) ~= "table" or #list == 0 then
    config.raise(where .. ": expected a list of daily message counts")
  end
  for i, v in ipairs(list) do
    if type(v) ~= "number" or v < 0 then
      config.raise(string.format("%s item %d: expected a count >= 0, got %s", where, i, tostring(v)))
    end
  end
  return list
end

-- pools = { name = { source, ..., tenants = { ... } } } -> name -> { sources, tenants }
local function check_pools(pools, warm)
  local out, by_name = {}, {}
  for name, list in pairs(pools or {}) do
    local where = "route.smtp: field 'pools' [" .. tostring(name) .. "]"
    if type(name) ~= "string" or type(list) ~= "table" then
      config.raise(where .. ": expected a pool name and a list of sources")
    end
    local p = { name = name, sources = {}, tenants = nil }
    for k, v in pairs(list) do
      if k == "tenants" then
        if type(v) ~= "table" then config.raise(where .. ": field 'tenants': expected a list of tenant names") end
        p.tenants = {}
        for _, t in ipairs(v) do p.tenants[t] = true end
      elseif type(k) ~= "number" then
        config.raise(string.format("%s: unknown field '%s' (known: a list of sources, tenants)", where, tostring(k)))
      end
    end
    for i, src in ipairs(list) do
      local sw = where .. " item " .. i
      if type(src) == "string" then src = { source = src } end
      local o = config.check(sw, src, SOURCE_SCHEMA)
      if o.source and not config.parse_address(o.source:find(":", 1, true) and ("[" .. o.source .. "]:0")
          or (o.source .. ":0")) then
        config.raise(sw .. ": field 'source': not an IP address: " .. o.source)
      end
      if o.warmup then
        o.warm_day = day_of(o.warmup)
        if not o.warm_day then config.raise(sw .. ": field 'warmup': expected a start date YYYY-MM-DD") end
        if not warm then config.raise(sw .. ": field 'warmup' needs the block's warmup = { schedule = ... }") end
      end
      o.name = o.name or o.source or ("default#" .. i)
      if by_name[o.name] and by_name[o.name] ~= o then
        -- the same source in several pools is fine; the same name for two different ones is not
        local a = by_name[o.name]
        if a.source ~= o.source or a.helo ~= o.helo then
          config.raise(sw .. ": field 'name': '" .. o.name .. "' already names another source")
        end
      end
      by_name[o.name] = o
      p.sources[#p.sources + 1] = o
    end
    if #p.sources == 0 then config.raise(where .. ": no source") end
    out[name] = p
  end
  return out, by_name
end

function _M.smtp(opts)
  local o = config.check("route.smtp", opts, SCHEMA)
  -- TLS policies: per recipient domain, then per route (or relay), then
  -- the block's own
  local default_tls = tls.client_policy("route.smtp: field 'tls'", o.tls)
  local relay, relay_tls
  if o.relay then relay, relay_tls = hosts_of(o.relay, "field 'relay'") end
  -- domains are keyed by their ASCII form: an internationalized one matches
  -- whether written with U-labels or A-labels, in the policy or the address
  local function key_of(domain, field)
    local k, why = dns.to_ascii(domain)
    if not k then config.raise(string.format("route.smtp: field '%s': not a domain: %q (%s)", field, domain, why)) end
    return k
  end
  local routes, route_tls = {}, {}
  for domain, spec in pairs(o.routes or {}) do
    if type(domain) ~= "string" then config.raise("route.smtp: field 'routes': keys must be domains") end
    local k = key_of(domain, "routes")
    routes[k], route_tls[k] = hosts_of(spec, "field 'routes' [" .. domain .. "]")
  end
  local domain_tls = {}
  for domain, v in pairs(o.tls_policies or {}) do
    if type(domain) ~= "string" then config.raise("route.smtp: field 'tls_policies': keys must be domains") end
    domain_tls[key_of(domain, "tls_policies")] =
      tls.client_policy("route.smtp: field 'tls_policies' [" .. domain .. "]", v)
  end
  local function policy_for(domain)
    domain = dns.to_ascii(domain) or domain:lower()
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

  -- egress: pools of sources, chosen by the message's pool, its tenant, or the default
  local warm
  if o.warmup then
    warm = config.check("route.smtp: warmup", o.warmup, WARMUP_SCHEMA)
    local sched_ = {}
    for provider, list in pairs(warm.schedule) do
      if type(provider) == "number" then
        config.raise("route.smtp: field 'warmup.schedule': expected { default = {...}, <site> = {...} }")
      end
      sched_[provider] = check_schedule(list, "route.smtp: field 'warmup.schedule." .. provider .. "'")
    end
    warm.schedule = sched_
  end
  local pools, sources = check_pools(o.pools, warm)
  for t, name in pairs(o.tenant_pools or {}) do
    if not pools[name] then
      config.raise(string.format("route.smtp: field 'tenant_pools' [%s]: no pool named '%s'", tostring(t),
        tostring(name)))
    end
  end
  if o.default_pool and not pools[o.default_pool] then
    config.raise("route.smtp: field 'default_pool': no pool named '" .. o.default_pool .. "'")
  end
  if o.pool_header and not next(pools) then
    config.raise("route.smtp: field 'pool_header' needs pools to choose from")
  end
  local default_source = { name = "default", source = o.source, helo = o.helo, weight = 1 }

  local conns = {}
  local block = { name = "route.smtp", opts = o, pools = conns, egress = pools }

  -- sent[source name][site][day] = messages (the warm-up caps count them);
  -- a policy reload hands the table to the new block (handover())
  local sent = {}
  block.warm_sent = sent
  blocks_made = blocks_made + 1
  -- the state file is written through a temporary file of this block's own:
  -- after a reload the old block and the new one both save the shared counts
  local tmp_suffix = blocks_made == 1 and ".tmp" or (".tmp" .. blocks_made)
  local function today() return math.floor(os.time() / 86400) end
  local function cap_of(src, site)
    if not src.warm_day then return nil end
    local list = warm.schedule[site] or warm.schedule.default
    if not list then return nil end
    local d = today() - src.warm_day
    if d < 0 then return 0 end
    return list[d + 1] -- nil past the end of the schedule: warmed up
  end
  local function sent_today(src, site)
    local s = sent[src.name]
    local t = s and s[site]
    return t and t.day == today() and t.n or 0
  end
  local function count(src, site)
    local s = sent[src.name]
    if not s then
      s = {}
      sent[src.name] = s
    end
    local t = s[site]
    local d = today()
    if not t or t.day ~= d then
      t = { day = d, n = 0 }
      s[site] = t
    end
    t.n = t.n + 1
    block.warm_dirty = true
  end

  -- warm.state: the day's counts survive a restart (a source must not get
  -- its cap twice in one day). Read at start; written every save_interval
  -- while they change (new file, fsync, rename), and at stop.
  local function state_json()
    local d, out = today(), {}
    for name, sites in pairs(sent) do
      for site, t in pairs(sites) do
        if t.day == d then
          out[name] = out[name] or {}
          out[name][site] = t.n
        end
      end
    end
    return cjson.encode({ day = d, sent = out })
  end
  local function load_state(path)
    local f = io.open(path, "r")
    if not f then return end
    local text = f:read("*a")
    f:close()
    local ok, t = pcall(cjson.decode, text)
    if not ok or type(t) ~= "table" or type(t.sent) ~= "table" then
      log.warn("route.smtp: %s: not a warm-up state file; the day's counts start at 0", path)
      return
    end
    if t.day ~= today() then return end
    for name, sites in pairs(t.sent) do
      if type(sites) == "table" then
        sent[name] = {}
        for site, n in pairs(sites) do
          if type(n) == "number" then sent[name][site] = { day = t.day, n = n } end
        end
      end
    end
    log.info("route.smtp: warm-up counts of today read from %s", path)
  end
  local function save_state(path)
    block.warm_dirty = false
    local ok, err = fs.replace(path, state_json(), tmp_suffix)
    if ok then return true end
    block.warm_dirty = true
    log.warn("route.smtp: cannot save the warm-up counts to %s: %s", path, tostring(err))
  end
  if warm and warm.state then
    function block.start()
      block.stopping = false
      -- counts handed over by the block before a reload are newer than the file
      if not block.warm_inherited then load_state(warm.state) end
      block.saver = sched.spawn_named("warm-up state", function(e) log.error("route.smtp: %s", tostring(e)) end,
        function()
          while not block.stopping do
            block.saver_task = sched.current()
            sched.wait(warm.save_interval)
            block.saver_task = nil
            if block.warm_dirty and not block.stopping then save_state(warm.state) end
          end
        end)
      return true
    end
    function block.stop()
      block.stopping = true
      if block.saver_task then sched.wake(block.saver_task) end
      if block.warm_dirty then
        -- at shutdown, once: a small file, synced and renamed before the
        -- process exits (no task waits here)
        local ok, err = fs.replace_now(warm.state, state_json(), tmp_suffix)
        if not ok then log.warn("route.smtp: cannot save the warm-up counts to %s: %s", warm.state, tostring(err)) end
      end
    end
  end
  block.sent_today = function(name, site) return sent_today(sources[name] or { name = name }, site) end
  -- A policy reload: the day's warm-up counts carry on in the new block (a
  -- source must not get its daily cap twice). Connections are not handed
  -- over: the old block's close when its transport is closed.
  function block.handover(_, old)
    if old.warm_sent then
      sent = old.warm_sent
      block.warm_sent = sent
      block.warm_inherited = true
    end
    return true
  end

  -- the pool (or the single named source) for a message
  local function pool_of(env)
    local name = env.pool
    if name then
      if pools[name] then return pools[name] end
      if sources[name] then return { name = name, sources = { sources[name] } } end
    end
    local t = env.tenant
    name = t and ((o.tenant_pools and o.tenant_pools[t]) or (pools[t] and t))
    if name then return pools[name] end
    return o.default_pool and pools[o.default_pool] or nil
  end

  -- choose(env, site) -> source | nil, why: weighted, among the sources not
  -- at their warm-up cap for this site (so mail spills over to warmed ones)
  local function choose(env, site)
    local p = pool_of(env)
    if not p then return default_source end
    local list = p.sources
    if #list == 1 and not list[1].warm_day then return list[1] end
    local total, ok = 0, {}
    for _, src in ipairs(list) do
      local cap = cap_of(src, site)
      if not cap or sent_today(src, site) < cap then
        ok[#ok + 1] = src
        total = total + src.weight
      end
    end
    if #ok == 0 then
      return nil, "every source of pool " .. p.name .. " reached its warm-up cap for " .. site .. " today"
    end
    local x = math.random() * total
    for _, src in ipairs(ok) do
      x = x - src.weight
      if x < 0 then return src end
    end
    return ok[#ok]
  end

  -- the next hops for a domain: hosts, key | nil, why, permanent; the MX names
  local function resolve(domain)
    local r = routes[dns.to_ascii(domain) or domain:lower()] or relay
    if r then return r, nil end
    if not o.mx then
      return nil, "4.4.3 no route to " .. domain .. " (no relay, no route, MX routing off)", false
    end
    -- RFC 5321 5.1: the MX hosts in order, every address of each
    local mxs, why, permanent = dns.default():mx_hosts(domain, { order = o.ip_order })
    if not mxs then return nil, why, permanent end
    if mxs[1].literal then
      -- a domain literal, u@[192.0.2.1]: that address, no DNS; the site is
      -- the address, as for a route to it (no name for SNI or verify)
      local a = mxs[1].addrs[1]
      return { { host = a, port = o.mx_port } }, "[" .. a .. "]:" .. o.mx_port
    end
    local hosts, names = {}, {}
    for _, mx in ipairs(mxs) do
      names[#names + 1] = mx.name
      for _, a in ipairs(mx.addrs) do hosts[#hosts + 1] = { host = a, port = o.mx_port, name = mx.name } end
    end
    -- one site per set of MX hosts: domains that share them share
    -- connections and limits (MX rollup)
    table.sort(names)
    return hosts, "mx:" .. table.concat(names, ",") .. ":" .. o.mx_port, nil, names
  end

  local function failure(rcpts, res)
    local results = {}
    for _, r in ipairs(rcpts) do results[r.index] = res end
    return results
  end

  function block.attach(_, mta)
    local named = {}
    for t in pairs(o.tenant_pools or {}) do named[#named + 1] = t end
    mta.tenants:check_names("route.smtp: field 'tenant_pools'", named)
    local pool_names = {}
    for name in pairs(pools) do pool_names[#pool_names + 1] = tostring(name) end
    table.sort(pool_names)
    for _, name in ipairs(pool_names) do
      if pools[name].tenants then
        named = {}
        for t in pairs(pools[name].tenants) do named[#named + 1] = t end
        mta.tenants:check_names("route.smtp: field 'pools' [" .. name .. "]: field 'tenants'", named)
      end
    end
    local helo = o.helo or mta.hostname
    -- one connection pool per ready queue (source x site) and TLS policy:
    -- connections made under one policy are not reused under another
    local policy_ids = setmetatable({}, { __mode = "k" })
    local npolicies = 0
    local function conn_pool(site, hosts_key, policy, src, limits)
      local pid = policy_ids[policy]
      if not pid then
        npolicies = npolicies + 1
        pid = npolicies
        policy_ids[policy] = pid
      end
      -- a ready queue: the site's limits (max_messages_per_connection) hold
      -- for its connections even when two sites share next hops (a relay)
      local pkey = site == hosts_key and hosts_key or (site .. "|" .. hosts_key)
      if src ~= default_source then pkey = src.name .. ">" .. pkey end
      if pid ~= 1 then pkey = pkey .. " tls#" .. pid end
      local p = conns[pkey]
      if not p then
        p = client.pool({ name = (src ~= default_source and (src.name .. ">") or "") .. site,
          helo = src.helo or helo, bind = src.source, timeouts = timeouts,
          max_connections = limits and limits.max_connections or o.max_connections,
          max_messages = limits and limits.max_messages_per_connection or o.max_messages_per_connection,
          idle_timeout = o.idle_timeout, pipelining = o.pipelining, tls = policy })
        conns[pkey] = p
      end
      return p
    end
    policy_ids[default_tls] = 1
    npolicies = 1

    -- x-virtual-mta style selection: a header naming a pool (or a source)
    -- the sender's tenant may use; the header is not sent on
    if o.pool_header then
      local hname = o.pool_header:lower()
      block.on = block.on or {}
      block.on.smtp_server_message_received = function(txn, msg)
        local fields = headers.find(msg:headers(), hname)
        if #fields == 0 then return nil end
        local value = fields[1].value
        if #fields > 1 then
          return hooks.reject(550, "5.7.1", "More than one " .. o.pool_header .. " header field")
        end
        local p = pools[value] or (sources[value] and { sources = { sources[value] } })
        local allowed = p and (not p.tenants or (txn.tenant and p.tenants[txn.tenant]))
        if p and p.sources[1] and not pools[value] then
          -- a single source: allowed when one of the tenant's pools has it
          allowed = false
          for _, pool in pairs(pools) do
            if not pool.tenants or (txn.tenant and pool.tenants[txn.tenant]) then
              for _, src in ipairs(pool.sources) do
                if src.name == value then allowed = true end
              end
            end
          end
        end
        if not allowed then
          return hooks.reject(550, "5.7.1",
            string.format("%s: %s is not a pool this sender may use", o.pool_header, value))
        end
        txn.pool = value
        -- the choice is made: the header does not leave with the message
        msg:remove(fields[1].first, fields[1].last)
        return nil
      end
    end

    -- The transport's results once the connection pool is done: the shaper
    -- learns from them, and each carries its source and site. (A function of
    -- its own: code after a wait, which the delivery is, runs in LuaJIT's
    -- interpreter until it enters a function, where a compiled trace can
    -- start.)
    local host_keys = setmetatable({}, { __mode = "k" }) -- fixed host lists -> their key

    local function delivered(rcpts, src, site, shaper, gates, dest, ticket, ok, results)
      if ticket then shaper:release(ticket) end
      if not ok then error(results, 0) end
      if shaper then
        local seen = {}
        for _, r in ipairs(rcpts) do
          local res = results[r.index]
          if res and not seen[res] then
            local out = shaper:observe(gates, dest, res)
            seen[res] = out
            if out ~= res then seen[out] = out end
          end
          if res then results[r.index] = seen[res] end
        end
      end
      for _, r in ipairs(rcpts) do
        local res = results[r.index]
        if res then res.source = src.source; res.helo = src.helo or helo; res.site = site end
      end
      return results
    end

    mta:add_transport({
      name = "smtp",
      domains = o.domains,
      deliver = function(env, body, rcpts)
        local domain = rcpts[1].domain
        local hosts, key, permanent, mx_names = resolve(domain)
        if not hosts then
          local why = key
          log.warn("%s: %s", env.id, why)
          local enh = why:match("^([245]%.%d+%.%d+) ") or (permanent and "5.4.4" or "4.4.3")
          return failure(rcpts, { status = permanent and "bounced" or "deferred", code = permanent and 550 or 451,
            enhanced = enh, text = why:gsub("^[245]%.%d+%.%d+ ", ""), stage = "routing" })
        end
        if not key then
          -- a relay's or route's fixed hosts: their key made once
          key = host_keys[hosts]
          if not key then
            local parts = {}
            for i, h in ipairs(hosts) do parts[i] = "[" .. h.host .. "]:" .. h.port end
            key = table.concat(parts, ",")
            host_keys[hosts] = key
          end
        end
        local shaper = mta.shaper
        local dest = shaper and shaper:destination(domain:lower(), mx_names, mx_names and key)
        local site = dest and dest.name or key
        -- an operator suspended this site (moonpost.admin): held, no attempt
        local hold = mta.site_hold and mta.site_hold(site, env, domain)
        if hold then return failure(rcpts, hold) end
        local src, why = choose(env, site)
        if not src then
          log.info("%s: %s", env.id, why)
          return failure(rcpts, { status = "deferred", code = 451, enhanced = "4.7.0", text = why, stage = "routing" })
        end
        local gates, ticket
        if shaper then
          gates = shaper:gates_for({ ready = src.name .. ">" .. site, dest = dest, tenant = env.tenant,
            source = src.source, max_connections = o.max_connections })
          local gate, at
          ticket, gate, at = shaper:admit(gates)
          if not ticket then
            if gate == "bounce" then return failure(rcpts, at) end
            return failure(rcpts, { status = "held", text = "waiting for " .. gate.name,
              park = function(fn) shaper:park(gate, fn, at) end })
          end
        end
        -- counted before the attempt waits: deliveries running at once must
        -- see each other's counts, or they all pick a source at its cap
        if src.warm_day then count(src, site) end
        local limits = dest and dest.limits or (shaper and shaper.spec.default)
        local pool = conn_pool(site, key, policy_for(domain), src, limits)
        return delivered(rcpts, src, site, shaper, gates, dest, ticket,
          pcall(pool.deliver, pool, env, body, rcpts, hosts))
      end,
      close = function()
        if mta.shaper then mta.shaper:stop() end
        for _, p in pairs(conns) do p:close() end
      end,
    })
  end
  return block
end

return _M
