-- The spool when writes fail: a full disk (a small tmpfs mounted here; the
-- specs need root) met by a store, by a compaction and by buffered DONE
-- records; a crash between a compaction copy and its state record; a
-- bounce whose DSN cannot be stored.
local H = require "helpers"
local E = require "moonpost.runtime.spool" -- a spool entry's slots: m[E.ID], ...
local uv = require "luv"
local sched = require "moonpost.runtime.sched"
local spool_mod = require "moonpost.runtime.spool"
local core = require "moonpost.core.spool"
local smtp = require "moonpost.core.smtp"
local ids = require "moonpost.runtime.ids"

local function txn(nrcpt)
  local r = {}
  for i = 1, nrcpt or 1 do r[i] = { address = "r" .. i .. "@x.test" } end
  return { id = ids.next(), sender = { address = "s@y.test" }, recipients = r, received_at = os.time() }
end

local function msg(size, tag)
  return smtp.message("Subject: " .. (tag or "x") .. "\r\n\r\n" .. string.rep("a", size) .. "\r\n")
end

-- mount a tmpfs of size (e.g. "1m") on dir/tmpfs, run fn(mnt), unmount
local function with_tmpfs(dir, size, fn)
  local mnt = dir .. "/tmpfs"
  uv.fs_mkdir(mnt, 448)
  local code, out, err = H.exec("mount", { "-t", "tmpfs", "-o", "size=" .. size .. ",mode=0700", "tmpfs", mnt })
  assert.equal(0, code, "mount tmpfs (needs root): " .. out .. err)
  local ok, failure = pcall(fn, mnt)
  -- (lazily: after a failure, files of the spool may still be open)
  H.exec("umount", { "-l", mnt })
  assert(ok, failure)
end

-- fill the file system of path up to its last few blocks
local function fill(path)
  local fd = assert(uv.fs_open(path .. "/filler", "w", 384))
  local chunk = string.rep("F", 4096)
  while uv.fs_write(fd, chunk, -1) do end
  uv.fs_close(fd)
  return path .. "/filler"
end

