-- Identifiers for messages and sessions.
--
--   ids.next()      -> "1ac3f5e2b000001a": a new message id, as hex
--   ids.number(hex) -> the id as a number (exact: ids stay below 2^53)
--   ids.hex(n)      -> the id as hex
--   ids.bump(n)     -> later ids are greater than n (after spool recovery)
--   ids.session(seq)-> a session id for the logs
--   ids.partition(i, n) -- worker i of n: ids are i modulo n (runtime/workers.lua)
--
-- A message id is Unix seconds * 2^20 plus a counter, kept strictly
-- increasing: unique within a spool (one process holds its lock), sortable
-- by arrival, and readable as a time (id / 2^20). Worker processes each
-- take the ids of one residue modulo their number, so that an id names one
-- message across all their spool partitions.
local uv = require "luv"
local format, floor, max = string.format, math.floor, math.max

local _M = { _VERSION = "0.1" }

local SHIFT = 1048576
local last = 0
local pid = uv.os_getpid()
local part, nparts = 0, 1

function _M.next_number()
  local n = max(last + 1, os.time() * SHIFT)
  if nparts > 1 then n = n + (part - n) % nparts end
  last = n
  return n
end

function _M.partition(i, n)
  part, nparts = i, n
end

function _M.hex(n)
  return format("%013x", n)
end

function _M.number(hex)
  return tonumber(hex, 16)
end

function _M.next()
  return format("%013x", _M.next_number())
end

function _M.bump(n)
  if n > last then last = n end
end

function _M.time_of(n)
  return floor(n / SHIFT)
end

function _M.session(seq)
  return format("%x.%x", pid, seq)
end

return _M
