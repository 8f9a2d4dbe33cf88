-- moonpost.dkim: DKIM signatures (RFC 6376; Ed25519, RFC 8463) on the mail
-- Moonpost accepts.
--
--   mta:use(require("moonpost.dkim").sign {
--     keys = "dkim/",                                   -- dkim/<domain>/<selector>.pem
--     also = { domain = "esp.example", selector = "s1" },   -- a second signature on all mail
--     fallback = { domain = "esp.example", selector = "s1" }, -- when the From domain has no key
--   })
--
-- Signing happens once per message, after every smtp_server_message_received
-- handler and before the message is stored, so the signature is spooled with
-- it. The work runs on threads, never on the loop. docs/dkim.md has every
-- option.
local config = require "moonpost.runtime.config"
local log = require "moonpost.runtime.log"
local core = require "moonpost.core.dkim"
local rdkim = require "moonpost.runtime.dkim"
local fields = require "moonpost.runtime.headers"
local dns = require "moonpost.runtime.dns"
local has_8bit = require("moonpost.core.smtp").has_8bit
local uv = require "luv"

local format, lower, concat, find, byte, sub, match = string.format, string.lower, table.concat, string.find,
  string.byte, string.sub, string.match

local _M = { _VERSION = "0.1" }

local CANONS = { "relaxed/relaxed", "relaxed/simple", "simple/relaxed", "simple/simple" }

local SCHEMA = {
  keys = { type = "any", required = true },
  select = { type = "function" },
  also = { type = "table" },
  fallback = { type = "table" },
  selectors = { type = "table" },
  canon = { type = "enum", values = CANONS, default = "relaxed/relaxed" },
  headers = { type = "table" },
  oversign = { type = "table" },
  expire = { type = "duration" },
  on_error = { type = "enum", values = { "tempfail", "unsigned" }, default = "tempfail" },
  timeout = { type = "duration", default = 30, check = function(v) return v > 0, "must be > 0" end },
  threads = { type = "posint", check = function(v) return v <= 64, "must be at most 64" end },
  rsa = { type = "enum", values = { "openssl", "libopendkim" }, default = "openssl" },
  inline_ed25519 = { type = "boolean", default = true },
  tenants = { type = "table" },
}

