-- Process log: one line per record on stderr (or a sink set by the policy),
-- human-readable by default:
--   2026-11-30T17:19:35.123Z info  message
-- or one JSON object per line (MOONPOST_LOG_FORMAT=json, set_format("json")):
--   {"time":"2026-11-30T17:19:35.123Z","level":"info","message":"...", <fields>}
-- Levels: error, warn, info, debug. MOONPOST_LOG_LEVEL sets the start level.
--
--   log.info(fmt, ...)                  (error, warn, debug alike)
--   log.log(level, fields, fmt, ...)    with structured fields ({ key = value })
--   log.set_level(name), log.set_format("text" | "json"), log.set_sink(fn(line))
local os_time, os_date, string_format, select = os.time, os.date, string.format, select
local byte, find, gsub, gmatch, sub = string.byte, string.find, string.gsub, string.gmatch,
  string.sub
local concat, sort, pairs, type, tostring, tonumber = table.concat, table.sort, pairs, type, tostring, tonumber

local _M = { _VERSION = "0.1" }

-- Octet scans in C: a Lua pattern with a class ("[\128-\255]") calls the
-- class matcher for every octet, and every line of the log is scanned
local smtp = require "moonpost.core.smtp"
local has_8bit, has_ctl = smtp.has_8bit, smtp.has_ctl

local LEVELS = { error = 1, warn = 2, info = 3, debug = 4 }
local NAMES = { "error", "warn ", "info ", "debug" }
local JSON_NAMES = { "error", "warn", "info", "debug" }
local level = LEVELS[os.getenv("MOONPOST_LOG_LEVEL") or ""] or LEVELS.info
local json = os.getenv("MOONPOST_LOG_FORMAT") == "json"

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

-- ---- JSON lines ------------------------------------------------------------------

local ESC = { ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f", ["\n"] = "\\n",
  ["\r"] = "\\r", ["\t"] = "\\t" }
local function esc(c)
  return ESC[c] or string_format("\\u%04x", byte(c))
end

-- utf8_clean(s) -> s with every byte that is not part of well-formed UTF-8
-- (RFC 3629: no overlong forms, no surrogates) replaced by U+FFFD, so that
-- a client's HELO name or a server's 8-bit reply gives valid JSON for
-- strict parsers. The log's JSON lines and the event log both use it.
local REPLACEMENT = "\239\191\189"

function _M.utf8_clean(s)
  if not has_8bit(s) then return s end
  local out, n, i, len = {}, 0, 1, #s
  local start = 1
  while i <= len do
    local c = byte(s, i)
    local need, lo, hi
    lo, hi = 0x80, 0xBF
    if c < 0x80 then need = 0
    elseif c >= 0xC2 and c <= 0xDF then need = 1
    elseif c == 0xE0 then need, lo = 2, 0xA0
    elseif (c >= 0xE1 and c <= 0xEC) or c == 0xEE or c == 0xEF then need = 2
    elseif c == 0xED then need, hi = 2, 0x9F
    elseif c == 0xF0 then need, lo = 3, 0x90
    elseif c >= 0xF1 and c <= 0xF3 then need = 3
    elseif c == 0xF4 then need, hi = 3, 0x8F
    else need = -1 end
    local ok = need >= 0
    for k = 1, need do
      local d = byte(s, i + k)
      if not d or d < (k == 1 and lo or 0x80) or d > (k == 1 and hi or 0xBF) then ok = false break end
    end
    if ok then
      i = i + need + 1
    else
      n = n + 1
      out[n] = sub(s, start, i - 1) .. REPLACEMENT
      i = i + 1
      start = i
    end
  end
  if n == 0 then return s end
  out[n + 1] = sub(s, start)
  return concat(out)
end

local utf8_clean = _M.utf8_clean

local function jstr(s)
  return '"' .. gsub(utf8_clean(s), '[%c"\\]', esc) .. '"'
end

local function jvalue(v)
  local t = type(v)
  if t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then return jstr(tostring(v)) end
    if v % 1 == 0 and v > -2^53 and v < 2^53 then return string_format("%d", v) end
    return string_format("%.14g", v)
  elseif t == "boolean" then
    return v and "true" or "false"
  end
  return jstr(tostring(v))
end

-- Fields read from a message written in the usual forms: "<13 hex digits>:"
-- (a message id), "session <id>:", "<component>:" at the start, and
-- key=value, key=<...>, key=[...], key="..." anywhere.
local function parse_fields(msg, f)
  local id, rest = msg:match("^(%x%x%x%x%x%x%x%x%x%x%x%x%x): (.*)$")
  if id then
    f.id = id
  else
    local s = msg:match("^session ([%x%.]+):")
    if s then
      f.session = s
    else
      local c = msg:match("^([%a][%w%._%-]*): ")
      if c then f.component = c end
    end
  end
  local text = rest or msg
  for k, v in gmatch(text, '([%a][%w_%-]*)="([^"]*)"') do
    if f[k] == nil then f[k] = v end
  end
  for k, v in gmatch(text, "([%a][%w_%-]*)=(%S+)") do
    local first = sub(v, 1, 1)
    if first == "<" then
      v = v:match("^<([^>]*)>") or v
    elseif first == "[" then
      v = v:match("^%[([^%]]*)%]") or v
    elseif first ~= '"' then
      v = gsub(v, "[,;]$", "")
      v = tonumber(v) or v
    end
    if f[k] == nil and first ~= '"' then f[k] = v end
  end
  f.time, f.level, f.message = nil, nil, nil
  return f
