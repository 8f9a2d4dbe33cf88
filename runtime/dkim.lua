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
-- the tasks through a poll handle on the signer's eventfd; the handle is
-- open only while jobs are out, so an idle runtime holds none.
local uv = require "luv"
local core = require "moonpost.core.dkim"
local sched = require "moonpost.runtime.sched"
local log = require "moonpost.runtime.log"

local pairs, ipairs, type, tostring, pcall, error = pairs, ipairs, type, tostring, pcall, error

local _M = { _VERSION = "0.1" }

_M.DEFAULT_TIMEOUT = 30

local opts = { threads = 2, rsa = "openssl", inline_ed25519 = true }
local signer         -- core signer, created on demand
local poll           -- uv poll handle on signer:fd(), while jobs are out
local waiting = {}   -- job id -> { task, token }

local function stop_poll()
  if poll then
    if not poll:is_closing() then poll:close() end
    poll = nil
  end
end

-- Hand finished jobs to their tasks. A job whose task gave up (timeout) is
-- dropped here.
local function harvest()
  if not signer then return end
  for _, r in ipairs(signer:collect()) do
    local w = waiting[r[1]]
    if w then
      waiting[r[1]] = nil
      if r[2] then
        sched.wake_token(w[1], w[2], r[2])
      else
        sched.wake_token(w[1], w[2], nil, "dkim: " .. tostring(r[3]))
      end
    end
  end
  -- a task woken above may have shut the signer down
  if not signer or signer:pending() == 0 then stop_poll() end
end

local function start_poll()
  if poll then return end
  poll = uv.new_poll(signer:fd())
  poll:start("r", function(err)
    if err then log.error("dkim: poll: %s", tostring(err)) end
    local ok, e = pcall(harvest)
    if not ok then log.error("dkim: %s", tostring(e)) end
  end)
end

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

-- sign(msg, specs, timeout) -> headers | nil, err. Waits in the calling
-- task; a mistake in specs raises. Ed25519-only jobs of messages up to
-- 64 KiB are signed at once on this thread (unless configured with
-- inline_ed25519 = false): such a signature costs about 60 µs, less than the
-- trip to a signer thread and back. RSA always goes to the threads.
function _M.sign(msg, specs, timeout)
  if not sched.current() then error("dkim.sign() outside a task", 2) end
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
        error("dkim.sign: " .. tostring(headers):gsub("^bad argument #%d to '%?'", "bad argument"), 2)
      end
      if headers then return headers end
      return nil, "dkim: " .. tostring(err)
    end
  end
  if not signer then
    local s, err = core.signer(opts)
    if not s then return nil, "dkim: " .. tostring(err) end
    signer = s
  end
  local ok, id, err = pcall(signer.submit, signer, msg, specs)
  if not ok then
    error("dkim.sign: " .. tostring(id):gsub("^bad argument #%d to '%?'", "bad argument"), 2)
  end
  if not id then return nil, "dkim: " .. tostring(err) end
  local task, token = sched.reserve()
  waiting[id] = { task, token }
  start_poll()
  local headers, werr = sched.wait(timeout or _M.DEFAULT_TIMEOUT)
  if headers then return headers end
  waiting[id] = nil
  if werr == "timeout" then return nil, "dkim: timeout" end
  return nil, werr
end

function _M.pending()
  return signer and signer:pending() or 0
end

function _M.shutdown()
  stop_poll()
  if signer then
    signer:close()
    signer = nil
  end
  local w = waiting
  waiting = {}
  for _, t in pairs(w) do sched.wake_token(t[1], t[2], nil, "dkim: closed") end
end

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
  for _, s in ipairs(sigs) do
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