describe("spool faults", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-spoolf") end)
  after_each(function() H.rm_rf(dir) end)

  it("answers a store whose buffered record cannot be written, instead of waiting forever", function()
    H.run(function()
      with_tmpfs(dir, "1m", function(mnt)
        local sp = assert(spool_mod.open { dir = mnt .. "/spool", min_free = 0, cache_bytes = 0 })
        assert(sp:store(txn(1), msg(100)))
        local filler = fill(mnt)
        -- 20 kB: a record that goes through the segment's write buffer
        local result
        sched.spawn(function() result = { sp:store(txn(1), msg(20000)) } end)
        assert.is_true(H.wait_for(function() return result end, 5), "store() never returned")
        assert.is_nil(result[1])
        assert.truthy(tostring(result[2]):find("No space left", 1, true), tostring(result[2]))
        os.remove(filler)
        assert(sp:store(txn(1), msg(100)))
        assert.equal(2, sp:count())
        sp:close()
      end)
    end)
  end)

  it("keeps the compacted segment when the copies cannot be synced", function()
    H.run(function()
      with_tmpfs(dir, "1m", function(mnt)
        local sdir = mnt .. "/spool"
        local sp = assert(spool_mod.open { dir = sdir, segment_size = 65536, min_free = 0, cache_bytes = 0,
          check_interval = 3600, fault = { compaction_pause = 0.3 } })
        local all = {}
        for i = 1, 24 do
          local t = txn(1)
          assert(sp:store(t, msg(9000, "m" .. i)))
          all[i] = ids.number(t.id)
        end
        local x = all[1]
        local first = sp:get(x)[E.SEG]
        local keep = {}
        for i = 1, #all do
          if sp:get(all[i])[E.SEG] == first and i % 2 == 1 then
            keep[#keep + 1] = all[i]
          elseif sp:get(all[i])[E.SEG] == first then
            sp:done(all[i])
          end
        end
        assert.is_true(#keep >= 2)
        -- compaction starts, copies half of the live messages, pauses; the
        -- disk fills and the head is full (the next copy opens a segment)
        assert.is_true(H.wait_for(function() return sp.compacting end, 5))
        sp.segment_size = sp.head.size
        local filler = fill(mnt)
        assert.is_true(H.wait_for(function() return not sp.compacting end, 5))
        assert.truthy(H.log("compaction sync failed"):find("kept", 1, true))
        -- every kept message is still in (and readable from) the first segment
        assert.is_truthy(uv.fs_stat(first.path))
        for _, id in ipairs(keep) do
          local m = sp:get(id)
          assert.equal(first, m[E.SEG])
          local env, body = sp:read(m)
          assert.truthy(env, tostring(body))
        end
        os.remove(filler)
        sp:close()
        local sp2 = assert(spool_mod.open { dir = sdir, min_free = 0 })
        for _, id in ipairs(keep) do assert.is_truthy(sp2:get(id), ids.hex(id)) end
        sp2:close()
      end)
    end)
  end)

  it("writes again the DONE records a failed write dropped, so a restart does not deliver them again", function()
    H.run(function()
      with_tmpfs(dir, "1m", function(mnt)
        local sdir = mnt .. "/spool"
        local sp = assert(spool_mod.open { dir = sdir, min_free = 0, cache_bytes = 0, check_interval = 0.2 })
        local list = {}
        for i = 1, 200 do
          local t = txn(1)
          list[i] = ids.number(t.id)
          sched.spawn(function() assert(sp:store(t, msg(50))) end)
        end
        assert.is_true(H.wait_for(function() return sp:count() == 200 end, 5))
        local filler = fill(mnt)
        -- finished in one loop iteration: their DONE records are buffered,
        -- and the write at the end of the iteration fails
        for i = 1, 200 do sp:done(list[i]) end
        assert.is_true(H.wait_for(function() return sp.pending_done end, 5), "no DONE was found lost")
        os.remove(filler)
        assert.is_true(H.wait_for(function() return not sp.pending_done and not sp.syncing end, 5))
        sched.sleep(0.3) -- the lazy sync of the rewritten records
        sp:close()
        local sp2 = assert(spool_mod.open { dir = sdir, min_free = 0 })
        assert.equal(0, sp2:count())
        sp2:close()
      end)
    end)
  end)

  it("keeps the recipients already final when a crash comes between a compaction copy and its state", function()
    H.run(function()
      local sdir = dir .. "/spool"
      local sp = assert(spool_mod.open { dir = sdir, min_free = 0, cache_bytes = 0 })
      local t = txn(2)
      assert(sp:store(t, msg(100)))
      local x = ids.number(t.id)
      assert(sp:update(x, { done = { 1 }, attempts = 1, next = os.time() + 3600 }))
      assert(sp:sync())
      local m = sp:get(x)
      local path, off, len = m[E.SEG].path, m[E.OFF], m[E.LEN]
      sp:close()
      -- what a compaction writes first (the copy), without the STATE record
      -- that follows it: as a kill -9 between the two leaves the file
      local f = assert(core.open(path, false))
      local rtype, _, id, meta, body = core.decode(assert(f:read(off, len)))
      assert.equal(core.MSG, rtype)
      assert(f:append(core.MSG, core.F_COPY, id, meta, body, 2))
      assert(f:flush())
      f:close()
      local sp2 = assert(spool_mod.open { dir = sdir, min_free = 0 })
      local m2 = sp2:get(x)
      assert.is_truthy(m2)
      assert.is_true(m2.rdone[1])
      assert.is_nil(m2.rdone[2]) -- the other recipient still to do
      assert.is_true(m2[E.OFF] > off)
      sp2:close()
    end)
  end)

  it("does not finish a bounce whose DSN cannot be stored", function()
    H.run(function()
      with_tmpfs(dir, "2m", function(mnt)
        local filler
        local mta, port = H.start_mta({}, function(m)
          m:set_transport(function(_, _, rcpts)
            -- the disk is full when the bounce comes
            filler = filler or fill(mnt)
            local res = {}
            for _, rc in ipairs(rcpts) do
              res[rc.index] = { status = "bounced", code = 550, enhanced = "5.1.1", text = "no such user" }
            end
            return res
          end)
        end, { spool = { dir = mnt .. "/spool", min_free = 0, check_interval = 3600 } })
        -- large enough that its DSN (RET=FULL) cannot fit in what is left
        local body = "Subject: big\r\n\r\n" .. string.rep(string.rep("y", 70) .. "\r\n", 4500)
        assert.equal(250, (H.send(port, { from = "sender@client.test", to = { "nobody@remote.test" },
          mail_params = "RET=FULL", body = body })))
        assert.is_true(H.wait_for(function() return H.log("cannot queue the failed DSN") ~= "" end, 10))
        sched.sleep(0.2)
        -- still queued for another attempt, not finished
        assert.equal(1, mta.spool:count())
        local m
        mta.spool:each(function(e) m = e end)
        assert.is_nil(m.rdone and m.rdone[1]) -- its recipient not final
        assert.is_true(m[E.NEXT] > os.time())
        H.stop_mta(mta)
        if filler then os.remove(filler) end
      end)
    end)
  end)
end)
