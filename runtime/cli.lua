-- The moonpost command line (scripts/moonpost runs this file).
--
--   moonpost run POLICY.lua [args...]   load the policy and run it
--   moonpost check POLICY.lua           load and validate the policy; start nothing
--   moonpost passwd [options] [USER [TENANT]]   a password hash for an AUTH users file
--   moonpost ctl [options] COMMAND ...  the HTTP API from the command line (runtime/ctl.lua)
--   moonpost version
--
-- Exit status: 0 ok, 1 the policy failed to load or run, 2 usage.
local dev_root = os.getenv("MOONPOST_DEV_ROOT")
if dev_root and (...) ~= "moonpost.runtime.cli" then
  dofile(dev_root .. "/runtime/devpath.lua").install(dev_root)
end

local _M = {}

local USAGE = [==[
usage: moonpost run POLICY.lua [args...]   run a policy
       moonpost check POLICY.lua           load and validate a policy, start nothing
       moonpost spool list DIR [--json]    list the messages queued in a spool
       moonpost passwd [--pbkdf2 [--iterations N] | --scrypt [--ln N --r N --p N]] [USER [TENANT]]
                                           hash a password read from standard input
       moonpost ctl [--url URL] [--token TOKEN] [--json] COMMAND ...
                                           the HTTP API: queues, inspect, suspend, resume, bounce,
                                           inject, suppress, reload, health (moonpost ctl --help)
       moonpost version
]==]

local function die(code, fmt, ...)
  io.stderr:write("moonpost: ", string.format(fmt, ...), "\n")
  return code
end

-- Load and run the policy file. Errors come back as a message that starts
-- with the policy's file and line.
local function load_policy(path, args)
  return require("moonpost.runtime.policy").load(path, args)
end

function _M.main(argv)
  local cmd = argv[1]
  if cmd == "version" or cmd == "--version" then
    local moonpost = require "moonpost"
    io.stdout:write("moonpost ", moonpost._VERSION, " (", jit and jit.version or _VERSION, ")\n")
    return 0
  end
  if cmd == "spool" then return _M.spool(argv) end
  if cmd == "passwd" then return _M.passwd(argv) end
  if cmd == "ctl" then return require("moonpost.runtime.ctl").main(argv) end
  if cmd ~= "run" and cmd ~= "check" then
    io.stderr:write(USAGE)
    return 2
  end
  local path = argv[2]
  if not path then
    io.stderr:write(USAGE)
    return 2
  end
  local args = {}
  for i = 3, #argv do args[#args + 1] = argv[i] end
  local moonpost = require "moonpost"
  if cmd == "check" then
    moonpost.check_mode = true
    local ok, err = load_policy(path, args)
    if not ok then return die(1, "%s", err) end
    io.stdout:write(path, ": ok\n")
    return 0
  end
  -- One write per block of log lines, at most 0.1 s late.
  require("moonpost.runtime.log").buffered(0.1)
  -- what a reload (SIGHUP, moonpost.reload_policy()) runs again
  require("moonpost.runtime.policy").source = { path = path, args = args }
  -- what the supervisor of worker processes starts again (runtime/workers.lua)
  require("moonpost.runtime.workers").launcher = { exe = require("luv").exepath(), script = _M.script }
  local log = require "moonpost.runtime.log"
  -- with JSON logs, the reason the run failed is a log record too
  local function failed(e)
    if log.get_format() == "json" then
      log.error("%s", e)
      log.flush()
      return 1
    end
    log.flush()
    return die(1, "%s", e)
  end
  local ok, err = load_policy(path, args)
  if not ok then return failed(err) end
  -- A policy that builds an MTA but never calls run(): run it now.
  for _, mta in ipairs(moonpost.instances) do
    if not mta.ran and not mta.stopping then
      local rok, rerr = pcall(mta.run, mta)
      if not rok then return failed(tostring(rerr)) end
      break
    end
  end
  return 0
end

