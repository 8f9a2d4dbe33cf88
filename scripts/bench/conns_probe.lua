-- Where an idle session's memory goes (issue 8 item 4): the policy of
-- scripts/bench/conns.sh run with PROBE=1, one process. It holds sessions as
-- scripts/bench/conns.lua does and, once their number has stopped growing,
-- collects the garbage and prints a census to stderr:
--
--   - the Lua heap (collectgarbage("count") after two full collections) and
--     the C heap (glibc mallinfo2: bytes in use) per session, against the
--     same figures with no session;
--   - the size of each Lua object a session owns, read from LuaJIT's own
--     object headers through the FFI (x64, GC64 layout of LuaJIT 2.1):
--     tables (header, array and hash part), the coroutine (lua_State and its
--     stack), userdata, closures and strings, plus each session's share of
--     the tables that index every session (listener.sessions, the
--     scheduler's task table and timer wheel);
--   - the C heap of one TCP handle and one SMTP parser, measured by creating
--     N of each (luv's handle state, libuv's watchers, the parser struct).
--
-- What the census does not name is "other": open upvalues, the allocator's
-- per-object headers and rounding, garbage not collected yet.
local moonpost = require "moonpost"
local ffi = require "ffi"
local uv = require "luv"
local env = moonpost.env
local mta = moonpost.new { spool = false }
mta:use(require("moonpost.accept").smtp {
  listen = env.listen, max_connections = 1000000, log_messages = false, backlog = 4096,
})

ffi.cdef [[
struct moonpost_mallinfo2 { size_t arena, ordblks, smblks, hblks, hblkhd, usmblks, fsmblks,
  uordblks, fordblks, keepcost; };
struct moonpost_mallinfo2 mallinfo2(void);
]]
local function c_heap() -- bytes malloc has handed out and not had back
  local m = ffi.C.mallinfo2()
  return tonumber(m.uordblks) + tonumber(m.hblkhd)
end
local function lua_heap()
  collectgarbage("collect")
  collectgarbage("collect")
  return collectgarbage("count") * 1024
end

-- ---- object sizes, from LuaJIT 2.1 GC64 headers (lj_obj.h) ----------------
local u8, u32, u64 = ffi.typeof("uint8_t *"), ffi.typeof("uint32_t *"), ffi.typeof("uint64_t *")
local function addr(o)
  local mt = debug.getmetatable(o)
  if mt then debug.setmetatable(o, nil) end
  local s = tostring(o)
  if mt then debug.setmetatable(o, mt) end
  return ffi.cast(u8, ffi.cast("uintptr_t", tonumber(s:match("0x(%x+)"), 16)))
end
local nilnode = ffi.cast(u64, addr({}) + 40)[0] -- the node of a table with no hash part
-- GCtab: 64 bytes; array at +16 (colocated when colo != 0), node at +40,
-- asize at +48, hmask at +52; a Node is 24 bytes, an array slot 8
local function tsize(t)
  local p = addr(t)
  local asize, hmask = ffi.cast(u32, p + 48)[0], ffi.cast(u32, p + 52)[0]
  local node = ffi.cast(u64, p + 40)[0]
  local hash = (hmask == 0 and node == nilnode) and 0 or (hmask + 1) * 24
  return 64 + asize * 8 + hash
end
-- lua_State: 96 bytes, stacksize (slots of 8 bytes) at +88
local function cosize(co)
  return 96 + ffi.cast(u32, addr(co) + 88)[0] * 8
end
local function strsize(s) return 24 + #s + 1 end -- GCstr header + bytes + NUL
local UDATA, FUNC, UPVAL = 40, 40, 48             -- GCudata, GCfuncL (+8 per upvalue), GCupval

-- the scheduler's tables, reached through its functions' upvalues
local sched = require "moonpost.runtime.sched"
local function upvalue(fn, name)
  for i = 1, 200 do
    local n, v = debug.getupvalue(fn, i)
    if n == nil then return nil end
    if n == name then return v end
  end
end

-- C heap of N handles and N parsers, made and freed here
local function c_of(make, n)
  local objs = {}
  local l0, c0 = lua_heap(), c_heap()
  for i = 1, n do objs[i] = make() end
  local l1, c1 = lua_heap(), c_heap()
  local per_l, per_c = (l1 - l0) / n - 8, (c1 - c0) / n -- 8: the slot in objs
  return per_l, per_c, objs
end

local function census(n0lua, n0c)
  local listeners = mta.listeners
  local sessions, n = {}, 0
  for _, l in ipairs(listeners) do
    for s in pairs(l.sessions) do n = n + 1; sessions[n] = s end
  end
  if n == 0 then return end
  local lua_total, c_total = lua_heap(), c_heap()
  local rows, order = {}, {}
  local function add(name, bytes, count)
    if not rows[name] then rows[name] = { 0, 0 }; order[#order + 1] = name end
    rows[name][1] = rows[name][1] + bytes
    rows[name][2] = rows[name][2] + (count or 1)
  end
  local tasks = upvalue(sched.current, "tasks")
  local task_of = {}
  for co, task in pairs(tasks) do task_of[task] = co end
  for i = 1, n do
    local s = sessions[i]
    add("session table (self)", tsize(s))
    add("conn table (the session's public fields)", tsize(s.conn))
    add("conn.notes", tsize(s.conn.notes))
    add("conn.id string", strsize(s.conn.id))
    add("reply buffer self.out", tsize(s.out))
    local st = s.stream
    add("stream table", tsize(st))
    if st.rbuf then add("stream.rbuf", tsize(st.rbuf)) end
    if st.on_read then add("stream on_read closure + its upvalue", FUNC + 8 + UPVAL) end
    add("tcp handle userdata (a pointer; uv_tcp_t is malloc'd)", UDATA + 8)
    add("parser userdata", UDATA + 8)
  end
  -- the tasks: their table, their coroutine and its stack, their name; a
  -- parked session's task (sched.park) has no coroutine, and is found as
  -- its stream's reader
  local nt, parked = 0, 0
  local seen = {}
  local function count_task(task, co)
    if seen[task] or type(task.name) ~= "string" or task.name:sub(1, 8) ~= "session " then return end
    seen[task] = true
    nt = nt + 1
    add("task table", tsize(task))
    add("task name string", strsize(task.name))
    if co then
      add("coroutine: lua_State", 96)
      add("coroutine: stack (" .. "slots of 8 bytes)", cosize(co) - 96)
    else
      parked = parked + 1
    end
  end
  for task, co in pairs(task_of) do count_task(task, co) end
  for i = 1, n do
    local r = sessions[i].stream.reader
    if r and sched.is_parked(r) then count_task(r, nil) end
  end
  -- the shared indexes, shared out
  for _, l in ipairs(listeners) do add("listener.sessions (share)", tsize(l.sessions), 0) end
  add("scheduler task table (share)", tsize(tasks), 0)
  local buckets = upvalue(upvalue(sched.wait, "wheel_add") or function() end, "buckets")
  if buckets then
    add("timer wheel (share)", tsize(buckets), 0)
    for _, b in pairs(buckets) do add("timer wheel (share)", tsize(b), 0) end
  end
  local w = io.stderr
  local per = function(b) return b / n end
  w:write(string.format("probe: %d sessions (%d tasks, %d of them parked); "
    .. "Lua heap %.0f bytes per session, C heap (malloc) %.0f\n",
    n, nt, parked, per(lua_total - n0lua), per(c_total - n0c)))
  local named = 0
  for _, name in ipairs(order) do
    local r = rows[name]
    named = named + r[1]
    w:write(string.format("probe:   lua %-45s %6.0f bytes per session\n", name, per(r[1])))
  end
  w:write(string.format("probe:   lua %-45s %6.0f bytes per session\n",
    "other (upvalues, allocator headers, garbage)", per(lua_total - n0lua - named)))
  -- the C side, by making handles and parsers here
  local smtp = require "moonpost.core.smtp"
  -- the fields behind the largest tables, from one session
  local function keys(t)
    local k = {}
    for key in pairs(t) do k[#k + 1] = tostring(key) end
    table.sort(k)
    return #k .. " keys: " .. table.concat(k, " ")
  end
  local s1 = sessions[1]
  w:write("probe:   session table " .. keys(s1) .. "\n")
  w:write("probe:   conn table " .. keys(s1.conn) .. "\n")
  w:write("probe:   stream table " .. keys(s1.stream) .. "\n")
  for task, co in pairs(task_of) do
    if task.name == "session " .. s1.conn.id then
      w:write("probe:   task table " .. keys(task) .. "; stack " .. (cosize(co) - 96) / 8 .. " slots\n")
    end
  end
  local hl, hc, hs = c_of(function() return uv.new_tcp() end, 10000)
  for _, h in ipairs(hs) do h:close() end
  local opts = mta.listeners[1].opts
  local pl, pc = c_of(function()
    return smtp.parser({ cmd_line = opts.max_command_length, text_line = opts.max_line_length,
      max_size = opts.max_message_size })
  end, 10000)
  w:write(string.format("probe:   c   %-45s %6.0f bytes per session (its Lua side %.0f)\n",
    "luv handle state (per uv.new_tcp())", hc, hl))
  w:write(string.format("probe:   c   %-45s %6.0f bytes per session (its Lua side %.0f)\n",
    "SMTP parser struct (per smtp.parser())", pc, pl))
  w:write(string.format("probe:   c   %-45s %6.0f bytes per session\n",
    "other (libuv watchers, kernel-side not counted)", per(c_total - n0c) - hc - pc))
end

moonpost.spawn(function()
  local n0lua, n0c
  local last, still = -1, 0
  local done = false
  while true do
    moonpost.sleep(1)
    local n = mta:sessions()
    if not n0lua then n0lua, n0c = lua_heap(), c_heap() end
    io.stderr:write(string.format("lua heap %d KiB, %d sessions, worker - pid %d\n",
      collectgarbage("count"), n, uv.os_getpid()))
    if n > 0 and n == last then still = still + 1 else still = 0 end
    last = n
    if still == 2 and not done then
      done = true
      census(n0lua, n0c)
    end
  end
end)
mta:run()
