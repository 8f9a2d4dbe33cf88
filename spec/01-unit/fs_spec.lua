-- File replacement at shutdown (runtime/fs.lua replace_now): the new data
-- whole under the old name, no temporary file left, the old file kept when
-- the new one cannot be written.
local fs = require "moonpost.runtime.fs"
local uv = require "luv"

local function read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

describe("moonpost.runtime.fs replace_now", function()
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
    assert.is_true(fs.replace_now(path, "old"))
    local big = string.rep("0123456789", 100000)
    assert.is_true(fs.replace_now(path, big, ".saving"))
    assert.equal(big, read(path))
    assert.equal(384, uv.fs_stat(path).mode % 512)
    assert.is_nil(uv.fs_stat(path .. ".saving"))
    assert.is_nil(uv.fs_stat(path .. ".tmp"))
  end)

  it("keeps the old file and reports why when the new one cannot be written", function()
    local path = dir .. "/state.json"
    assert.is_true(fs.replace_now(path, "old"))
    -- the temporary name is taken by a directory: the write fails before any rename
    assert(uv.fs_mkdir(path .. ".tmp", 448))
    local ok, err = fs.replace_now(path, "new")
    assert.is_nil(ok)
    assert.matches("EISDIR", err)
    assert.equal("old", read(path))
    local ok2, err2 = fs.replace_now(dir .. "/no/such/dir/state.json", "x")
    assert.is_nil(ok2)
    assert.matches("ENOENT", err2)
  end)
end)
