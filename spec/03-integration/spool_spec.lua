-- The durable spool behind a live server: what got a 250 is on disk with
-- its envelope, group commit, recovery, reclamation, compaction, the lock,
-- file modes, torn writes and a full disk.
local H = require "helpers"
local E = require "moonpost.runtime.spool" -- a spool entry's slots: m[E.ID], ...
local uv = require "luv"
local sched = require "moonpost.runtime.sched"
local spool_mod = require "moonpost.runtime.spool"
local smtp = require "moonpost.core.smtp"
local idgen = require "moonpost.runtime.ids"

local function listing(dir)
  local sp = assert(spool_mod.open({ dir = dir, readonly = true }))
  local out = {}
  sp:each(function(m) out[#out + 1] = m end)
  table.sort(out, function(a, b) return a[E.ID] < b[E.ID] end)
  return out, sp
end

local function seg_files(dir)
  return H.ls(dir .. "/seg")
end

-- (segments as they are written, without preallocation: these cases count
-- on which segment holds which message and on where each file ends;
-- spool_prealloc_spec.lua has the preallocated ones)
local function spool_opts(dir, extra)
  local o = { dir = dir, min_free = 0, preallocate = false }
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end

-- a transport that records deliveries and can be told to hold or defer
local function recorder()
  local r = { delivered = {}, hold = false, defer = {} }
  function r.transport(env, body, rcpts)
    while r.hold do sched.sleep(0.02) end
    local res = {}
    for _, rc in ipairs(rcpts) do
      if r.defer[rc["local"]] then
        res[rc.index] = { status = "deferred", text = "4.2.0 not now" }
      else
        -- the body is a string, or a message handle valid during the call
        local text = type(body) == "string" and body or body:tostring()
        r.delivered[#r.delivered + 1] = { id = env.id, rcpt = rc.address, body = text, from = env.from }
        res[rc.index] = { status = "delivered", text = "2.0.0 ok" }
      end
    end
    return res
  end
  return r
end

describe("spool", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-spool") end)
  after_each(function() H.rm_rf(dir) end)

  it("keeps every message that got a 250, with its envelope, across a restart", function()
    H.run(function()
      local mta, port = H.start_mta({}, nil, { spool = spool_opts(dir .. "/spool") })
      local ids = {}
      for i = 1, 3 do
        local c, e, t = H.send(port, { from = "s" .. i .. "@client.test", to = { "a@x.test", "b@y.test" },
          mail_params = "RET=HDRS ENVID=env" .. i, rcpt_params = "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+40x.test",
          body = "Subject: " .. i .. "\r\n\r\nbody " .. i .. "\r\n" })
        assert.equal(250, c, t)
        assert.equal("2.0.0", e)
        ids[i] = t:match("queued as (%x+)")
      end
      H.stop_mta(mta)
      local list = listing(dir .. "/spool")
      assert.equal(3, #list)
      for i, m in ipairs(list) do
        assert.equal(ids[i], require("moonpost.runtime.ids").hex(m[E.ID]))
        assert.equal("s" .. i .. "@client.test", m.env.from)
        assert.same({ "a@x.test", "b@y.test" }, { m.env.rcpt[1].a, m.env.rcpt[2].a })
        assert.equal("SUCCESS,FAILURE", m.env.rcpt[1].n)
        assert.equal("rfc822;a+40x.test", m.env.rcpt[1].o)
        assert.equal("HDRS", m.env.ret)
        assert.equal("env" .. i, m.env.envid)
        assert.equal("127.0.0.1", m.env.ip)
      end
      -- a restarted server delivers them from the spool
      local r = recorder()
      mta = H.start_mta({}, function(m) m:set_transport(r.transport) end, { spool = spool_opts(dir .. "/spool") })
      assert.is_true(H.wait_for(function() return #r.delivered == 6 end))
      for _, d in ipairs(r.delivered) do
        local i = d.from:match("^s(%d)@")
        assert.equal(ids[tonumber(i)], d.id)
        assert.truthy(d.body:find("^Received: from client%.test"))
        assert.truthy(d.body:find("body " .. i .. "\r\n$"))
      end
      assert.is_true(H.wait_for(function() return mta.spool:count() == 0 end))
      H.stop_mta(mta)
      assert.equal(0, #listing(dir .. "/spool"))
    end)
  end)

  it("makes due at start a message whose retry time is beyond the longest retry interval (the clock went back)",
    function()
    H.run(function()
      local r = recorder()
      r.defer.late = true
      local opts = { spool = spool_opts(dir .. "/spool"), queue = { retry = { "1s" }, max_age = "5d" } }
      local mta, port = H.start_mta({}, function(m) m:set_transport(r.transport) end, opts)
      assert.equal(250, (H.send(port, { to = "late@x.test" })))
      assert.is_true(H.wait_for(function()
        local m
        mta.spool:each(function(x) m = x end)
        return m and m[E.ATTEMPTS] == 1
      end, 10))
      -- as if its retry had been set by a clock 30 days fast
      local m
      mta.spool:each(function(x) m = x end)
      assert(mta.spool:update(m[E.ID], { attempts = 1, next = os.time() + 30 * 86400 }))
      H.stop_mta(mta)
      r.defer.late = nil
      mta = H.start_mta({}, function(mm) mm:set_transport(r.transport) end, opts)
      assert.is_true(H.wait_for(function() return #r.delivered == 1 end, 10))
      assert.truthy(H.log("recovered messages had retry times more than the longest retry interval ahead") ~= "")
      H.stop_mta(mta)
    end)
  end)

  it("warns at start about queued mail in partitions the policy's number of workers does not deliver", function()
    H.run(function()
      local base = dir .. "/spool"
      -- mail queued by a policy that ran with workers (worker 2's partition)
      -- and by one that ran as one process (the spool itself)
      for _, d in ipairs({ base .. "/w2", base }) do
        local mta, port = H.start_mta({}, nil, { spool = spool_opts(d) })
        assert.equal(250, (H.send(port, {})))
        H.stop_mta(mta)
      end
      local stranded = spool_mod.stranded(base, 2)
      assert.same({ { dir = base, messages = 1 }, { dir = base .. "/w2", messages = 1 } }, stranded)
      -- three workers deliver w2, not the one-process spool
      assert.same({ { dir = base, messages = 1 } }, spool_mod.stranded(base, 3))
      assert.same({ { dir = base .. "/w2", messages = 1 } }, spool_mod.stranded(base, 1))
      -- a one-process policy on the spool: it says so
      local mta = H.start_mta({}, nil, { spool = spool_opts(base) })
      assert.truthy(H.log(base .. "/w2 holds 1 queued messages that this policy does not deliver (workers = 1)")
        ~= "")
      H.stop_mta(mta)
    end)
  end)

  it("writes nothing and leaves no handle behind when a delivery ends after the spool closed", function()
    H.run(function()
      local r = recorder()
      r.hold = true
      local mta, port = H.start_mta({}, function(m) m:set_transport(r.transport) end,
        { spool = spool_opts(dir .. "/spool") })
      assert.equal(250, (H.send(port, { to = { "late@x.test" } })))
      sched.sleep(0.1) -- the delivery is out, held in the transport
      local sp = mta.spool
      H.stop_mta(mta)
      assert.is_true(sp.closed)
      r.hold = false
      assert.is_true(H.wait_for(function() return #r.delivered == 1 end, 5))
      sched.sleep(0.2)
      assert.truthy(H.log("finished after the spool closed"):find("delivered again after a restart", 1, true))
      assert.equal("", H.log("cannot record"))
      -- its outcome was not recorded: still queued, delivered again after a restart
      assert.equal(1, #listing(dir .. "/spool"))
    end) -- H.run fails on a timer or check handle made after the close
  end)

  -- A batch starts at the end of the loop iteration in which the first of
  -- its messages waits for it. It started at that first message: the
  -- others stored in the same iteration waited for a second batch (on a
  -- fast disk, or on tmpfs, batches of two or three messages under load).
  it("syncs the messages stored in one loop iteration in one batch", function()
    H.run(function()
      local sp = assert(spool_mod.open(spool_opts(dir .. "/spool", { check_interval = 3600 })))
      local n, stored = 6, 0
      local function store(i)
        local t = { id = idgen.next(), sender = { address = "s@y.test" }, recipients = { { address = "r@x.test" } },
          received_at = os.time() }
        assert(sp:store(t, smtp.message("Subject: " .. i .. "\r\n\r\nz\r\n")))
        stored = stored + 1
      end
      for round = 1, 3 do
        for i = 1, n do sched.spawn(store, i) end
        assert.is_true(H.wait_for(function() return stored == n * round end, 5))
        assert.equal(round, sp.stats.batches)
        assert.equal(n * round, sp.stats.synced)
      end
      sp:close()
      assert.equal(n * 3, #listing(dir .. "/spool"))
    end)
  end)

  it("answers many concurrent transactions per fdatasync (group commit)", function()
    H.run(function()
      local mta, port = H.start_mta({}, nil, { spool = spool_opts(dir .. "/spool") })
      local sessions, per, done = 40, 10, 0
      for s = 1, sessions do
        sched.spawn(function()
          for i = 1, per do
            local c = H.send(port, { from = "s" .. s .. "@c.test", body = "Subject: " .. s .. "." .. i .. "\r\n\r\nx\r\n" })
            assert(c == 250, "got " .. tostring(c))
          end
          done = done + 1
        end)
      end
      assert.is_true(H.wait_for(function() return done == sessions end, 60))
      local st = mta.spool.stats
      assert.equal(sessions * per, st.stored)
      assert.is_true(st.batches < st.stored, "batches " .. st.batches .. " for " .. st.stored .. " messages")
      H.stop_mta(mta)
      assert.equal(sessions * per, #listing(dir .. "/spool"))
    end)
  end)

  it("creates the spool directory 0700 and its files 0600, and the parents it makes 0755 less the umask", function()
    H.run(function()
      local spool = dir .. "/var/lib/spool"
      local mta, port = H.start_mta({}, nil, { spool = spool_opts(spool) })
      assert.equal(250, (H.send(port)))
      H.stop_mta(mta)
      -- the directories above the spool stay open to other users (a
      -- Postfix, a log reader under the same var/): 0755 less the umask,
      -- which a directory mkdir makes with 0777 shows
      assert.equal(0, (H.exec("mkdir", { dir .. "/ref" })))
      local want = bit.band(tonumber("755", 8), uv.fs_stat(dir .. "/ref").mode)
      for _, p in ipairs({ "/var", "/var/lib" }) do
        assert.equal(want, uv.fs_stat(dir .. p).mode % 512, p)
      end
      for _, p in ipairs({ "", "/seg", "/quarantine" }) do
        assert.equal(tonumber("700", 8), uv.fs_stat(spool .. p).mode % 512, p)
      end
      for _, f in ipairs(seg_files(spool)) do
        assert.equal(tonumber("600", 8), uv.fs_stat(spool .. "/seg/" .. f).mode % 512, f)
      end
      assert.equal(tonumber("600", 8), uv.fs_stat(spool .. "/LOCK").mode % 512)
    end)
  end)

  it("moonpost spool list --json gives an empty list for an empty spool", function()
    H.run(function()
      local mta = H.start_mta({}, nil, { spool = spool_opts(dir .. "/spool") })
      H.stop_mta(mta)
      local code, out = H.exec(H.root .. "/scripts/moonpost", { "spool", "list", dir .. "/spool", "--json" })
      assert.equal(0, code)
      assert.equal('{"queued":0,"messages":[]}\n', out:gsub('"messages":%[%],"queued":0', '"queued":0,"messages":[]'))
    end)
  end)

  it("refuses a second process on the same spool, naming the lock", function()
    H.run(function()
      local mta = H.start_mta({}, nil, { spool = spool_opts(dir .. "/spool") })
      local moonpost = require "moonpost"
      local m2 = moonpost.new { spool = spool_opts(dir .. "/spool") }
      m2:use(require("moonpost.accept").smtp { listen = "127.0.0.1:0" })
      local ok, err = m2:start()
      assert.is_nil(ok)
      assert.truthy(err:find("is locked by another process (pid " .. uv.os_getpid() .. "; lock file "
        .. dir .. "/spool/LOCK)", 1, true), err)
      H.stop_mta(mta)
      -- and the launcher exits non-zero with that message
      local holder = H.launch(H.root .. "/spec/fixtures/policies/spool_only.lua", { MOONPOST_SPOOL = dir .. "/spool" })
      local code, _, stderr = H.exec(H.root .. "/scripts/moonpost", { "run", "spec/fixtures/policies/spool_only.lua" },
        { cwd = H.root, env = { MOONPOST_SPOOL = dir .. "/spool", MOONPOST_LISTEN = "127.0.0.1:0" }, timeout = 30 })
      assert.equal(1, code)
      assert.matches("moonpost: .*spool_only%.lua:%d+: spool .* is locked by another process %(pid "
        .. holder.pid .. "; lock file .*/LOCK%)", stderr)
      holder.stop()
    end)
  end)

  it("deletes segments whose messages are all delivered", function()
    H.run(function()
      local r = recorder()
      local mta, port = H.start_mta({}, function(m) m:set_transport(r.transport) end,
        { spool = spool_opts(dir .. "/spool", { segment_size = 8192 }) })
      for i = 1, 60 do
        assert.equal(250, (H.send(port, { body = "Subject: " .. i .. "\r\n\r\n" .. string.rep("x", 500) .. "\r\n" })))
      end
      assert.is_true(H.wait_for(function() return #r.delivered == 60 and mta.spool:count() == 0 end))
      sched.sleep(0.05)
      -- only the head (and at most one that has not been noticed yet) remain
      assert.is_true(#seg_files(dir .. "/spool") <= 2, table.concat(seg_files(dir .. "/spool"), " "))
      assert.is_true(mta.spool.stats.deleted >= 5)
      H.stop_mta(mta)
    end)
  end)

  it("compacts an old segment that keeps a few live messages, keeping their state", function()
    H.run(function()
      local r = recorder()
      r.defer.later = true
      local mta, port = H.start_mta({}, function(m) m:set_transport(r.transport) end,
        { spool = spool_opts(dir .. "/spool", { segment_size = 8192 }), queue = { retry = { "1h" } } })
      for i = 1, 60 do
        local to = (i % 10 == 0) and { "later@x.test", "now@x.test" } or { "now@x.test" }
        assert.equal(250, (H.send(port, { to = to, body = "Subject: " .. i .. "\r\n\r\n" .. string.rep("y", 500) .. "\r\n" })))
      end
      assert.is_true(H.wait_for(function() return #r.delivered == 60 end))
      assert.is_true(H.wait_for(function() return mta.spool.stats.compactions >= 1 end, 10))
      sched.sleep(0.1)
      H.stop_mta(mta)
      local list = listing(dir .. "/spool")
      assert.equal(6, #list)
      for _, m in ipairs(list) do
        -- "now@" was delivered before the copy: the copy knows it
        assert.is_true(m.rdone[2])
        assert.is_nil(m.rdone[1])
        assert.equal(1, m[E.ATTEMPTS])
      end
      -- the first segments are gone
      assert.is_nil(uv.fs_stat(dir .. "/spool/seg/" .. spool_mod.seg_name(1)))
    end)
  end)

  -- A read from disk runs in the libuv thread pool: the segment's fd is
  -- taken when the read is queued and used when a pool thread gets to it.
  -- hold_reads(fd) makes that wait as long as the test likes: reads of fd
  -- are queued only when release() is called (the thread pool being busy,
  -- e.g. with fdatasync, does the same).
  -- hold_reads(fd): the first read of fd waits in the "thread pool" until
  -- release(); the others (compaction's copies) go on
  local function hold_reads(fd)
    local real = uv.fs_read
    local held = {}
    uv.fs_read = function(f, len, off, cb)
      if f == fd and cb and #held == 0 then
        held[#held + 1] = function() assert(real(f, len, off, cb)) end
        return true
      end
      return real(f, len, off, cb)
    end
    return {
      count = function() return #held end,
      release = function()
        uv.fs_read = real
        for _, go in ipairs(held) do go() end
      end,
    }
  end

  local function direct_spool(sdir)
    -- no memory cache: every read comes from the disk
    local sp = assert(spool_mod.open(spool_opts(sdir, { segment_size = 16384, cache_bytes = 0,
      check_interval = 3600 })))
    local bodies, first = {}, {}
    for i = 1, 24 do
      local t = { id = idgen.next(), sender = { address = "s@y.test" }, recipients = { { address = "r@x.test" } },
        received_at = os.time() }
      local text = "Subject: " .. i .. "\r\n\r\n" .. string.rep(string.char(96 + i), 1000) .. "\r\n"
      assert(sp:store(t, smtp.message(text)))
      local id = idgen.number(t.id)
      bodies[id] = text
      if sp:get(id)[E.SEG].num == 1 then first[#first + 1] = id end
    end
    assert.is_true(#first >= 8 and #first < 24, #first .. " messages in the first segment")
    return sp, bodies, first
  end

  it("read() in flight returns the message when compaction moves it and deletes its segment", function()
    H.run(function()
      local sp, bodies, first = direct_spool(dir .. "/spool")
      local target = first[1]
      local seg1 = sp:get(target)[E.SEG]
      local hold = hold_reads(seg1.file:fd())
      local got
      local ok, failure = pcall(function()
        sched.spawn(function() got = { sp:read(sp:get(target)) } end)
        assert.equal(1, hold.count())
        -- the others in the first segment are delivered: it is compacted,
        -- the target copied forward, the segment deleted
        for i = 2, #first do assert(sp:done(first[i])) end
        assert.is_true(H.wait_for(function()
          return sp.stats.compactions >= 1 and not uv.fs_stat(seg1.path)
        end, 5), "the first segment was not compacted away")
        assert.are_not.equal(seg1, sp:get(target)[E.SEG])
        assert.is_nil(got)
      end)
      hold.release()
      assert(ok, failure)
      assert.is_true(H.wait_for(function() return got end, 5))
      assert.equal(idgen.hex(target), got[1] and got[1].id, tostring(got[2]))
      assert.equal(bodies[target], got[2])
      -- the old segment's fd was closed once the read ended
      assert.is_false((pcall(seg1.file.fd, seg1.file)))
      -- and the message reads from its new place
      local env, body = sp:read(sp:get(target))
      assert.equal(idgen.hex(target), env.id)
      assert.equal(bodies[target], body)
      sp:close()
    end)
  end)

  it("compaction reads the records it copies in the thread pool, never on the loop", function()
    H.run(function()
      local sp, bodies, first = direct_spool(dir .. "/spool")
      local seg1 = sp:get(first[1])[E.SEG]
      -- the segment file's blocking read (core pread on the calling thread)
      local methods = getmetatable(seg1.file).__index
      local blocking_read, blocking = methods.read, 0
      methods.read = function(...)
        blocking = blocking + 1
        return blocking_read(...)
      end
      local real, pool_reads = uv.fs_read, 0
      uv.fs_read = function(f, ...)
        if f == seg1.file:fd() then pool_reads = pool_reads + 1 end
        return real(f, ...)
      end
      local ok, failure = pcall(function()
        for i = 2, #first do assert(sp:done(first[i])) end
        assert.is_true(H.wait_for(function() return sp.stats.compactions >= 1 end, 5))
      end)
      methods.read, uv.fs_read = blocking_read, real
      assert(ok, failure)
      assert.equal(0, blocking)
      assert.equal(1, pool_reads)
      local env, body = sp:read(sp:get(first[1]))
      assert.equal(idgen.hex(first[1]), env.id)
      assert.equal(bodies[first[1]], body)
      sp:close()
    end)
  end)

  it("read() in flight returns the message when the message ends and its segment is deleted", function()
    H.run(function()
      local sp, bodies, first = direct_spool(dir .. "/spool")
      local target = first[#first]
      local seg1 = sp:get(target)[E.SEG]
      local hold = hold_reads(seg1.file:fd())
      local got
      local ok, failure = pcall(function()
        sched.spawn(function() got = { sp:read(sp:get(target)) } end)
        assert.equal(1, hold.count())
        -- the whole segment finishes (the read is, say, an inspection of a
        -- message whose delivery ends meanwhile): the segment is deleted
        for i = 1, #first do assert(sp:done(first[i])) end
        assert.is_true(H.wait_for(function() return not uv.fs_stat(seg1.path) end, 5),
          "the first segment was not deleted")
        assert.is_nil(got)
      end)
      hold.release()
      assert(ok, failure)
      assert.is_true(H.wait_for(function() return got end, 5))
      assert.equal(idgen.hex(target), got[1] and got[1].id, tostring(got[2]))
      assert.equal(bodies[target], got[2])
      assert.is_false((pcall(seg1.file.fd, seg1.file)))
      sp:close()
    end)
  end)

  it("read() in flight returns the message when the spool closes", function()
    H.run(function()
      local sp, bodies, first = direct_spool(dir .. "/spool")
      local target = first[1]
      local seg1 = sp:get(target)[E.SEG]
      local hold = hold_reads(seg1.file:fd())
      local got
      local ok, failure = pcall(function()
        sched.spawn(function() got = { sp:read(sp:get(target)) } end)
        assert.equal(1, hold.count())
        sp:close()
      end)
      hold.release()
      assert(ok, failure)
      assert.is_true(H.wait_for(function() return got end, 5))
      assert.equal(bodies[target], got[2], tostring(got[2]))
      assert.is_false((pcall(seg1.file.fd, seg1.file)))
    end)
  end)

  it("a read-only open (moonpost spool list) lists the messages of a segment compacted away after its listing",
    function()
    H.run(function()
      local sdir = dir .. "/spool"
      local sp = assert(spool_mod.open(spool_opts(sdir, { segment_size = 16384, cache_bytes = 0,
        check_interval = 3600 })))
      local first = {}
      for i = 1, 30 do
        local t = { id = idgen.next(), sender = { address = "s" .. i .. "@y.test" },
          recipients = { { address = "r@x.test" } }, received_at = os.time() }
        assert(sp:store(t, smtp.message("Subject: " .. i .. "\r\n\r\n" .. string.rep("z", 1000) .. "\r\n")))
        local id = idgen.number(t.id)
        if sp:get(id)[E.SEG].num == 1 then first[#first + 1] = id end
      end
      -- the head is full: the copies go to a segment made after the listing
      assert.is_true(sp.head.size >= sp.segment_size)
      -- what a listing process read from seg/ just before the compaction
      local fs = require "moonpost.runtime.fs"
      local real = fs.list_numbered
      local stale = real(sdir .. "/seg", "seg")
      assert.same({ 1, 2 }, stale)
      for i = 3, #first do assert(sp:done(first[i])) end
      assert.is_true(H.wait_for(function()
        return sp.stats.compactions >= 1 and not uv.fs_stat(sdir .. "/seg/" .. spool_mod.seg_name(1))
      end, 5), "the first segment was not compacted away")
      local listed = true
      fs.list_numbered = function(d, ext)
        if listed then
          listed = false
          return stale
        end
        return real(d, ext)
      end
      local ok, ro, err = pcall(spool_mod.open, { dir = sdir, readonly = true })
      fs.list_numbered = real
      assert(ok, ro)
      assert(ro, err)
      assert.equal(sp:count(), ro:count())
      for i = 1, 2 do
        local m = ro:get(first[i])
        assert.truthy(m, idgen.hex(first[i]) .. " missing")
        assert.equal(spool_mod.seg_name(3), spool_mod.seg_name(m[E.SEG].num))
      end
      ro:close()
      sp:close()
    end)
  end)

  it("a read-only open with envelopes = false keeps none, and reads each when asked, from a segment deleted since too",
    function()
    H.run(function()
      local sdir = dir .. "/spool"
      local sp = assert(spool_mod.open(spool_opts(sdir, { segment_size = 4096, cache_bytes = 0, check_interval = 3600 })))
      local ids = {}
      for i = 1, 12 do
        local t = { id = idgen.next(), sender = { address = "s" .. i .. "@y.test" },
          recipients = { { address = "r" .. i .. "@x.test" }, { address = "q" .. i .. "@x.test" } },
          received_at = os.time(), tenant = i % 2 == 0 and "even" or nil }
        assert(sp:store(t, smtp.message("Subject: " .. i .. "\r\n\r\n" .. string.rep("z", 600) .. "\r\n")))
        ids[i] = idgen.number(t.id)
      end
      local kept = assert(spool_mod.open({ dir = sdir, readonly = true }))
      local lazy = assert(spool_mod.open({ dir = sdir, readonly = true, envelopes = false }))
      assert.equal(12, lazy:count())
      -- every message of the oldest segment finishes: the server deletes it
      local oldest = sp:get(ids[1])[E.SEG]
      local gone = {}
      for i, id in ipairs(ids) do
        if sp:get(id)[E.SEG] == oldest then
          gone[#gone + 1] = i
          assert(sp:done(id))
        end
      end
      assert.is_true(#gone > 0)
      assert.is_true(H.wait_for(function() return not uv.fs_stat(oldest.path) end, 5), "the oldest segment stayed")
      for i, id in ipairs(ids) do
        local m = lazy:get(id)
        assert.is_nil(m.env)
        local env = assert(spool_mod.envelope(m))
        assert.same(kept:get(id).env, env)
        assert.equal("s" .. i .. "@y.test", env.from)
        assert.equal(2, #env.rcpt)
        assert.equal(i % 2 == 0 and "even" or nil, env.tenant)
      end
      kept:close()
      lazy:close()
      sp:close()
    end)
  end)

  -- A spool whose first segment holds one message and state records not
  -- yet synced, and is no longer the head: -> spool, the message's id, the
  -- first segment.
  local function unsynced_first_segment()
    local sp = assert(spool_mod.open(spool_opts(dir .. "/spool", { segment_size = 4096, cache_bytes = 0,
      check_interval = 3600 })))
    local t = { id = idgen.next(), sender = { address = "s@y.test" }, recipients = { { address = "r@x.test" } },
      received_at = os.time() }
    assert(sp:store(t, smtp.message("Subject: a\r\n\r\n" .. string.rep("z", 3000) .. "\r\n")))
    local id = idgen.number(t.id)
    local first = sp.head
    -- state records fill the head, with no sync between them, until the
    -- next one starts a new head: the first segment is written and not synced
    local n = 0
    while sp.head == first and n < 100 do
      n = n + 1
      assert(sp:update(id, { attempts = n, next = os.time() + 60 }))
    end
    assert.are_not.equal(first, sp.head)
    assert.is_true(sp.dirty[first] ~= nil, "the first segment was synced already")
    return sp, id, first
  end

  it("syncs on after a segment written since the last sync is deleted (its messages all finished)", function()
    H.run(function()
      local sp, id, first = unsynced_first_segment()
      -- its message ends: the first segment is deleted at the end of this turn
      assert(sp:done(id))
      assert.is_true(H.wait_for(function() return sp.segs[first.num] == nil end, 5))
      -- the next batch syncs, and so does the one after it
      assert.is_true((sp:sync()))
      local t2 = { id = idgen.next(), sender = { address = "s@y.test" }, recipients = { { address = "r@x.test" } },
        received_at = os.time() }
      assert.is_true((sp:store(t2, smtp.message("Subject: b\r\n\r\nb\r\n"))))
      assert.is_falsy(sp.syncing)
      sp:close()
    end)
  end)

  -- A sync runs in the thread pool with the fds it was given when it was
  -- queued. A segment deleted meanwhile (its messages all finished since it
  -- stopped being the head) had its file closed under the sync: the batch
  -- failed with EBADF and every transaction waiting on it got 451 4.3.0
  -- (seen in CI as a rare 451 in the queue and route specs).
  it("keeps a segment's fd open for a sync in flight when the segment is deleted", function()
    H.run(function()
      local sp, id, first = unsynced_first_segment()
      -- the first segment's fdatasync waits in the "thread pool" until release
      local fd, real, held = first.file:fd(), uv.fs_fdatasync, {}
      uv.fs_fdatasync = function(f, cb)
        if f == fd then
          held[#held + 1] = function() assert(real(f, cb)) end
          return true
        end
        return real(f, cb)
      end
      local synced
      local ok, failure = pcall(function()
        sched.spawn(function() synced = { sp:sync() } end)
        -- (the batch starts once this loop iteration has run)
        assert.is_true(H.wait_for(function() return #held == 1 end, 5))
        -- its message ends: the first segment is deleted while its sync waits
        assert(sp:done(id))
        assert.is_true(H.wait_for(function() return sp.segs[first.num] == nil end, 5))
        assert.is_nil(synced)
      end)
      uv.fs_fdatasync = real
      for _, go in ipairs(held) do go() end
      assert(ok, failure)
      assert.is_true(H.wait_for(function() return synced end, 5))
      assert.is_true(synced[1], tostring(synced[2]))
      -- the deleted segment's fd is closed once its sync has ended
      assert.is_false((pcall(first.file.fd, first.file)))
      sp:close()
    end)
  end)

  -- The memory cache of stored messages (for their first delivery) kept its
  -- order in a Lua list with a moving head: LuaJIT's `#` on it could answer
  -- a border before the head, and the whole order was then thrown away with
  -- the messages still cached, out of trim's reach: new messages were
  -- evicted at once while the lost ones held the cache. The list also kept
  -- the id of every message delivered while the cache was under its size.
  it("keeps its message cache within its size, newest kept, oldest evicted, through deliveries", function()
    local fifo = require "moonpost.runtime.fifo"
    H.run(function()
      local size = 64 * 1100
      local sp = assert(spool_mod.open(spool_opts(dir .. "/spool", { cache_bytes = size, check_interval = 3600 })))
      local function store()
        local t = { id = idgen.next(), sender = { address = "s@y.test" }, recipients = { { address = "r@x.test" } },
          received_at = os.time() }
        assert(sp:store(t, smtp.message("Subject: x\r\n\r\n" .. string.rep("z", 1000) .. "\r\n")))
        return idgen.number(t.id)
      end
      local function cached()
        local n = 0
        for _ in pairs(sp.cache) do n = n + 1 end
        return n
      end
      -- batches larger than the cache, half of each delivered at once
      local last
      for round = 1, 20 do
        local batch = {}
        for _ = 1, 50 + round * 7 do batch[#batch + 1] = store() end
        for i = 1, #batch, 2 do assert(sp:done(batch[i])) end
        last = batch[#batch]
        assert.is_true(sp.cached_bytes <= size)
      end
      assert.is_truthy(sp.cache[last], "the newest message is not cached")
      -- what is cached is what the order reaches: the oldest go first
      local more = {}
      for i = 1, 80 do more[i] = store() end
      assert.is_true(sp.cached_bytes <= size)
      assert.is_truthy(sp.cache[more[80]])
      assert.is_nil(sp.cache[last], "an older message outlived 80 newer ones in a cache of 69")
      assert.equal(cached(), sp.ncached)
      -- every message delivered at once: the order does not keep their ids
      for _ = 1, 3000 do assert(sp:done(store())) end
      assert.is_true(fifo.len(sp.cache_order) <= 2 * sp.ncached + 64, fifo.len(sp.cache_order) .. " ids in the order")
      -- the same when a delivery takes the message out of the cache (as the
      -- queue's first attempt does)
      for _ = 1, 3000 do
        local id = store()
        local env, msg, taken = sp:read(sp:get(id), true)
        assert.is_true(taken)
        assert.truthy(env)
        msg:close()
        assert(sp:done(id))
      end
      assert.equal(cached(), sp.ncached)
      assert.is_true(fifo.len(sp.cache_order) <= 2 * sp.ncached + 64, fifo.len(sp.cache_order) .. " ids in the order")
      sp:close()
    end)
  end)

  -- A DSN is synced before the state record of the message it reports on
  -- (that one goes with a later sync). A crash between the two left the
  -- message's failed recipients to be tried again, and a second DSN sent.
  it("after a crash between a DSN and the state of its message, recovery makes what the DSN reported final", function()
    H.run(function()
      local sdir = dir .. "/spool"
      local sp = assert(spool_mod.open(spool_opts(sdir, { check_interval = 3600 })))
      local o = { id = idgen.next(), sender = { address = "s@y.test" }, received_at = os.time(),
        recipients = { { address = "a@x.test" }, { address = "b@x.test" }, { address = "c@x.test" } } }
      assert(sp:store(o, smtp.message("Subject: o\r\n\r\no\r\n")))
      local function dsn(action, done)
        local t = { id = idgen.next(), sender = { address = "" }, recipients = { { address = "s@y.test" } },
          received_at = os.time(), dsn = true, dsn_of = { id = o.id, action = action, done = done } }
        return t, sp:store(t, smtp.message("Subject: dsn\r\n\r\nabout " .. o.id .. "\r\n"))
      end
      -- a@ bounced, b@ got a delay warning; the original's state was never
      -- written (the crash)
      assert(select(2, dsn("failed", { 1 })))
      assert(select(2, dsn("delayed")))
      -- c@ bounced too, but that DSN's sync failed: never acknowledged
      local real = uv.fs_fdatasync
      uv.fs_fdatasync = function(f, cb)
        return real(f, function() cb("EIO: i/o error (injected)") end)
      end
      local ok, t3, stored = pcall(dsn, "failed", { 3 })
      uv.fs_fdatasync = real
      assert(ok, t3)
      assert.is_nil(stored)
      sp:close()
      sp = assert(spool_mod.open(spool_opts(sdir, { check_interval = 3600 })))
      local m = sp:get(idgen.number(o.id))
      assert.is_true(m.rdone and m.rdone[1], "the bounced recipient is not final")
      assert.is_nil(m.rdone[2], "a recipient never reported on is final")
      assert.is_true(m.warned, "the delay warning is not recorded")
      assert.is_nil(m.rdone[3], "a DSN never acknowledged made its recipient final")
      assert.is_nil(sp:get(idgen.number(t3.id)))
      assert.equal(3, sp:count()) -- the original and the two DSNs
      -- a read-only listing (moonpost spool list) sees the same
      local list = listing(sdir)
      for _, lm in ipairs(list) do
        if lm[E.ID] == m[E.ID] then
          assert.is_true(lm.rdone[1])
          assert.is_nil(lm.rdone[2])
          assert.is_nil(lm.rdone[3])
        end
      end
      sp:close()
    end)
  end)

  it("recovers after torn tails and damage: keeps intact messages, quarantines the damaged one", function()
    math.randomseed(os.time())
    for trial = 1, 5 do
    H.run(function()
      local sdir = dir .. "/spool" .. trial
      local so = spool_opts(sdir, { segment_size = 4096 })
      local mta, port = H.start_mta({}, nil, { spool = so })
      for i = 1, 30 do
        assert.equal(250, (H.send(port, { from = "m" .. i .. "@c.test", body = "Subject: " .. i .. "\r\n\r\n" .. string.rep("z", 300) .. "\r\n" })))
      end
      H.stop_mta(mta)
      local before = listing(sdir)
      assert.equal(30, #before)
      local segs = seg_files(sdir)
      assert.is_true(#segs >= 3)
      -- flip a byte in the middle of the second message of the oldest segment
      local oldest = sdir .. "/seg/" .. segs[1]
      local victim
      for _, m in ipairs(before) do
        if m[E.SEG].num == 1 and m[E.OFF] > 0 then victim = m break end
      end
      local f = assert(io.open(oldest, "r+b"))
      f:seek("set", victim[E.OFF] + victim[E.LEN] - 40)
      f:write("#")
      f:close()
      -- tear the newest segment that has data at a random place
      local newest
      for i = #segs, 1, -1 do
        if uv.fs_stat(sdir .. "/seg/" .. segs[i]).size > 0 then newest = segs[i] break end
      end
      local size = uv.fs_stat(sdir .. "/seg/" .. newest).size
      local cut = math.random(40, size - 1)
      local lost_by_cut, at_boundary = 0, false
      for _, m in ipairs(before) do
        if spool_mod.seg_name(m[E.SEG].num) == newest then
          if m[E.OFF] + m[E.LEN] > cut then lost_by_cut = lost_by_cut + 1 end
          if m[E.OFF] == cut or m[E.OFF] + m[E.LEN] == cut then at_boundary = true end
        end
      end
      local tfd = assert(uv.fs_open(sdir .. "/seg/" .. newest, "r+", 0))
      assert(uv.fs_ftruncate(tfd, cut))
      uv.fs_close(tfd)
      -- the server starts and keeps every intact message
      mta = H.start_mta({}, nil, { spool = so })
      assert.equal(30 - 1 - lost_by_cut, mta.spool:count())
      assert.equal(1, mta.spool.stats.quarantined)
      assert.equal(at_boundary and 0 or 1, mta.spool.stats.torn) -- a cut between records leaves a clean end
      H.stop_mta(mta)
      local q = H.ls(sdir .. "/quarantine")
      assert.equal(2, #q)
      local why = H.read(sdir .. "/quarantine/" .. q[2])
      assert.matches("payload checksum", why)
      for _, qf in ipairs(q) do
        assert.equal(tonumber("600", 8), uv.fs_stat(sdir .. "/quarantine/" .. qf).mode % 512, qf)
      end
      local log = H.log("quarantined")
      assert.truthy(log:find("payload checksum", 1, true))
      if not at_boundary then assert.truthy(H.log("torn tail"):find(newest, 1, true)) end
      local after = listing(sdir)
      local left = {}
      for _, m in ipairs(after) do left[m.env.from] = true end
      assert.is_nil(left[victim.env and victim.env.from or "?"])
      for _, m in ipairs(before) do
        local torn = spool_mod.seg_name(m[E.SEG].num) == newest and m[E.OFF] + m[E.LEN] > cut
        if m ~= victim and not torn then assert.is_true(left[m.env.from], m.env.from) end
      end
    end)
    end
  end)

  it("answers 451 4.3.0 / 452 4.3.1 when the disk is full, keeps serving, and accepts again", function()
    H.run(function()
      local mnt = dir .. "/tmpfs"
      uv.fs_mkdir(mnt, 448)
      local code, out, err = H.exec("mount", { "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", mnt })
      assert.equal(0, code, "mount tmpfs (needs root): " .. out .. err)
      local mta
      local ok, failure = pcall(function()
        local r = recorder()
        local port
        mta, port = H.start_mta({}, function(m) m:set_transport(r.transport) end,
          { spool = spool_opts(mnt .. "/spool", { check_interval = 0.1 }) })
        r.hold = true
        assert.equal(250, (H.send(port, { body = "Subject: before\r\n\r\nacked before the disk filled\r\n" })))
        -- fill the disk, leaving about 100 KiB
        local filler = mnt .. "/filler"
        local fd = assert(uv.fs_open(filler, "w", 384))
        local chunk = string.rep("F", 65536)
        while true do
          local st = uv.fs_statfs(mnt)
          if st.bavail * st.bsize < 100 * 1024 then break end
          assert(uv.fs_write(fd, chunk, -1))
        end
        uv.fs_close(fd)
        local c, e = H.send(port, { body = "Subject: big\r\n\r\n" .. string.rep("b", 998) .. "\r\n"
          .. string.rep(string.rep("b", 998) .. "\r\n", 300) })
        assert.same({ 451, "4.3.0" }, { c, e })
        -- the failed record was cut off, giving its room back: several
        -- free-space checks find that, which is not space returning
        H.wait_for(function() return false end, 0.6)
        -- now refused up front
        local p = H.connect(port)
        p:script([[
          S: 220
          C: EHLO x
          S: 250
          C: MAIL FROM:<a@b.c>
          S: 250
          C: RCPT TO:<r@b.c>
          S: 452 4.3.1
          C: NOOP
          S: 250
        ]])
        p:close()
        -- deliveries go on meanwhile
        r.hold = false
        assert.is_true(H.wait_for(function() return #r.delivered == 1 end))
        assert.truthy(r.delivered[1].body:find("acked before the disk filled", 1, true))
        -- space returns: accepting again
        os.remove(filler)
        assert.is_true(H.wait_for(function() return mta.spool:accepting() end, 5))
        assert.equal(250, (H.send(port, { body = "Subject: after\r\n\r\nspace is back\r\n" })))
        assert.is_true(H.wait_for(function() return #r.delivered == 2 end))
        H.stop_mta(mta)
        assert.truthy(H.log("refusing new mail"):find("ENOSPC", 1, true))
      end)
      -- a failure above left the MTA running on the mount: stop it first
      if not ok and mta and not mta.stopped then pcall(H.stop_mta, mta) end
      if H.exec("umount", { mnt }) ~= 0 then H.exec("umount", { "-l", mnt }) end
      assert(ok, failure)
    end)
  end)
end)
