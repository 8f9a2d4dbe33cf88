-- moonpost.maildir delivering from the spool when the file system misbehaves:
-- a disk that fills up in the middle of a message, a folder removed while
-- the server runs.
local H = require "helpers"
local uv = require "luv"

-- The files of a Maildir's new/, each with its size and the size its name
-- announces (",S=<octets>").
local function arrived(dir)
  local out = {}
  for _, f in ipairs(H.ls(dir .. "/new")) do
    local st = uv.fs_stat(dir .. "/new/" .. f)
    out[#out + 1] = { name = f, size = st and st.size, says = tonumber(f:match(",S=(%d+)$")) }
  end
  return out
end

describe("maildir.deliver from the spool", function()
  local dir
  before_each(function() dir = H.tmpdir("moonpost-maildir") end)
  after_each(function() H.rm_rf(dir) end)

  -- cache_bytes = 0: every attempt reads the message from the spool (as a
  -- retry or a restart does); the default: the first attempt has it in memory
  for _, cache in ipairs({ 0, "default" }) do
    it("never puts a truncated copy in new/ when the disk fills up (cache_bytes " .. cache .. ")", function()
      local mnt = dir .. "/mail"
      assert(uv.fs_mkdir(mnt, 448))
      assert.is_true(os.execute("mount -t tmpfs -o size=128k tmpfs " .. mnt) == 0, "mount a 128 KiB tmpfs")
      local ok, failure = pcall(H.run, function()
        local mta, port = H.start_mta({}, function(m)
          m:use(require("moonpost.maildir").deliver { root = mnt })
        end, { spool = { dir = dir .. "/spool", min_free = 0, cache_bytes = cache ~= "default" and cache or nil },
          queue = { retry = { "1s" }, max_age = "1h" } })
        -- about 300 KB: more than the file system holds
        local body = "Subject: big\r\n\r\n" .. string.rep(string.rep("x", 76) .. "\r\n", 4000)
        assert.equal(250, (H.send(port, { to = "bob@example.org", body = body })))
        assert.is_true(H.wait_for(function() return H.count(H.log("to=<bob@example.org> deferred"), "\n") >= 2 end,
          15), "not deferred twice")
        assert.equal(0, #arrived(mnt .. "/bob"))
        assert.equal(0, #H.ls(mnt .. "/bob/tmp"))
        assert.equal("", H.log("to=<bob@example.org> delivered"))
        -- room again: the next retry delivers the whole message
        assert.is_true(os.execute("mount -o remount,size=1m " .. mnt) == 0)
        assert.is_true(H.wait_for(function() return #arrived(mnt .. "/bob") == 1 end, 10))
        local f = arrived(mnt .. "/bob")[1]
        assert.equal(f.says, f.size)
        assert.truthy(f.size > #body)
        H.stop_mta(mta)
      end, 40)
      os.execute("umount " .. mnt)
      assert(ok, failure)
    end)
  end

  it("makes a Maildir again when it was removed while the server runs", function()
    H.run(function()
      local mta, port = H.start_mta({}, function(m)
        m:use(require("moonpost.maildir").deliver { root = dir .. "/mail" })
      end, { spool = { dir = dir .. "/spool", min_free = 0 }, queue = { retry = { "1s" }, max_age = "1h" } })
      assert.equal(250, (H.send(port, { to = "bob@example.org" })))
      assert.is_true(H.wait_for(function() return #arrived(dir .. "/mail/bob") == 1 end, 10))
      H.rm_rf(dir .. "/mail/bob")
      assert.equal(250, (H.send(port, { to = "bob@example.org" })))
      assert.is_true(H.wait_for(function() return #arrived(dir .. "/mail/bob") == 1 end, 10))
      assert.equal("", H.log("to=<bob@example.org> deferred"))
      H.stop_mta(mta)
    end, 30)
  end)
end)
