-- File replacement (runtime/fs.lua replace, and replace_now at shutdown): the new data
-- whole under the old name, no temporary file left, the old file kept when
-- the new one cannot be written. And the group commits' syncs (sync_all):
-- done once, after every sync, with the first failure.
local H = require "helpers"
local fs = require "moonpost.runtime.fs"
local uv = require "luv"

local function read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

-- replace (in a task) and replace_now (blocking) take the same steps
for _, name in ipairs({ "replace_now", "replace" }) do
  -- fs[name](...), in a task for replace
  local function replace(...)
    if name == "replace_now" then return fs.replace_now(...) end
    local args, r = { ... }, nil
    H.run(function() r = { fs.replace(unpack(args, 1, 3)) } end)
    return unpack(r, 1, 3)
  end

  describe("moonpost.runtime.fs " .. name, function()
    local dir

    before_each(function()
      dir = os.tmpname()
      os.remove(dir)
      assert(uv.fs_mkdir(dir, 448))
    end)

    after_each(function()
      os.execute("rm -rf '" .. dir .. "'")
    end)

    it("puts the whole new data under the name, mode 0600, and leaves no temporary file", function()
      local path = dir .. "/state.json"
      assert.is_true(replace(path, "old"))
      local big = string.rep("0123456789", 100000)
      assert.is_true(replace(path, big, ".saving"))
      assert.equal(big, read(path))
      assert.equal(384, uv.fs_stat(path).mode % 512)
      assert.is_nil(uv.fs_stat(path .. ".saving"))
      assert.is_nil(uv.fs_stat(path .. ".tmp"))
      assert.is_true(replace(path, ""))
      assert.equal("", read(path))
    end)

    it("keeps the old file and reports why when the new one cannot be written", function()
      local path = dir .. "/state.json"
      assert.is_true(replace(path, "old"))
      -- the temporary name is taken by a directory: the write fails before any rename
      assert(uv.fs_mkdir(path .. ".tmp", 448))
      local ok, err = replace(path, "new")
      assert.is_nil(ok)
      assert.matches("EISDIR", err)
      assert.equal("old", read(path))
      local ok2, err2, code2 = replace(dir .. "/no/such/dir/state.json", "x")
      assert.is_nil(ok2)
      assert.matches("ENOENT", err2)
      assert.equal("ENOENT", code2)
    end)
  end)
end

describe("moonpost.runtime.fs sync_all", function()
  it("calls done once after every sync, and fails a batch whose directory cannot be synced", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(uv.fs_mkdir(dir, 448))
    local fd1 = assert(uv.fs_open(dir .. "/a", "w", 384))
    local fd2 = assert(uv.fs_open(dir .. "/b", "w", 384))
    assert(uv.fs_write(fd1, "one", -1))
    local calls = {}
    H.run(function()
      local n = fs.sync_all({ fd1, fd2 }, dir, "test", function(err) calls[#calls + 1] = { err = err } end)
      assert.equal(3, n)
      assert.equal(0, #calls) -- from the thread pool's callbacks, not before
      H.wait_for(function() return #calls == 1 end, 5)
      assert.is_nil(calls[1].err)
      -- nothing to sync: done at once
      assert.equal(0, fs.sync_all({}, nil, "test", function(err) calls[#calls + 1] = { err = err or "none" } end))
      assert.equal("none", calls[2].err)
      -- the directory is gone: the files in it are not durable, the batch fails
      local n2 = fs.sync_all({ fd1 }, dir .. "/missing", "test", function(err) calls[#calls + 1] = { err = err } end)
      assert.equal(1, n2)
      H.wait_for(function() return #calls == 3 end, 5)
      assert.matches("cannot sync .*/missing: ENOENT", calls[3].err)
    end)
    uv.fs_close(fd1)
    uv.fs_close(fd2)
    os.execute("rm -rf '" .. dir .. "'")
    assert.equal(3, #calls)
  end)
end)
