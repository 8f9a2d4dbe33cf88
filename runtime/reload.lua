-- Reloading the policy of a running MTA (SIGHUP, moonpost.reload_policy()):
-- the policy file runs again and builds a new MTA, which takes over from
-- the running one without a gap. docs/cli.md#reloading-sighup has the
-- semantics for operators, docs/api.md the contract for blocks.
--
--   local reload = require "moonpost.runtime.reload"
--   local ok, err = reload.policy(moonpost, mta [, path [, args]])  -- load and hand over
--   local ok, err = reload.handover(moonpost, old, new)             -- hand over to an MTA built already
--   reload.sessions(mta)      -> sessions still served by the policies mta replaced
--   reload.drain(mta)         -- mta is stopping: those sessions end after their transaction
--   reload.drop(mta), reload.retire_all(mta)
--   reload.on_handover(fn)    -- fn(old, new) at each commit (state kept outside blocks)
--
-- The handover, in two steps:
--   prepare  (may fail; then the new MTA is dropped and the old one serves on, untouched)
--     - the spool directory must be the same;
--     - addresses the old MTA does not listen on are opened (SMTP and HTTP);
--     - the tenants share their connection counts and rate buckets;
--     - each new block meets the old block of the same name (the n-th with the
--       n-th) in block.handover(new_block, old_block, new_mta, old_mta), where
--       it may share the old block's state (it must leave the old block working);
--     - the new blocks are started.
--   commit   (cannot fail)
--     - the spool and the delivery queue carry on, with the new transports,
--       delivery filters, bounce classifier and queue options;
--     - the old transports are closed (deliveries in progress finish);
--     - listening sockets on the same address pass to the new listeners (no
--       connection is refused meanwhile); the others close;
--     - the old MTA retires: its sessions finish with the old hooks, and once
--       the last has ended its blocks are stopped.
local uv = require "luv"
local sched = require "moonpost.runtime.sched"
local log = require "moonpost.runtime.log"
local server = require "moonpost.runtime.server"
local dns = require "moonpost.runtime.dns"
local tls = require "moonpost.runtime.tls"
local policy = require "moonpost.runtime.policy"

local format, pairs, ipairs, type, tostring, pcall = string.format, pairs, ipairs, type, tostring, pcall

local _M = { _VERSION = "0.1" }

-- Functions fn(old, new) run at each commit, for state kept on the MTA by
-- parts that are not blocks (on_handover() adds one).
local commit_steps = {}

