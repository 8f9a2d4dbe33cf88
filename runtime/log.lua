-- Process log: one line per record on stderr (or a sink set by the policy),
--   2026-11-30T17:19:35.123Z info  message
-- Levels: error, warn, info, debug. MOONPOST_LOG_LEVEL sets the start level.
local os_time, os_date, string_format, select = os.time, os.date, string.format, select

local _M = { _VERSION = "0.1" }

local LEVELS = { error = 1, warn = 2, info = 3, debug = 4 }
local NAMES = { "error", "warn ", "info ", "debug" }
local level = LEVELS[os.getenv("MOONPOST_LOG_LEVEL") or ""] or LEVELS.info

local sink = function(line)
  io.stderr:write(line)
end

local stamp_sec, stamp_str = -1, ""
local clock = function()
  return os_time(), 0
end

-- Use luv's clock when it is loaded, for milliseconds.
do
  local ok, uv = pcall(require, "luv")
  if ok and uv.gettimeofday then
    clock = function()
      local s, us = uv.gettimeofday()
      return s, us
    end
  end
end

local function stamp()
  local s, us = clock()
  if s ~= stamp_sec then
    stamp_sec = s
    stamp_str = os_date("!%Y-%m-%dT%H:%M:%S", s)
  end
  return string_format("%s.%03dZ", stamp_str, (us or 0) / 1000)
end

local function emit(lvl, fmt, ...)
  local msg
  if select("#", ...) > 0 then
    local ok, s = pcall(string_format, fmt, ...)
    msg = ok and s or (tostring(fmt) .. " (bad log format: " .. tostring(s) .. ")")
  else
    msg = tostring(fmt)
  end
  sink(stamp() .. " " .. NAMES[lvl] .. " " .. msg .. "\n")
end

function _M.error(fmt, ...) if level >= 1 then emit(1, fmt, ...) end end
function _M.warn(fmt, ...) if level >= 2 then emit(2, fmt, ...) end end
function _M.info(fmt, ...) if level >= 3 then emit(3, fmt, ...) end end
function _M.debug(fmt, ...) if level >= 4 then emit(4, fmt, ...) end end

function _M.enabled(name)
  return level >= (LEVELS[name] or 0)
end

function _M.set_level(name)
  local l = LEVELS[name]
  if not l then return nil, "unknown log level '" .. tostring(name) .. "'" end
  level = l
  return true
end

function _M.get_level()
  return ((NAMES[level]):gsub(" ", ""))
end

-- buffered(seconds): write the default sink's lines in blocks, at most
-- `seconds` late (one write per block instead of one per line). The CLI
-- turns it on; flush() writes what is pending.
local pending, npending = {}, 0
local flush_timer

function _M.flush()
  if npending > 0 then
    io.stderr:write(table.concat(pending, "", 1, npending))
    for i = 1, npending do pending[i] = nil end
    npending = 0
  end
  io.stderr:flush()
end

function _M.buffered(seconds)
  local ok, uv = pcall(require, "luv")
  if not ok then return end
  io.stderr:setvbuf("full")
  sink = function(line)
    npending = npending + 1
    pending[npending] = line
    if npending >= 256 then _M.flush() end
  end
  if not flush_timer then
    flush_timer = uv.new_timer()
    flush_timer:unref()
    flush_timer:start(seconds * 1000, seconds * 1000, function() pcall(_M.flush) end)
  end
end

-- sink(fn(line)) replaces the output; returns the previous one.
function _M.set_sink(fn)
  local old = sink
  sink = fn
  return old
end

return _M
