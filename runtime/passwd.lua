-- Password hashes for SMTP AUTH: the two formats, making them, checking
-- them off the loop, and the users file.
--
--   local passwd = require "moonpost.runtime.passwd"
--   passwd.hash(password [, opts])         -> "$scrypt$ln=15,r=8,p=1$<salt>$<key>" (runs here: CLI only)
--   passwd.parse(s)                        -> hash table | nil, why
--   passwd.verify(password, h [, timeout]) -> true | false | nil, err  (in a task; on the kdf threads)
--   passwd.load_users(path)                -> { [user] = { hash = h, tenant = t|nil, line = n } } | nil, err
--   passwd.b64encode(s), passwd.b64decode(s [, strict]) -> s | nil
--   passwd.configure { threads = 2 }       -- before the first verify()
--   passwd.shutdown()
--
-- Formats (docs/accept.md#password-hashes); salt and key in standard base64
-- (RFC 4648 alphabet, padding optional):
--   $pbkdf2-sha256$<iterations>$<salt>$<key>
--   $scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt>$<key>
local uv = require "luv"
local bit = require "bit"
local kdf = require "moonpost.core.kdf"
local sched = require "moonpost.runtime.sched"
local workq = require "moonpost.runtime.workq"

local band, bor, lshift, rshift = bit.band, bit.bor, bit.lshift, bit.rshift
local byte, char, format, concat, sub = string.byte, string.char, string.format, table.concat, string.sub
local tonumber, tostring, type, pairs = tonumber, tostring, type, pairs

local _M = { _VERSION = "0.1" }

-- The defaults of `moonpost passwd` (measured cost in docs/accept.md).
_M.DEFAULT_SCHEME = "scrypt"
_M.DEFAULT_SCRYPT = { ln = 15, r = 8, p = 1 }
_M.DEFAULT_ITERATIONS = 210000
_M.DEFAULT_TIMEOUT = 30

-- ---- base64 (RFC 4648) ---------------------------------------------------------------

local ALPHA = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local ENC, DEC = {}, {}
for i = 1, 64 do
  ENC[i - 1] = sub(ALPHA, i, i)
  DEC[byte(ALPHA, i)] = i - 1
end

-- b64encode(s [, pad]) -> base64 with "=" padding unless pad == false
function _M.b64encode(s, pad)
  local out, n = {}, #s
  for i = 1, n, 3 do
    local a, b, c = byte(s, i, i + 2)
    local v = bor(lshift(a, 16), lshift(b or 0, 8), c or 0)
    out[#out + 1] = ENC[rshift(v, 18)] .. ENC[band(rshift(v, 12), 63)]
      .. (b and ENC[band(rshift(v, 6), 63)] or (pad == false and "" or "="))
      .. (c and ENC[band(v, 63)] or (pad == false and "" or "="))
  end
  return concat(out)
end

-- b64decode(s [, strict]) -> octets | nil. strict: the length must be a
-- multiple of 4 with its padding (SASL); otherwise padding is optional.
-- Anything outside the alphabet, including blanks, is refused.
function _M.b64decode(s, strict)
  local n = #s
  local padn = 0
  if sub(s, -2) == "==" then padn = 2 elseif sub(s, -1) == "=" then padn = 1 end
  if strict and n % 4 ~= 0 then return nil end
  local body = n - padn
  if padn > 0 and n % 4 ~= 0 then return nil end
  if body % 4 == 1 then return nil end
  local out = {}
  local i = 1
  while i <= body do
    local c1, c2, c3, c4 = byte(s, i, i + 3)
    local d1, d2 = DEC[c1], DEC[c2]
    local d3 = i + 2 <= body and DEC[c3] or nil
    local d4 = i + 3 <= body and DEC[c4] or nil
    if not d1 or not d2 or (i + 2 <= body and not d3) or (i + 3 <= body and not d4) then return nil end
    local v = bor(lshift(d1, 18), lshift(d2, 12), lshift(d3 or 0, 6), d4 or 0)
    if d4 then
      out[#out + 1] = char(rshift(v, 16), band(rshift(v, 8), 255), band(v, 255))
    elseif d3 then
      if band(v, 255) ~= 0 then return nil end -- non-canonical trailing bits
      out[#out + 1] = char(rshift(v, 16), band(rshift(v, 8), 255))
    else
      if band(v, 0xffff) ~= 0 then return nil end
      out[#out + 1] = char(rshift(v, 16))
    end
    i = i + 4
  end
  return concat(out)
end

-- ---- the formats -----------------------------------------------------------------------

local LIMITS = { min_iterations = 1000, max_iterations = 100000000, min_ln = 1, max_ln = 30 }

-- parse(s) -> { scheme, iterations | N, r, p, ln, salt, key, text } | nil, why
function _M.parse(s)
  if type(s) ~= "string" then return nil, "expected a hash string" end
  local scheme, params, salt64, key64 = s:match("^%$([%w%-]+)%$([^$]*)%$([^$]*)%$([^$]*)$")
  if not scheme then
    return nil, "not a hash of the form $pbkdf2-sha256$<iterations>$<salt>$<hash> or "
      .. "$scrypt$ln=<n>,r=<r>,p=<p>$<salt>$<hash>"
  end
  local h = { scheme = scheme, text = s }
  if scheme == "pbkdf2-sha256" then
    local it = params:match("^%d+$") and tonumber(params) or tonumber(params:match("^i=(%d+)$"))
    if not it then return nil, "pbkdf2-sha256: bad iteration count '" .. params .. "'" end
    if it < LIMITS.min_iterations or it > LIMITS.max_iterations then
      return nil, format("pbkdf2-sha256: iterations must be from %d to %d", LIMITS.min_iterations,
        LIMITS.max_iterations)
    end
    h.iterations = it
  elseif scheme == "scrypt" then
    local ln, r, p = params:match("^ln=(%d+),r=(%d+),p=(%d+)$")
    ln, r, p = tonumber(ln), tonumber(r), tonumber(p)
    if not ln then return nil, "scrypt: parameters must be ln=<n>,r=<r>,p=<p>, got '" .. params .. "'" end
    if ln < LIMITS.min_ln or ln > LIMITS.max_ln or r < 1 or r > 1024 or p < 1 or p > 1024 then
      return nil, "scrypt: ln must be from 1 to 30, r and p from 1 to 1024"
    end
    -- what OpenSSL will allocate: refuse a hash that would take over 1 GiB
    if 128 * r * (2 ^ ln + p) > 1024 ^ 3 then return nil, "scrypt: parameters need more than 1024 MiB" end
    h.ln, h.N, h.r, h.p = ln, 2 ^ ln, r, p
  else
    return nil, "unknown scheme '" .. scheme .. "' (known: pbkdf2-sha256, scrypt)"
  end
  h.salt = _M.b64decode(salt64)
  if not h.salt or #h.salt < 8 or #h.salt > 64 then
    return nil, scheme .. ": the salt must be 8 to 64 octets in base64"
  end
  h.key = _M.b64decode(key64)
  if not h.key or #h.key < 16 or #h.key > 64 then
    return nil, scheme .. ": the hash must be 16 to 64 octets in base64"
  end
  return h
end

local function derive(h, password, salt, len)
  if h.scheme == "pbkdf2-sha256" then return kdf.pbkdf2_sha256(password, salt, h.iterations, len) end
  return kdf.scrypt(password, salt, h.N, h.r, h.p, len)
end

-- format_hash(h) -> the string form of a parsed hash (salt and key given)
local function format_hash(h)
  if h.scheme == "pbkdf2-sha256" then
    return format("$pbkdf2-sha256$%d$%s$%s", h.iterations, _M.b64encode(h.salt, false), _M.b64encode(h.key, false))
  end
  return format("$scrypt$ln=%d,r=%d,p=%d$%s$%s", h.ln, h.r, h.p, _M.b64encode(h.salt, false),
    _M.b64encode(h.key, false))
end

-- hash(password [, opts]) -> string | nil, err. opts: scheme ("scrypt" or
-- "pbkdf2-sha256"), iterations, ln, r, p, salt (octets; random by default).
-- Runs on the calling thread: for the command line, not for a server.
-- params(opts) -> the hash table without salt and key | nil, why: the
-- scheme and costs of opts (the defaults for those not given), within the
-- limits of parse(): what the key derivation would refuse, or what would
-- take minutes only to be refused afterwards, is refused before it runs.
function _M.params(opts)
  opts = opts or {}
  local scheme = opts.scheme or _M.DEFAULT_SCHEME
  local h = { scheme = scheme }
  if scheme == "pbkdf2-sha256" then
    h.iterations = opts.iterations or _M.DEFAULT_ITERATIONS
  elseif scheme == "scrypt" then
    h.ln = opts.ln or _M.DEFAULT_SCRYPT.ln
    h.r = opts.r or _M.DEFAULT_SCRYPT.r
    h.p = opts.p or _M.DEFAULT_SCRYPT.p
    h.N = 2 ^ h.ln
  else
    return nil, "unknown scheme '" .. tostring(scheme) .. "' (known: pbkdf2-sha256, scrypt)"
  end
  for _, k in ipairs({ "iterations", "ln", "r", "p" }) do
    local v = h[k]
    if v ~= nil and (type(v) ~= "number" or v % 1 ~= 0 or v < 0 or v > 1e9) then
      return nil, scheme .. ": " .. k .. " must be a whole number"
    end
  end
  h.salt, h.key = string.rep("\0", 16), string.rep("\0", 32)
  local ok, why = _M.parse(format_hash(h))
  if not ok then return nil, why end
  h.salt, h.key = nil, nil
  return h
end

function _M.hash(password, opts)
  opts = opts or {}
  local h, perr = _M.params(opts)
  if not h then return nil, perr end
  local salt = opts.salt
  if not salt then
    local err
    salt, err = kdf.random(16)
    if not salt then return nil, err end
  end
  h.salt = salt
  local key, err = derive(h, password, salt, 32)
  if not key then return nil, err end
  h.key = key
  local s = format_hash(h)
  local ok, why = _M.parse(s) -- the limits of parse() apply to what we make too
  if not ok then return nil, why end
  return s
end

-- ---- verification on the kdf threads -----------------------------------------------------

local opts = { threads = 2 }
-- the pool, made at the first verify() with the opts of that moment
local jobs = workq.new("kdf", function() return kdf.pool(opts.threads) end)

-- configure{ threads = n }: the pool size, for the pool made by the next
-- verify() (after shutdown(), if one is running).
function _M.configure(o)
  if type(o) ~= "table" or (o.threads and (type(o.threads) ~= "number" or o.threads < 1 or o.threads > 16
      or o.threads % 1 ~= 0)) then
    error("passwd.configure: threads: expected an integer from 1 to 16", 2)
  end
  opts = { threads = o.threads or 2 }
end

-- like(h) -> a hash that nothing matches, at the cost of h (its scheme and
-- parameters, a random salt and key)
local function like(h)
  local salt = kdf.random(16) or string.rep("\0", 16)
  local key = kdf.random(32) or string.rep("\1", 32)
  if h.scheme == "pbkdf2-sha256" then
    return { scheme = h.scheme, iterations = h.iterations, salt = salt, key = key }
  end
  return { scheme = "scrypt", ln = h.ln, N = h.N, r = h.r, p = h.p, salt = salt, key = key }
end

local function cost_of(h)
  if h.scheme == "pbkdf2-sha256" then return format("pbkdf2-sha256 %d", h.iterations) end
  return format("scrypt %d %d %d", h.ln, h.r, h.p)
end

-- verify(password, h [, timeout]) -> true | false | nil, err, in a task.
-- h comes from parse(). The key is derived and compared (in constant time)
-- on a kdf thread; the task waits meanwhile. err: "busy" when too many
-- verifications wait already, "kdf: timeout", or an OpenSSL failure.
function _M.verify(password, h, timeout)
  if not sched.current() then error("passwd.verify() outside a task", 2) end
  local pool, perr = jobs:get()
  if not pool then return nil, perr end
  -- longer than the core takes: spend the same time, and fail
  if #password > 1024 then h, password = like(h), "" end
  local id, err
  if h.scheme == "pbkdf2-sha256" then
    id, err = pool:submit(h.key, "pbkdf2-sha256", password, h.salt, h.iterations)
  else
    id, err = pool:submit(h.key, "scrypt", password, h.salt, h.N, h.r, h.p)
  end
  if not id then return nil, err end
  return jobs:wait(id, timeout or _M.DEFAULT_TIMEOUT)
end

function _M.pending() return jobs:pending() end
function _M.shutdown() jobs:shutdown() end

-- dummy([users]) -> a hash that nothing matches: unknown users are checked
-- against it so that they take as long as known ones. Its cost is the one
-- most hashes of the users table have (a users file made with
-- `moonpost passwd --pbkdf2` checks unknown names with PBKDF2 too: the
-- default scrypt would make them take far longer, and tell which names
-- exist); the default cost without users. One per users table.
local dummies = setmetatable({}, { __mode = "k" })
local default_dummy
function _M.dummy(users)
  if users then
    local d = dummies[users]
    if d then return d end
    local count, best, best_n = {}, nil, 0
    for _, u in pairs(users) do
      local h = type(u) == "table" and u.hash
      if h and h.scheme then
        local c = cost_of(h)
        count[c] = (count[c] or 0) + 1
        -- the most common cost; a tie goes to the name that sorts first
        if count[c] > best_n or (count[c] == best_n and c < cost_of(best)) then best, best_n = h, count[c] end
      end
    end
    if best then
      d = like(best)
      dummies[users] = d
      return d
    end
  end
  if not default_dummy then
    default_dummy = like({ scheme = "scrypt", ln = _M.DEFAULT_SCRYPT.ln, N = 2 ^ _M.DEFAULT_SCRYPT.ln,
      r = _M.DEFAULT_SCRYPT.r, p = _M.DEFAULT_SCRYPT.p })
  end
  return default_dummy
end

-- ---- remembered successes ---------------------------------------------------------------

-- A client that logs in on every connection would pay the slow hash every
-- time. A cache remembers, for a while, that a user's password matched: it
-- keeps a keyed digest of user and password (one HMAC-SHA256 under a random
-- key of this process, never the password), and the hash it matched, so a
-- changed users file invalidates it. Only a correct password takes the fast
-- path; a wrong one still pays the full cost.
local Cache = {}
local cache_mt = { __index = Cache }

-- cache(ttl_seconds [, max_entries]) -> cache
function _M.cache(ttl, max)
  return setmetatable({ ttl = ttl * 1000, max = max or 10000, n = 0, entries = {},
    key = kdf.random(32) or error("passwd.cache: no random key") }, cache_mt)
end

local function digest(self, user, password)
  if #user + #password + 1 > 1024 then return nil end
  return kdf.pbkdf2_sha256(user .. "\0" .. password, self.key, 1)
end

-- hit(user, password, h) -> true when the password matched h not long ago
function Cache:hit(user, password, h)
  local e = self.entries[user]
  if not e then return false end
  if e.hash ~= h or uv.now() > e.expires then
    self.entries[user] = nil
    self.n = self.n - 1
    return false
  end
  local d = digest(self, user, password)
  return d ~= nil and kdf.equal(d, e.digest)
end

function Cache:put(user, password, h)
  local d = digest(self, user, password)
  if not d then return end
  if not self.entries[user] then
    if self.n >= self.max then self.entries, self.n = {}, 0 end
    self.n = self.n + 1
  end
  self.entries[user] = { digest = d, hash = h, expires = uv.now() + self.ttl }
end

-- ---- the users file ---------------------------------------------------------------------

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, tostring(err) end
  local s = f:read("*a")
  f:close()
  return s
end

local TENANT_PATTERN = "^[%w_][%w_%.%-]*$"
_M.TENANT_PATTERN = TENANT_PATTERN

local function check_user(name)
  if type(name) ~= "string" or name == "" or #name > 255 or name:find("[%z\1-\32\127]") then
    return false
  end
  return true
end

-- users.txt: one user a line, "user:hash[:tenant]"; blank lines and lines
-- starting with # are skipped.
local function load_txt(path, text)
  local users = {}
  local n = 0
  for line in (text .. "\n"):gmatch("([^\n]*)\n") do
    n = n + 1
    line = line:gsub("\r$", "")
    local trimmed = line:match("^%s*(.-)%s*$")
    if trimmed ~= "" and trimmed:sub(1, 1) ~= "#" then
      local user, hash, tenant = trimmed:match("^([^:]*):([^:]*):?([^:]*)$")
      if not user then
        return nil, format("%s:%d: expected user:hash or user:hash:tenant", path, n)
      end
      if not check_user(user) then
        return nil, format("%s:%d: bad user name '%s' (1 to 255 characters, no blanks or controls)", path, n, user)
      end
      if users[user] then return nil, format("%s:%d: user '%s' listed twice", path, n, user) end
      local h, why = _M.parse(hash)
      if not h then return nil, format("%s:%d: user '%s': %s", path, n, user, why) end
      if tenant ~= "" and not tenant:match(TENANT_PATTERN) then
        return nil, format("%s:%d: user '%s': bad tenant name '%s'", path, n, user, tenant)
      end
      users[user] = { hash = h, tenant = tenant ~= "" and tenant or nil, line = n }
    end
  end
  return users
end

-- The line of a users.lua file where a user's name first appears (for the
-- error messages; Lua tables do not keep lines).
local function line_of(text, user)
  local pos = text:find('"' .. user .. '"', 1, true) or text:find("'" .. user .. "'", 1, true)
    or text:find(user, 1, true)
  if not pos then return 0 end
  local _, nl = text:sub(1, pos):gsub("\n", "")
  return nl + 1
end

-- users.lua: a chunk that returns { [user] = "hash" | { hash = "...", tenant = "..." } }
local function load_lua(path, text)
  local chunk, err = loadstring(text, "@" .. path)
  if not chunk then return nil, err end
  setfenv(chunk, {})
  local ok, t = pcall(chunk)
  if not ok then return nil, tostring(t) end
  if type(t) ~= "table" then
    return nil, format("%s: must return a table of user = hash or user = { hash = ..., tenant = ... }", path)
  end
  local users = {}
  for user, v in pairs(t) do
    if not check_user(user) then
      return nil, format("%s: bad user name %s (1 to 255 characters, no blanks or controls)", path, tostring(user))
    end
    local n = line_of(text, user)
    local hash, tenant
    if type(v) == "string" then
      hash = v
    elseif type(v) == "table" then
      for k in pairs(v) do
        if k ~= "hash" and k ~= "tenant" then
          return nil, format("%s:%d: user '%s': unknown field '%s' (known: hash, tenant)", path, n, user, tostring(k))
        end
      end
      hash, tenant = v.hash, v.tenant
    else
      return nil, format("%s:%d: user '%s': expected a hash string or { hash = ..., tenant = ... }", path, n, user)
    end
    local h, why = _M.parse(hash)
    if not h then return nil, format("%s:%d: user '%s': %s", path, n, user, why) end
    if tenant ~= nil and (type(tenant) ~= "string" or not tenant:match(TENANT_PATTERN)) then
      return nil, format("%s:%d: user '%s': bad tenant name %s", path, n, user, tostring(tenant))
    end
    users[user] = { hash = h, tenant = tenant, line = n }
  end
  return users
end

-- load_users(path) -> users | nil, "file:line: why". A name ending in
-- ".lua" is a Lua file; anything else is the text format.
function _M.load_users(path)
  local text, err = read_file(path)
  if not text then return nil, path .. ": cannot read: " .. err end
  if path:match("%.lua$") then return load_lua(path, text) end
  return load_txt(path, text)
end

return _M
