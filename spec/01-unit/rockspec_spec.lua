-- Every Lua module and C binding in the tree is listed in the rockspec, so a
-- new file cannot be forgotten in the package.
local H = require "helpers"

local function load_rockspec()
  local env = {}
  local chunk = assert(loadfile(H.root .. "/rockspec/moonpost-scm-1.rockspec"))
  setfenv(chunk, env)
  chunk()
  return env
end

local function lua_files(dir)
  local out = {}
  for _, f in ipairs(H.ls(H.root .. "/" .. dir)) do
    if f:match("%.lua$") then out[#out + 1] = dir .. "/" .. f end
  end
  return out
end

describe("rockspec/moonpost-scm-1.rockspec", function()
  local spec = load_rockspec()
  local listed = {}
  for name, src in pairs(spec.build.modules) do
    if type(src) == "string" then listed[src] = name else
      for _, s in ipairs(src.sources) do listed[s] = name end
    end
  end

  it("lists every file of runtime/ and modules/ under its module name", function()
    local dirs = { "runtime", "modules" }
    for _, f in ipairs(H.ls(H.root .. "/modules")) do
      if not f:find("%.") then dirs[#dirs + 1] = "modules/" .. f end -- modules/<block>/*.lua
    end
    for _, dir in ipairs(dirs) do
      for _, f in ipairs(lua_files(dir)) do
        assert.is_string(listed[f], f .. " is not in the rockspec")
        local devpath = require "moonpost.runtime.devpath"
        local path = devpath.resolve(H.root, listed[f])
        assert.equal(H.root .. "/" .. f, path, "module name of " .. f)
      end
    end
  end)

  it("lists every C binding with the sources the Makefile builds", function()
    local mk = H.read(H.root .. "/Makefile")
    for _, f in ipairs(H.ls(H.root .. "/core")) do
      local binding = f:match("^l(%w+)%.c$")
      if binding and f ~= "lcompat.h" then
        assert.is_string(listed["core/" .. f], "core/" .. f .. " is not in the rockspec")
        assert.equal("moonpost.core." .. binding, listed["core/" .. f])
        assert.truthy(mk:find("core/" .. f, 1, true), "core/" .. f .. " is not in the Makefile")
      end
    end
  end)

  it("installs the launcher and names the licence", function()
    assert.equal("scripts/moonpost", spec.build.install.bin.moonpost)
    assert.equal("Apache-2.0", spec.description.license)
  end)
end)