local function cpus()
  local ok, n = pcall(function() return #uv.cpu_info() end)
  return ok and n and n > 0 and math.min(n, 64) or 2
end

-- ---- keys -----------------------------------------------------------------------

-- A domain as keys are filed and signatures name it: lower case, and an
-- internationalized one by its A-labels (RFC 8616 section 4), so that
-- "Bücher.example" and "xn--bcher-kva.example" are one domain. A name that
-- is not valid IDNA2008 stays as it is and matches no key.
local function dname(d)
  d = lower(d)
  if has_8bit(d) then return dns.to_ascii(d) or d end
  return d
end

local function scandir(dir)
  local req, err = uv.fs_scandir(dir)
  if not req then return nil, err end
  local out = {}
  while true do
    local name, t = uv.fs_scandir_next(req)
    if not name then break end
    out[#out + 1] = { name = name, type = t }
  end
  table.sort(out, function(a, b) return a.name < b.name end)
  return out
end

-- Load keys: a directory laid out as <dir>/<domain>/<selector>.pem, or a
-- table { [domain] = { [selector] = "file.pem" } }. -> store | nil, err
-- A domain name or selector as d= and s= take it (what the signer checks
-- for each message): dns.is_name.
local valid_name = dns.is_name

local function load_keys(spec)
  local store, n = {}, 0
  local function add(domain, selector, path)
    -- a name the signer would refuse fails every message it signs: refused here
    if not valid_name(selector) then
      return nil, format("%s: selector %q is not a selector (letters, digits, '-', '_', '.')", path, selector)
    end
    if not valid_name(dname(domain)) then
      return nil, format("%s: domain %q is not a domain name", path, domain)
    end
    local key, err = core.load_key(path)
    if not key then return nil, err end
    domain = dname(domain)
    store[domain] = store[domain] or {}
    store[domain][selector] = key
    n = n + 1
    return true
  end
  if type(spec) == "string" then
    local dir = spec:gsub("/+$", "")
    local entries, err = scandir(dir)
    if not entries then return nil, format("%s: cannot read the directory: %s", dir, tostring(err)) end
    for _, e in ipairs(entries) do
      local path = dir .. "/" .. e.name
      local st = uv.fs_stat(path)
      if st and st.type == "directory" then
        local files, ferr = scandir(path)
        if not files then return nil, format("%s: cannot read the directory: %s", path, tostring(ferr)) end
        for _, f in ipairs(files) do
          local selector = f.name:match("^(.+)%.pem$")
          if selector then
            local ok, kerr = add(e.name, selector, path .. "/" .. f.name)
            if not ok then return nil, kerr end
          end
        end
      end
    end
  elseif type(spec) == "table" then
    for domain, sels in pairs(spec) do
      if type(domain) ~= "string" or type(sels) ~= "table" then
        return nil, "expected { [domain] = { [selector] = \"file.pem\" } }"
      end
      for selector, path in pairs(sels) do
        if type(selector) ~= "string" or type(path) ~= "string" then
          return nil, format("[%s]: expected { [selector] = \"file.pem\" }", domain)
        end
        local ok, kerr = add(domain, selector, path)
        if not ok then return nil, kerr end
      end
    end
  else
    return nil, "expected a directory or a table, got " .. type(spec)
  end
  return store, nil, n
end

-- ---- the From domain ---------------------------------------------------------

-- value without its quoted strings and comments
local function strip_comments(value)
  local out, i, depth, n = {}, 1, 0, #value
  while i <= n do
    local c = value:sub(i, i)
    if c == "\\" then
      i = i + 1
    elseif c == '"' and depth == 0 then
      local j = i + 1
      while j <= n do
        local d = value:sub(j, j)
        if d == "\\" then j = j + 1 elseif d == '"' then break end
        j = j + 1
      end
      i = j
    elseif c == "(" then
      depth = depth + 1
    elseif c == ")" and depth > 0 then
      depth = depth - 1
    elseif depth == 0 then
      out[#out + 1] = c
    end
    i = i + 1
  end
  return concat(out)
end

-- The domain of the first mailbox in the From header field, lower-cased,
-- or nil. Comments and quoted strings are skipped (RFC 5322 3.4).
local function from_domain(head)
  local f = fields.find(head, "from")[1]
  if not f then return nil end
  local v = f.value
  -- drop quoted strings and comments (most From fields have none; plain
  -- searches here and below: a pattern with a class tries it at every octet)
  if find(v, '"', 1, true) or find(v, "(", 1, true) or find(v, "\\", 1, true) then v = strip_comments(v) end
  -- the first <addr-spec>, else the first mailbox of the list
  local addr
  local lt = find(v, "<", 1, true)
  local gt = lt and find(v, ">", lt + 1, true)
  if gt then
    addr = sub(v, lt + 1, gt - 1)
  else
    local comma = find(v, ",", 1, true)
    addr = comma and sub(v, 1, comma - 1) or v
  end
  -- the domain: after the last "@", without the white space around it
  local at = find(addr, "@", 1, true)
  if not at then return nil end
  while true do
    local next_at = find(addr, "@", at + 1, true)
    if not next_at then break end
    at = next_at
  end
  local domain = sub(addr, at + 1)
  local last = byte(domain, -1)
  if byte(domain, 1) == 32 or byte(domain, 1) == 9 or last == 32 or last == 9 then
    domain = match(domain, "^%s*(.-)%s*$")
    last = byte(domain, -1)
  end
  if last == 46 then domain = sub(domain, 1, -2) end -- a final dot
  domain = lower(domain)
  if has_8bit(domain) then
    domain = dns.to_ascii(domain)
    if not domain then return nil end
  end
  if not match(domain, "^[%w][%w%.%-]*$") then return nil end
  return domain
end
_M.from_domain = from_domain

-- ---- the block ------------------------------------------------------------------

local function check_pair(where, t)
  if type(t) ~= "table" or type(t.domain) ~= "string" or type(t.selector) ~= "string" then
    config.raise(format("dkim.sign: field '%s': expected { domain = \"...\", selector = \"...\" }", where))
  end
end

-- sign(opts) -> block
function _M.sign(opts)
  local o = config.check("dkim.sign", opts, SCHEMA)
  local store, err, nkeys = load_keys(o.keys)
  if not store then config.raise("dkim.sign: field 'keys': " .. tostring(err)) end
  local also = o.also
  if also and also.domain then also = { also } end
  for i, a in ipairs(also or {}) do
    check_pair("also[" .. i .. "]", a)
    if not (store[dname(a.domain)] and store[dname(a.domain)][a.selector]) then
      config.raise(format("dkim.sign: field 'also[%d]': no key for %s selector %s", i, a.domain, a.selector))
    end
  end
  if o.fallback then
    check_pair("fallback", o.fallback)
    local f = o.fallback
    if not (store[dname(f.domain)] and store[dname(f.domain)][f.selector]) then
      config.raise(format("dkim.sign: field 'fallback': no key for %s selector %s", f.domain, f.selector))
    end
  end
  -- a selector named for a domain without that key would quietly sign its
  -- mail with a parent domain's key or the fallback: refused at load
  local selectors = {}
  for d, s in pairs(o.selectors or {}) do
    if type(d) ~= "string" or type(s) ~= "string" then
      config.raise("dkim.sign: field 'selectors': expected { [\"domain\"] = \"selector\" }")
    end
    if not (store[dname(d)] and store[dname(d)][s]) then
      config.raise(format("dkim.sign: field 'selectors.%s': no key for %s selector %s", d, d, s))
    end
    selectors[dname(d)] = s
  end
  -- tenants = { acme = { "acme.example" } }: the keys of those domains (and
  -- of their subdomains) sign only that tenant's mail
  local owner = {}
  for t, list in pairs(o.tenants or {}) do
    if type(t) ~= "string" or type(list) ~= "table" then
      config.raise("dkim.sign: field 'tenants': expected { tenant = { \"domain\", ... } }")
    end
    for i, d in ipairs(list) do
      if type(d) ~= "string" or not store[dname(d)] then
        config.raise(format("dkim.sign: field 'tenants.%s' item %d: no key for %s", t, i, tostring(d)))
      end
      if owner[dname(d)] and owner[dname(d)] ~= t then
        config.raise(format("dkim.sign: field 'tenants.%s': %s already belongs to tenant %s", t, d, owner[dname(d)]))
      end
      owner[dname(d)] = t
    end
  end
  -- the tenant that owns a domain's keys: the domain's own entry or its closest parent's
  local function owner_of(d)
    while d do
      if owner[d] then return owner[d] end
      d = d:match("^[^.]+%.(.+)$")
    end
    return nil
  end
  local expire = o.expire and math.floor(o.expire) or nil

  local block = { name = "dkim.sign", opts = o, keys = nkeys }

  -- the selector to use for a domain: the configured one, or the greatest name
  local function selector_of(domain)
    local sels = store[domain]
    if not sels then return nil end
    local s = selectors[domain]
    if s then return sels[s] and s or nil end
    local best
    for name in pairs(sels) do if not best or name > best then best = name end end
    return best
  end

  -- The spec of a domain and selector, made once per key set (a reload
  -- makes them again): signing only reads it.
  local made, made_for = {}, nil
  local function spec(domain, selector)
    domain = dname(domain)
    if made_for ~= store then made, made_for = {}, store end
    local by = made[domain]
    local s = by and by[selector]
    if s then return s end
    local sels = store[domain]
    local key = sels and sels[selector]
    if not key then return nil, format("no key for %s selector %s", domain, selector) end
    s = { key = key, domain = domain, selector = selector, canon = o.canon, headers = o.headers,
      oversign = o.oversign, expire = expire }
    if not by then
      by = {}
      made[domain] = by
    end
    by[selector] = s
    return s
  end

  -- The signatures for a message: list of specs | nil, err
  local function choose(txn, msg)
    local head = msg:headers()
    -- no From field: nothing can sign it (RFC 6376 5.4), now or on a retry
    if not fields.find(head, "from")[1] then return {}, "no From field" end
    local from = from_domain(head)
    local picks
    if o.select then
      local ok, r = pcall(o.select, txn, msg, from)
      if not ok then return nil, "select() raised: " .. tostring(r) end
      picks = r
      if picks ~= nil and type(picks) ~= "table" then
        return nil, "select() returned " .. type(picks)
      end
      if picks and picks.domain then picks = { picks } end
    end
    if not picks then
      picks = {}
      -- the From domain, or its closest parent with a key (relaxed DMARC alignment)
      local d = from
      local own = from and owner_of(from)
      if own ~= nil and own ~= txn.tenant then
        -- another tenant's domain: never signed with its key
        d = nil
      end
      while d do
        local s = selector_of(d)
        if s then
          picks[1] = { domain = d, selector = s }
          break
        end
        local parent = d:match("^[^.]+%.(.+%..+)$")
        d = parent
      end
      if #picks == 0 and o.fallback then picks[1] = o.fallback end
      for _, a in ipairs(also or {}) do
        local dup = false
        for _, p in ipairs(picks) do
          if dname(p.domain) == dname(a.domain) and p.selector == a.selector then dup = true end
        end
        if not dup then picks[#picks + 1] = a end
      end
    end
    local specs = {}
    for i, p in ipairs(picks) do
      if type(p) ~= "table" or type(p.domain) ~= "string" or type(p.selector) ~= "string" then
        return nil, format("select() item %d: expected { domain = ..., selector = ... }", i)
      end
      local s, serr = spec(p.domain, p.selector)
      if not s then return nil, serr end
      specs[i] = s
    end
    return specs
  end

  local function fail(txn, why)
    log.error("%s: DKIM signing failed: %s", txn.id, why)
    if o.on_error == "unsigned" then return nil end
    return require("moonpost").tempfail(451, "4.3.0", "DKIM signing failed, try again later")
  end

  local function step(txn, msg)
    local specs, cerr = choose(txn, msg)
    if not specs then
      rdkim.stats.failures = rdkim.stats.failures + 1 -- rdkim.sign counts its own
      return fail(txn, cerr)
    end
    if #specs == 0 then
      if cerr then log.warn("%s: not DKIM signed: %s", txn.id, cerr) end
      return nil
    end
    local headers, serr = rdkim.sign(msg, specs, o.timeout)
    if not headers then return fail(txn, serr) end
    msg:prepend(headers)
    txn.dkim = {}
    for i, s in ipairs(specs) do txn.dkim[i] = { domain = s.domain, selector = s.selector } end
    if log.enabled("debug") then
      local names = {}
      for i, s in ipairs(specs) do names[i] = s.domain .. "/" .. s.selector end
      log.debug("%s: DKIM signed: %s", txn.id, concat(names, ", "))
    end
    return nil
  end

  -- SIGHUP: read the keys again; a bad key keeps the old set
  function block.reload()
    local fresh, rerr, n = load_keys(o.keys)
    if not fresh then
      log.error("dkim.sign: key reload failed, keeping the old keys: %s", tostring(rerr))
      return nil, rerr
    end
    store = fresh
    block.keys = n
    log.info("dkim.sign: %d keys loaded", n)
    return true
  end

  function block.attach(_, mta)
    local named = {}
    for t in pairs(o.tenants or {}) do named[#named + 1] = t end
    mta.tenants:check_names("dkim.sign: field 'tenants'", named)
    rdkim.configure({ threads = o.threads or cpus(), rsa = o.rsa, inline_ed25519 = o.inline_ed25519 })
    mta:add_message_step(step)
  end
  return block
end

return _M