-- on_handover(fn): fn(old_mta, new_mta) runs when a reload commits, after
-- the queue and the sockets have passed to new_mta. It must not fail (an
-- error is logged).
function _M.on_handover(fn)
  commit_steps[#commit_steps + 1] = fn
end

-- Plain option tables, compared by value.
local function same(a, b)
  if a == b then return true end
  if type(a) ~= "table" or type(b) ~= "table" then return false end
  for k, v in pairs(a) do
    if not same(v, b[k]) then return false end
  end
  for k in pairs(b) do
    if a[k] == nil then return false end
  end
  return true
end

local function addr(host, port)
  return host .. "|" .. tostring(port)
end

-- the sum of one count of mta's listeners (active, parked)
local function count(mta, field)
  local n = 0
  for _, l in ipairs(mta.listeners or {}) do n = n + l[field] end
  return n
end

local function own_sessions(mta)
  return count(mta, "active")
end

-- the same over the policies mta replaced
local function of_retiring(mta, field)
  local n = 0
  for _, old in ipairs(mta.retiring or {}) do n = n + count(old, field) end
  return n
end

-- sessions(mta) -> the sessions of the policies mta replaced, not ended yet
function _M.sessions(mta)
  return of_retiring(mta, "active")
end

-- parked_sessions(mta) -> those of them parked while idle
function _M.parked_sessions(mta)
  return of_retiring(mta, "parked")
end

-- drain(mta): mta stops; the sessions of the replaced policies end after
-- their transaction, as its own do.
function _M.drain(mta)
  for _, old in ipairs(mta.retiring or {}) do
    for _, l in ipairs(old.listeners or {}) do l:drain() end
  end
end

-- drop(mta): the grace period is over; those sessions close now.
function _M.drop(mta)
  for _, old in ipairs(mta.retiring or {}) do
    for _, l in ipairs(old.listeners or {}) do l:drop_sessions() end
  end
end

-- The last session of a replaced policy has ended (or the MTA stops): its
-- blocks stop. The spool, queue and sockets belong to its successor (old
-- keeps its references to the spool and the queue: a session task that
-- outlived its closed connection still stores into the spool, or fails).
local function finish_retire(old, why)
  if old.retire_done then return end
  old.retire_done = true
  old:stop_blocks()
  old.listeners = {}
  local list = old.retire_list
  for i = #list, 1, -1 do
    if list[i] == old then table.remove(list, i) end
  end
  local instances = old.instances_list
  for i = #instances, 1, -1 do
    if instances[i] == old then table.remove(instances, i) end
  end
  if why then log.info("reload: %s", why) end
  if old.retire_task then sched.wake(old.retire_task) end
end

-- retire_all(mta): mta has stopped; so have the policies it replaced.
function _M.retire_all(mta)
  local list = mta.retiring or {}
  for i = #list, 1, -1 do finish_retire(list[i]) end
end

local function retire(moonpost, old, new)
  local list = old.retiring or {}
  old.retiring = nil
  list[#list + 1] = old
  new.retiring = list
  old.retire_list = list
  old.instances_list = moonpost.instances
  old.retired = true
  old.started = false
  if own_sessions(old) == 0 then return finish_retire(old) end
  log.info("reload: %d sessions finish under the previous policy", own_sessions(old))
  -- a wait on the scheduler's timer wheel: no handle, and finish_retire()
  -- (the MTA stopping) ends it at once
  sched.spawn_named("retire", function(err)
    log.error("reload: %s", tostring(err))
  end, function()
    while not old.retire_done and own_sessions(old) > 0 do
      old.retire_task = sched.current()
      sched.wait(0.1)
      old.retire_task = nil
    end
    finish_retire(old, "the last session of the previous policy has ended")
  end)
end

local function env_log_level()
  local l = os.getenv("MOONPOST_LOG_LEVEL")
  if l == "error" or l == "warn" or l == "info" or l == "debug" then return l end
  return "info"
end

-- ---- prepare --------------------------------------------------------------------------

-- Sockets: an address of the old MTA keeps its socket (plan[i] = index in
-- the old list); the others are opened now (opened[i]).
local function plan_smtp(old, new)
  local plan, opened, used = {}, {}, {}
  for i, spec in ipairs(new.listen_specs) do
    local want = addr(spec.host, spec.port)
    for j, os_ in ipairs(old.listen_specs) do
      local l = old.listeners[j]
      if not used[j] and l and l.tcp and addr(os_.host, os_.port) == want then
        plan[i], used[j] = j, true
        break
      end
    end
    if not plan[i] then
      local l, err = server.listen(new, spec)
      if not l then
        for _, o in pairs(opened) do o:close() end
        return nil, err
      end
      opened[i] = l
    end
  end
  return { plan = plan, opened = opened, used = used }
end

local function plan_http(old, new)
  local plan, opened, used = {}, {}, {}
  local want_list = new.opts.http or {}
  if #want_list > 0 then new:http_setup() end
  for i, a in ipairs(want_list) do
    local want = addr(a.host, a.port)
    for j, oa in ipairs(old.opts.http or {}) do
      local srv = old.http_servers and old.http_servers[j]
      if not used[j] and srv and not srv.closed and addr(oa.host, oa.port) == want then
        plan[i], used[j] = j, true
        break
      end
    end
    if not plan[i] then
      local srv, err = new:http_listen(a)
      if not srv then
        for _, o in pairs(opened) do o:close() end
        return nil, err
      end
      opened[i] = srv
    end
  end
  return { plan = plan, opened = opened, used = used }
end

local function hand_blocks(old, new)
  local by_name = {}
  for _, b in ipairs(old.blocks or {}) do
    local n = b.name or "?"
    by_name[n] = by_name[n] or {}
    table.insert(by_name[n], b)
  end
  for _, b in ipairs(new.blocks or {}) do
    local list = by_name[b.name or "?"]
    local ob = list and table.remove(list, 1)
    if ob and ob ~= b and b.handover then
      local ok, hok, herr = pcall(b.handover, b, ob, new, old)
      if not ok or not hok then
        return nil, (b.name or "block") .. ": handover: " .. tostring(ok and herr or hok)
      end
    end
  end
  return true
end

-- ---- commit -------------------------------------------------------------------------------

local function take_queue(old, new)
  local sp, q = old.spool, old.queue
  new.spool, new.queue = sp, q
  if not q then return end
  q.mta = new
  q:configure(new:queue_options())
  q.filters = {}
  for _, fn in ipairs(new.delivery_filters or {}) do q:add_filter(fn) end
  if new.transports then
    q:set_transports(new.transports)
    q:start()
  else
    q:stop()
    q.by_domain, q.default, q.transport = {}, nil, nil
    log.warn("reload: the policy has no transport: messages stay in the spool")
  end
  -- deliveries in progress finish with the old transports; a delivery held
  -- by the old shaper goes back to the queue (and to the new transport)
  local keep = {}
  for _, t in ipairs(new.transports or {}) do keep[t] = true end
  for _, t in ipairs(old.transports or {}) do
    if t.close and not keep[t] then
      local ok, err = pcall(t.close)
      if not ok then log.error("reload: closing transport %s: %s", tostring(t.name), tostring(err)) end
    end
  end
end

local function take_smtp(old, new, p)
  local listeners = {}
  for i, spec in ipairs(new.listen_specs) do
    local j = p.plan[i]
    if j then
      listeners[i] = server.adopt(new, spec, old.listeners[j])
      log.debug("reload: smtp %s kept", listeners[i].name)
    else
      listeners[i] = p.opened[i]
      log.info("listening smtp %s", listeners[i].name)
    end
  end
  for j, l in ipairs(old.listeners) do
    if not p.used[j] then
      log.info("reload: smtp %s closed", l.name)
      l:close()
    end
  end
  new.listeners = listeners
end

local function take_http(old, new, p)
  local servers = {}
  for i in ipairs(new.opts.http or {}) do
    local j = p.plan[i]
    if j then
      local srv = old.http_servers[j]
      srv.router, srv.token, srv.max_body = new.http_router, new.opts.api_token, new.opts.http_max_body
      srv.max_connections = new.opts.http_max_connections
      servers[i] = srv
    else
      servers[i] = p.opened[i]
    end
  end
  for j, srv in ipairs(old.http_servers or {}) do
    if not p.used[j] then
      log.info("reload: http %s closed", tostring(srv.name))
      srv:close()
    end
  end
  old.http_servers = {}
  new.http_servers = servers
end

-- handover(moonpost, old, new) -> true | nil, err. old is running; new was
-- built by the policy and never started.
function _M.handover(moonpost, old, new)
  if not old.started or old.stopping then return nil, "the MTA is not running" end
  if new.started then return nil, "the new MTA is running already" end
  local os_, ns = old.opts.spool, new.opts.spool
  if (os_ == nil) ~= (ns == nil) then
    return nil, "spool: adding or removing the spool needs a restart"
  end
  if os_ and os_.dir ~= ns.dir then
    return nil, format("spool: the directory changed from %s to %s; that needs a restart", os_.dir, ns.dir)
  end
  -- prepare
  local sp, err = plan_smtp(old, new)
  if not sp then return nil, err end
  local hp
  hp, err = plan_http(old, new)
  local function undo()
    for _, l in pairs(sp.opened) do l:close() end
    for _, s in pairs(hp and hp.opened or {}) do s:close() end
  end
  if not hp then
    undo()
    return nil, err
  end
  new.tenants:inherit(old.tenants)
  local ok
  ok, err = hand_blocks(old, new)
  if ok then ok, err = new:start_blocks() end
  if not ok then
    undo()
    return nil, err
  end
  -- commit
  if os_ and not same(os_, ns) then
    log.warn("reload: spool options other than 'dir' take effect at the next restart")
  end
  take_queue(old, new)
  take_smtp(old, new, sp)
  take_http(old, new, hp)
  if not same(old.opts.dns, new.opts.dns) then dns.configure(new.opts.dns) end
  tls.reload_clients()
  log.set_level(new.opts.log_level or env_log_level())
  log.set_format(new.opts.log_format or (os.getenv("MOONPOST_LOG_FORMAT") == "json" and "json" or "text"))
  new.started, new.ran, new.stopping, new.stopped = true, old.ran, false, false
  if new.metrics then new.metrics:settle() end
  for _, fn in ipairs(commit_steps) do
    local ok2, err2 = pcall(fn, old, new)
    if not ok2 then log.error("reload: %s", tostring(err2)) end
  end
  retire(moonpost, old, new)
  return true
end

local in_progress = false

-- policy(moonpost, mta [, path [, args]]) -> true | nil, err: run the policy
-- file again (the one `moonpost run` runs, or path) in a fresh table of
-- globals, and hand mta over to the MTA it builds. On an error (the file's
-- syntax, a configuration mistake, an address that cannot be opened, a
-- block that cannot start), mta serves on as before and err says why, with
-- the file and line where there is one.
function _M.policy(moonpost, mta, path, args)
  if in_progress then return nil, "a reload is in progress already" end
  if not mta.started or mta.stopping then return nil, "the MTA is not running" end
  local src = path and { path = path, args = args or {} } or policy.source
  if not src then
    return nil, "no policy file to load again: this MTA was not started by `moonpost run` (give the path)"
  end
  in_progress = true
  local t0 = uv.hrtime()
  local instances = moonpost.instances
  local before = #instances
  moonpost.reloading, moonpost.reload_from = true, mta
  local lok, ok, err = pcall(policy.load, src.path, src.args)
  moonpost.reloading, moonpost.reload_from = false, nil
  if not lok then ok, err = nil, tostring(ok) end
  -- the MTAs the file built: none of them is an instance unless it takes over
  local built = {}
  for i = before + 1, #instances do built[#built + 1] = instances[i] end
  for i = #instances, before + 1, -1 do instances[i] = nil end
  local new = built[1]
  if ok and not new then ok, err = nil, src.path .. ": the policy built no MTA (moonpost.new)" end
  if ok then
    if #built > 1 then
      log.warn("reload: %s built %d MTAs; the first takes over, the others are not started", src.path, #built)
    end
    ok, err = _M.handover(moonpost, mta, new)
  end
  in_progress = false
  if not ok then return nil, err end
  instances[#instances + 1] = new
  moonpost.current_mta = new
  log.info("reload: %s loaded in %.0f ms; new sessions use it", src.path, (uv.hrtime() - t0) / 1e6)
  new.bus:emit("reloaded", true, {})
  return true
end

return _M
