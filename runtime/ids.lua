-- Identifiers for messages and sessions.
--   ids.next()        -> "67d3a1f2c4e9a1": 8 hex digits of Unix time, then 6 of a
--                        counter that starts at a random value, so that ids stay
--                        unique across restarts and sort roughly by arrival.
--   ids.session(seq)  -> a session id for the logs
local uv = require "luv"
local format = string.format

local _M = { _VERSION = "0.1" }

local seed = (uv.hrtime() + uv.os_getpid() * 7919) % 0x1000000
local counter = seed
local pid = uv.os_getpid()

function _M.next()
  counter = (counter + 1) % 0x1000000
  return format("%08x%06x", os.time(), counter)
end

function _M.session(seq)
  return format("%x.%x", pid, seq)
end

return _M
