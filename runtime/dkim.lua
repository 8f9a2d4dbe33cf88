-- DKIM for tasks: signing on the threads of moonpost.core.dkim, so that an
-- RSA-4096 signature never holds up the loop, and verification with the
-- keys looked up first (asynchronously) and checked in C.
--
--   local rdkim = require "moonpost.runtime.dkim"
--   rdkim.configure { threads = 2, rsa = "openssl", inline_ed25519 = true } -- optional
--   local headers, err = rdkim.sign(msg, specs, timeout)   -- in a task
--   -- headers: the DKIM-Signature fields (CRLF-terminated) to prepend to msg
--   local results, err = rdkim.verify(msg, lookup, timeout) -- in a task
--   rdkim.pending()   -> jobs out on the threads
--   rdkim.shutdown()  -- joins the threads; waiting tasks get nil, "dkim: closed"
--
-- msg is a string or a message (moonpost.core.smtp); specs is the list of
-- signature specs of core signer:submit() (docs/dkim.md). The signer is
-- created at the first sign() and shared by every task. Its results wake
-- the tasks through moonpost.runtime.workq, which polls the signer's
-- eventfd only while jobs are out, so an idle runtime holds no handle.
local uv = require "luv"
local core = require "moonpost.core.dkim"
local sched = require "moonpost.runtime.sched"
local log = require "moonpost.runtime.log"
local workq = require "moonpost.runtime.workq"

local ipairs, type, tostring, pcall, error = ipairs, type, tostring, pcall, error

local _M = { _VERSION = "0.1" }

_M.DEFAULT_TIMEOUT = 30

local opts = { threads = 2, rsa = "openssl", inline_ed25519 = true }
-- the signer, made at the first sign() with the opts of that moment
local jobs = workq.new("dkim", function() return core.signer(opts) end)

-- configure{ threads = n, rsa = "libopendkim" | "openssl" }: options of the
-- signer created by the next sign() (after shutdown(), if one is running).
function _M.configure(o)
  if type(o) ~= "table" then error("dkim.configure: expected a table", 2) end
  local threads, rsa = o.threads or 2, o.rsa or "openssl"
  if type(threads) ~= "number" or threads < 1 or threads % 1 ~= 0 then
    error("dkim.configure: threads: expected a positive integer", 2)
  end
  if rsa ~= "libopendkim" and rsa ~= "openssl" then
    error("dkim.configure: rsa: expected \"libopendkim\" or \"openssl\"", 2)
  end
  opts = { threads = threads, rsa = rsa, inline_ed25519 = o.inline_ed25519 ~= false }
end

-- Larger messages go to the threads whatever the key: hashing their body
-- would hold up the loop.
local INLINE_MAX = 65536
_M.INLINE_MAX = INLINE_MAX

-- Process-wide counts for the metrics: signatures made by algorithm, and
-- messages that could not be signed.
local stats = { signatures = { ["rsa-sha256"] = 0, ["ed25519-sha256"] = 0 }, failures = 0 }
_M.stats = stats

-- key -> true when it is an Ed25519 key (asked once per key)
local ed25519 = setmetatable({}, { __mode = "k" })
local function is_ed25519(key)
  local v = ed25519[key]
  if v == nil then
    local ok, info = pcall(key.info, key)
    v = ok and info.type == "ed25519" or false
    ed25519[key] = v
  end
  return v
end

local function counted(specs, headers, err)
  if not headers then
    stats.failures = stats.failures + 1
    return nil, err
  end
  local sigs = stats.signatures
  for i = 1, #specs do
    local k = specs[i].key
    local alg = k and is_ed25519(k) and "ed25519-sha256" or "rsa-sha256"
    sigs[alg] = sigs[alg] + 1
  end
  return headers
end

-- sign(msg, specs, timeout) -> headers | nil, err. Any number of specs (more
-- than MAX_SPECS make several jobs). Waits in the calling
-- task; a mistake in specs raises. Ed25519-only jobs of messages up to
-- 64 KiB are signed at once on this thread (unless configured with
-- inline_ed25519 = false): such a signature costs about 25 µs, less than the
-- trip to a signer thread and back. RSA always goes to the threads.
local sign_job