end

local function json_line(lvl, msg, fields)
  local f = parse_fields(msg, {})
  if fields then
    for k, v in pairs(fields) do
      if k ~= "time" and k ~= "level" and k ~= "message" then f[k] = v end
    end
  end
  local keys = {}
  for k in pairs(f) do keys[#keys + 1] = tostring(k) end
  sort(keys)
  local parts = { '{"time":', jstr(stamp()), ',"level":"', JSON_NAMES[lvl], '","message":', jstr(msg) }
  for _, k in ipairs(keys) do
    parts[#parts + 1] = "," .. jstr(k) .. ":" .. jvalue(f[k])
  end
  parts[#parts + 1] = "}\n"
  return concat(parts)
end

-- Control characters (but tab) in a text line, escaped as Lua writes them:
-- a client's bytes in a record (an AUTH user name, a TLS server name) must
-- not start a line of their own and forge a record.
local CTL = "[%z\1-\8\10-\31\127]"
local CTL_ESC = { ["\n"] = "\\n", ["\r"] = "\\r" }
local function ctl_escape(c) return CTL_ESC[c] or ("\\" .. c:byte()) end
local function escape_ctl(s)
  if not has_ctl(s) then return s end
  -- string.format's %q writes a newline as a backslash and the newline
  s = s:gsub("\\\n", "\\n")
  return (s:gsub(CTL, ctl_escape))
end
_M.escape_ctl = escape_ctl

local function text_fields(fields)
  local keys = {}
  for k in pairs(fields) do keys[#keys + 1] = tostring(k) end
  sort(keys)
  local out = {}
  for i, k in ipairs(keys) do
    local v = tostring(fields[k])
    if v == "" or find(v, "[%s\"]") then v = '"' .. v:gsub('[\\"]', "\\%0") .. '"' end
    out[i] = " " .. k .. "=" .. v
  end
  return concat(out)
end

local function emit(lvl, fields, fmt, ...)
  local msg
  if select("#", ...) > 0 then
    local ok, s = pcall(string_format, fmt, ...)
    msg = ok and s or (tostring(fmt) .. " (bad log format: " .. tostring(s) .. ")")
  else
    msg = tostring(fmt)
  end
  if json then
    sink(json_line(lvl, msg, fields))
  else
    if fields then msg = msg .. text_fields(fields) end
    sink(stamp() .. " " .. NAMES[lvl] .. " " .. escape_ctl(msg) .. "\n")
  end
end

function _M.error(fmt, ...) if level >= 1 then emit(1, nil, fmt, ...) end end
function _M.warn(fmt, ...) if level >= 2 then emit(2, nil, fmt, ...) end end
function _M.info(fmt, ...) if level >= 3 then emit(3, nil, fmt, ...) end end
function _M.debug(fmt, ...) if level >= 4 then emit(4, nil, fmt, ...) end end

-- log(level, fields, fmt, ...): a record with structured fields, a table
-- of key = string | number | boolean (in JSON, beside those read from the
-- message; in text, appended as key=value).
function _M.log(name, fields, fmt, ...)
  local l = LEVELS[name]
  if not l then error("log.log: unknown level '" .. tostring(name) .. "'", 2) end
  if level >= l then emit(l, fields, fmt, ...) end
end

-- set_format("text" | "json") -> true | nil, err
function _M.set_format(name)
  if name ~= "text" and name ~= "json" then return nil, "unknown log format '" .. tostring(name) .. "'" end
  json = name == "json"
  return true
end

function _M.get_format()
  return json and "json" or "text"
end

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
--
-- A block is whole lines of at most PIPE_BLOCK bytes, written by one
-- write(2) on an unbuffered stderr: the workers of `workers = N` share
-- their supervisor's stderr, and only a pipe write of at most PIPE_BUF
-- (4096 on Linux) bytes is atomic, so a larger one could be cut by
-- another worker's lines, tearing a line in two.
local PIPE_BLOCK = 4096
local pending, npending = {}, 0
local flush_timer

function _M.flush()
  local stderr = io.stderr
  local first, size = 1, 0
  for i = 1, npending do
    local n = #pending[i]
    if size + n > PIPE_BLOCK and i > first then
      stderr:write(concat(pending, "", first, i - 1))
      first, size = i, 0
    end
    size = size + n
  end
  if npending >= first then stderr:write(concat(pending, "", first, npending)) end
  for i = 1, npending do pending[i] = nil end
  npending = 0
  stderr:flush()
end

function _M.buffered(seconds)
  local ok, uv = pcall(require, "luv")
  if not ok then return end
  io.stderr:setvbuf("no")
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
