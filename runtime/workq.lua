-- Tasks waiting on a core work queue (core/workq.h): the DKIM signer and
-- the password pool. The core object runs jobs on its own threads and
-- makes its fd readable when finished jobs wait; this module polls that fd
-- with luv, collects the results and wakes the task behind each one.
--
--   local workq = require "moonpost.runtime.workq"
--   local q = workq.new("dkim", function() return core.signer(opts) end)
--   local signer, err = q:get()          -- opened at first use; err is "dkim: ..."
--   local id = signer:submit(...)         -- the caller's own arguments
--   local result, err = q:wait(id, timeout) -- in a task
--   q:pending(), q:shutdown()
--
-- The core object must have submit/collect/fd/pending/close as those of
-- moonpost.core.dkim and moonpost.core.kdf: collect() -> { { id, result } |
-- { id, nil, err }, ... }. The poll handle is open only while jobs are out,
-- so an idle runtime holds none.
local uv = require "luv"
local sched = require "moonpost.runtime.sched"
local log = require "moonpost.runtime.log"

local pairs, ipairs, tostring, pcall, setmetatable = pairs, ipairs, tostring, pcall, setmetatable

local _M = { _VERSION = "0.1" }
local mt = { __index = _M }

-- new(name, open) -> queue. name prefixes the errors it returns and logs;
-- open() -> core object | nil, err makes the core object at first use, so
-- it sees the options configured until then.
function _M.new(name, open)
  return setmetatable({ name = name, open = open, core = nil, poll = nil, waiting = {} }, mt)
end

local function stop_poll(self)
  local poll = self.poll
  if poll then
    if not poll:is_closing() then poll:close() end
    self.poll = nil
  end
end

-- Hand finished jobs to their tasks. A job whose task gave up (timeout) is
-- dropped here.
local function harvest(self)
  if not self.core then return end
  for _, r in ipairs(self.core:collect()) do
    local w = self.waiting[r[1]]
    if w then
      self.waiting[r[1]] = nil
      if r[2] ~= nil then
        sched.wake_token(w[1], w[2], r[2])
      else
        sched.wake_token(w[1], w[2], nil, self.name .. ": " .. tostring(r[3]))
      end
    end
  end
  -- a task woken above may have shut the queue down
  if not self.core or self.core:pending() == 0 then stop_poll(self) end
end

local function start_poll(self)
  if self.poll then return end
  self.poll = uv.new_poll(self.core:fd())
  self.poll:start("r", function(err)
    if err then log.error("%s: poll: %s", self.name, tostring(err)) end
    local ok, e = pcall(harvest, self)
    if not ok then log.error("%s: %s", self.name, tostring(e)) end
  end)
end

-- get() -> the core object | nil, "<name>: why"
function _M:get()
  if not self.core then
    local c, err = self.open()
    if not c then return nil, self.name .. ": " .. tostring(err) end
    self.core = c
  end
  return self.core
end

-- wait(id, timeout) -> result | nil, err, in the task that submitted job id
-- to get()'s object. err: "<name>: timeout", "<name>: closed" or the job's
-- own error after "<name>: ". A result may be false.
function _M:wait(id, timeout)
  local task, token = sched.reserve()
  self.waiting[id] = { task, token }
  start_poll(self)
  local r, err = sched.wait(timeout)
  if r ~= nil then return r end
  self.waiting[id] = nil
  if err == "timeout" then return nil, self.name .. ": timeout" end
  return nil, err
end

function _M:pending()
  return self.core and self.core:pending() or 0
end

-- shutdown() joins the threads; waiting tasks get nil, "<name>: closed".
-- The next get() opens a new core object.
function _M:shutdown()
  stop_poll(self)
  if self.core then
    self.core:close()
    self.core = nil
  end
  local w = self.waiting
  self.waiting = {}
  for _, t in pairs(w) do sched.wake_token(t[1], t[2], nil, self.name .. ": closed") end
end

return _M