function _M.sign(msg, specs, timeout)
  if not sched.current() then error("dkim.sign() outside a task", 2) end
  local max = core.MAX_SPECS
  if type(specs) ~= "table" or #specs <= max then
    local headers, err = sign_job(msg, specs, timeout, 0)
    return headers, err
  end
  -- more signatures than one job takes: one job per MAX_SPECS of them (each
  -- signs the message as given, so the fields simply follow one another)
  local out = {}
  for first = 1, #specs, max do
    local part = {}
    for i = first, math.min(first + max - 1, #specs) do part[#part + 1] = specs[i] end
    local headers, err = sign_job(msg, part, timeout, first - 1)
    if not headers then return nil, err end
    out[#out + 1] = headers
  end
  return table.concat(out)
end

-- a spec error raised by the core, as the caller of sign() should see it:
-- specs numbered in the caller's list
local function spec_error(e, offset)
  e = tostring(e):gsub("^bad argument #%d to '%?'", "bad argument")
  if offset > 0 then e = e:gsub("%(spec (%d+):", function(n) return "(spec " .. (tonumber(n) + offset) .. ":" end) end
  error("dkim.sign: " .. e, 4)
end

function sign_job(msg, specs, timeout, offset)
  if opts.inline_ed25519 and (type(msg) == "string" and #msg or msg:size()) <= INLINE_MAX then
    local all = true
    for i = 1, #specs do
      local k = specs[i].key
      if not (k and is_ed25519(k)) then
        all = false
        break
      end
    end
    if all then
      local ok, headers, err = pcall(core.sign_now, msg, specs)
      if not ok then
        spec_error(headers, offset)
      end
      if headers then return counted(specs, headers) end
      return counted(specs, nil, "dkim: " .. tostring(err))
    end
  end
  local signer, err = jobs:get()
  if not signer then return counted(specs, nil, err) end
  local ok, id, serr = pcall(signer.submit, signer, msg, specs)
  if not ok then
    spec_error(id, offset)
  end
  if not id then return counted(specs, nil, "dkim: " .. tostring(serr)) end
  return counted(specs, jobs:wait(id, timeout or _M.DEFAULT_TIMEOUT))
end

function _M.pending() return jobs:pending() end
function _M.shutdown() jobs:shutdown() end

-- ---- verification ----------------------------------------------------------------------

-- The DKIM key among the TXT records of a name: the first with p=.
local function pick_key(records)
  for _, r in ipairs(records) do
    local txt = type(r) == "table" and r.data or r
    if type(txt) == "string" and txt:find("p=", 1, true) then return txt end
  end
  return false
end

local TEMPORARY = { timeout = true, servfail = true, refused = true, error = true, cancelled = true }

-- verify(msg, lookup, timeout) -> results | nil, err. In a task.
-- lookup is a function(query) -> TXT text | false (no record) | nil
-- (temporary failure) that may wait, or a resolver of
-- moonpost.runtime.dns. Each signature's key is looked up once; the
-- results are those of core dkim.verify() (docs/dkim.md).
function _M.verify(msg, lookup, timeout)
  if not sched.current() then error("dkim.verify() outside a task", 2) end
  local fn = lookup
  if type(lookup) == "table" and lookup.query then
    fn = function(q)
      local recs, err = lookup:query(q, "TXT")
      if recs then return pick_key(recs) end
      if TEMPORARY[err] then return nil end
      return false
    end
  elseif type(lookup) ~= "function" then
    error("dkim.verify: lookup: expected a function or a DNS resolver", 2)
  end
  local sigs = core.signatures(msg)
  local keys, asked = {}, {}
  local deadline = uv.now() + (timeout or _M.DEFAULT_TIMEOUT) * 1000
  -- only the signatures that will be verified (the first MAX_SIGS): the
  -- others get "policy", and their keys would be lookups for nothing (to
  -- names the sender chose, one after the other)
  for i, s in ipairs(sigs) do
    if i > core.MAX_SIGS then break end
    local q = s.query
    if q and not asked[q] and not s.error then
      asked[q] = true
      if uv.now() < deadline then
        local ok, txt = pcall(fn, q)
        if not ok then
          log.warn("dkim: key lookup for %s failed: %s", q, tostring(txt))
        elseif type(txt) == "table" then
          keys[q] = pick_key(txt)
        elseif type(txt) == "string" then
          keys[q] = txt
        elseif txt == false then
          keys[q] = false
        end
      end
    end
  end
  return core.verify(msg, keys)
end

return _M
