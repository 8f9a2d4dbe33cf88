-- The event bus and verdicts.
--
--   local bus = hooks.new(known_events)
--   bus:on(event, fn)          append fn to the event's chain (registration order)
--   bus:run(event, ...)        call the chain: nil continues, the first verdict ends it
--                              and is returned; a handler that raises propagates
--   bus:emit(event, ...)       informational events: every handler runs, errors are
--                              logged, return values ignored
--
--   hooks.reject([code], [enhanced], [text])    5xx (default 550 5.7.1)
--   hooks.tempfail([code], [enhanced], [text])  4xx (default 451 4.7.1)
--   hooks.accept([code], [enhanced], [text])    2xx (default 250 2.0.0)
local log = require "moonpost.runtime.log"
local config = require "moonpost.runtime.config"

local type, tostring, setmetatable, getmetatable = type, tostring, setmetatable, getmetatable
local match, format = string.match, string.format

local _M = { _VERSION = "0.1" }

local verdict_mt = { __tostring = function(v)
  return format("%s %d %s %s", v.kind, v.code, v.enhanced or "", v.text or "")
end }

local DEFAULTS = {
  reject = { 550, "5.7.1", "Rejected by policy", 500, 599 },
  tempfail = { 451, "4.7.1", "Try again later", 400, 499 },
  accept = { 250, "2.0.0", "Ok", 200, 299 },
}

local function make(kind, code, enhanced, text)
  local d = DEFAULTS[kind]
  if type(code) == "table" then
    code, enhanced, text = code.code, code.enhanced, code.text
  elseif type(code) == "string" and text == nil and enhanced == nil then
    -- reject("text") is allowed too.
    code, text = nil, code
  end
  if code == nil then code = d[1] end
  if type(code) ~= "number" or code % 1 ~= 0 or code < d[4] or code > d[5] then
    config.raise(format("moonpost.%s: code must be an integer from %d to %d, got %s",
      kind, d[4], d[5], tostring(code)))
  end
  if enhanced == nil then
    enhanced = match(d[2], "^%d") == match(tostring(code), "^%d") and d[2]
      or (tostring(code):sub(1, 1) .. d[2]:sub(2))
  elseif enhanced ~= false then
    if type(enhanced) ~= "string" or not match(enhanced, "^[245]%.%d%d?%d?%.%d%d?%d?$") then
      config.raise(format("moonpost.%s: enhanced status must look like %s, got %s",
        kind, d[2], tostring(enhanced)))
    end
    if enhanced:sub(1, 1) ~= tostring(code):sub(1, 1) then
      config.raise(format("moonpost.%s: enhanced status %s does not match code %d", kind, enhanced, code))
    end
  end
  if text == nil then text = d[3] end
  if type(text) ~= "string" then
    config.raise(format("moonpost.%s: text must be a string, got %s", kind, type(text)))
  end
  -- "\n" makes a multi-line reply; a CR or NUL must never reach the wire
  text = text:gsub("[\r%z]", " ")
  return setmetatable({ kind = kind, code = code, enhanced = enhanced or nil, text = text }, verdict_mt)
end

function _M.reject(code, enhanced, text) return make("reject", code, enhanced, text) end
function _M.tempfail(code, enhanced, text) return make("tempfail", code, enhanced, text) end
function _M.accept(code, enhanced, text) return make("accept", code, enhanced, text) end

function _M.is_verdict(v)
  return getmetatable(v) == verdict_mt
end

local Bus = {}
local bus_mt = { __index = Bus }

function _M.new(known)
  return setmetatable({ chains = {}, known = known or false }, bus_mt)
end

-- on(event, fn): a mistake is reported at the policy's line.
function Bus:on(event, fn)
  if type(event) ~= "string" then
    config.raise("on(): event name must be a string, got " .. type(event))
  end
  if self.known and not self.known[event] then
    config.raise(format("on(): unknown event '%s'", event))
  end
  if type(fn) ~= "function" then
    config.raise(format("on('%s'): handler must be a function, got %s", event, type(fn)))
  end
  local chain = self.chains[event]
  if not chain then
    chain = {}
    self.chains[event] = chain
  end
  chain[#chain + 1] = fn
end

function Bus:has(event)
  local c = self.chains[event]
  return c ~= nil and #c > 0
end

local function where(fn)
  local info = debug.getinfo(fn, "S")
  return info and (info.short_src .. ":" .. tostring(info.linedefined)) or "?"
end

function Bus:run(event, ...)
  local chain = self.chains[event]
  if not chain then return nil end
  for i = 1, #chain do
    local fn = chain[i]
    local v = fn(...)
    if v ~= nil then
      if getmetatable(v) ~= verdict_mt then
        error(format("handler for '%s' (%s) returned %s; return nil or a verdict "
          .. "(moonpost.reject/tempfail/accept)", event, where(fn), tostring(v)), 0)
      end
      return v
    end
  end
  return nil
end

function Bus:emit(event, ...)
  local chain = self.chains[event]
  if not chain then return end
  for i = 1, #chain do
    local ok, err = xpcall(chain[i], debug.traceback, ...)
    if not ok then log.error("handler for '%s' failed: %s", event, tostring(err)) end
  end
end

return _M