-- moonpost spool list DIR [--json]: what is queued, read from the segment
-- files (works while a server runs on that spool).
function _M.spool(argv)
  local sub, dir, flag = argv[2], argv[3], argv[4]
  if sub ~= "list" or not dir or (flag and flag ~= "--json") or argv[5] ~= nil then
    io.stderr:write(USAGE)
    return 2
  end
  local log = require "moonpost.runtime.log"
  log.set_level("warn")
  local spool = require "moonpost.runtime.spool"
  local ids = require "moonpost.runtime.ids"
  local ID, ATTEMPTS, NEXT, SEG, LEN = spool.ID, spool.ATTEMPTS, spool.NEXT, spool.SEG, spool.LEN
  -- the spool of worker processes is one partition per worker, <dir>/w<i>
  -- (docs/spool.md#partitions): list them all
  local uv = require "luv"
  local parts = {}
  if not uv.fs_stat(dir .. "/seg") then
    for i = 0, 4095 do
      if not uv.fs_stat(dir .. "/w" .. i .. "/seg") then break end
      parts[#parts + 1] = "w" .. i
    end
  end
  -- Envelopes are read one at a time as the lines are written (not all
  -- kept), so the listing of a large queue takes about 150 bytes a message.
  local list, spools, part_of = {}, {}, {}
  -- (the envelopes decoded for the lines are garbage at once: collect it
  -- before the heap doubles, as Lua's default pause lets it)
  collectgarbage("setpause", 110)
  for _, part in ipairs(#parts > 0 and parts or { false }) do
    local sp, err = spool.open({ dir = part and (dir .. "/" .. part) or dir, readonly = true, envelopes = false })
    if not sp then return die(1, "%s", err) end
    spools[#spools + 1] = sp
    -- the partition by segment (a field on each message would double its table)
    for _, seg in pairs(sp.segs) do part_of[seg] = part or nil end
    sp:each(function(m) list[#list + 1] = m end)
  end
  table.sort(list, function(a, b) return a[ID] < b[ID] end)
  local now = os.time()
  -- (an envelope that cannot be read: the message is listed without it)
  local function envelope(m)
    return spool.envelope(m) or { rcpt = {}, from = "?" }
  end
  local out = io.stdout
  if flag == "--json" then
    local cjson = require "cjson"
    out:write('{"queued":', #list, ',"messages":[')
    for i, m in ipairs(list) do
      local env = envelope(m)
      local pending = setmetatable({}, cjson.array_mt or {})
      for k, r in ipairs(env.rcpt) do
        if not (m.rdone and m.rdone[k]) then pending[#pending + 1] = r.a end
      end
      if i > 1 then out:write(",") end
      out:write(cjson.encode({ id = ids.hex(m[ID]), received = env.t or ids.time_of(m[ID]), record_size = m[LEN],
        from = env.from, pending = pending, attempts = m[ATTEMPTS], next_attempt = m[NEXT], tenant = env.tenant,
        partition = part_of[m[SEG]] }))
    end
    out:write("]}\n")
    for _, sp in ipairs(spools) do sp:close() end
    return 0
  end
  -- addresses come from clients: their control characters are shown
  -- escaped, as moonpost ctl shows them (a UTF-8 address may hold a C1 CSI)
  local term = require("moonpost.runtime.ctl").term
  for _, m in ipairs(list) do
    local env = envelope(m)
    local pending = {}
    for k, r in ipairs(env.rcpt) do
      if not (m.rdone and m.rdone[k]) then pending[#pending + 1] = "<" .. term(r.a) .. ">" end
    end
    out:write(string.format("%s  %6ds  %8d  <%s>  %s  attempts=%d%s\n", ids.hex(m[ID]),
      now - (env.t or now), m[LEN], term(env.from or "?"), table.concat(pending, " "), m[ATTEMPTS] or 0,
      part_of[m[SEG]] and ("  " .. part_of[m[SEG]]) or ""))
  end
  out:write(string.format("%d queued\n", #list))
  for _, sp in ipairs(spools) do sp:close() end
  return 0
end

-- Read one line from standard input; on a terminal, prompt on stderr with
-- echo off and ask twice.
local function read_password()
  local uv = require "luv"
  local tty = uv.guess_handle(0) == "tty"
  local function one(prompt)
    if tty then
      io.stderr:write(prompt)
      os.execute("stty -echo 2>/dev/null")
    end
    local line = io.stdin:read("*l")
    if tty then
      os.execute("stty echo 2>/dev/null")
      io.stderr:write("\n")
    end
    return line and (line:gsub("\r$", ""))
  end
  local pw = one("Password: ")
  if pw and tty then
    local again = one("Again: ")
    if again ~= pw then return nil, "the passwords differ" end
  end
  if not pw or pw == "" then return nil, "no password on standard input" end
  return pw
end

-- moonpost passwd [options] [USER [TENANT]]: the password from standard
-- input, hashed; prints the hash, or the users-file line "USER:HASH[:TENANT]".
function _M.passwd(argv)
  local passwd = require "moonpost.runtime.passwd"
  local opts, pos = {}, {}
  local i = 2
  local function number(name)
    i = i + 1
    local v = tonumber(argv[i])
    if not v or v % 1 ~= 0 or v < 1 then return nil, name .. " needs a positive whole number" end
    return v
  end
  while i <= #argv do
    local a = argv[i]
    local err
    if a == "--pbkdf2" or a == "--pbkdf2-sha256" then
      opts.scheme = "pbkdf2-sha256"
    elseif a == "--scrypt" then
      opts.scheme = "scrypt"
    elseif a == "--iterations" then
      opts.iterations, err = number(a)
      opts.scheme = opts.scheme or "pbkdf2-sha256"
    elseif a == "--ln" or a == "--r" or a == "--p" then
      opts[a:sub(3)], err = number(a)
      opts.scheme = opts.scheme or "scrypt"
    elseif a:sub(1, 1) == "-" then
      err = "unknown option " .. a
    else
      pos[#pos + 1] = a
    end
    if err then
      io.stderr:write(USAGE)
      return die(2, "passwd: %s", err)
    end
    i = i + 1
  end
  if (opts.iterations and opts.scheme ~= "pbkdf2-sha256")
      or ((opts.ln or opts.r or opts.p) and opts.scheme ~= "scrypt") or #pos > 2 then
    io.stderr:write(USAGE)
    return 2
  end
  local user, tenant = pos[1], pos[2]
  if user and (user == "" or user:find("[%s:%c]")) then
    return die(2, "passwd: a user name cannot be empty or hold blanks, ':' or control characters")
  end
  if tenant and not tenant:match(passwd.TENANT_PATTERN) then
    return die(2, "passwd: bad tenant name %q", tenant)
  end
  -- the costs are checked before the password is asked for
  local okp, perr = passwd.params(opts)
  if not okp then
    io.stderr:write(USAGE)
    return die(2, "passwd: %s", perr)
  end
  local pw, err = read_password()
  if not pw then return die(1, "passwd: %s", err) end
  local h, herr = passwd.hash(pw, opts)
  if not h then return die(1, "passwd: %s", herr) end
  if user then
    io.stdout:write(user, ":", h, tenant and (":" .. tenant) or "", "\n")
  else
    io.stdout:write(h, "\n")
  end
  return 0
end

if (...) ~= "moonpost.runtime.cli" then
  _M.script = arg[0]
  io.stdout:setvbuf("line")
  io.stderr:setvbuf("line")
  local code = _M.main(arg)
  require("moonpost.runtime.log").flush()
  -- Write the profile of `luajit -jp` now: closing the Lua state at exit
  -- (os.exit(code, true)) would make luv run its loop cleanup into a state
  -- being destroyed, which crashes.
  local jp = package.loaded["jit.p"]
  if jp then pcall(jp.stop) end
  os.exit(code)
end

return _M
