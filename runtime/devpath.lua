-- Module search for a source checkout, where files live by role (runtime/,
-- modules/, build/lib/) rather than by module name. The launcher and the
-- spec helper install it; an installed tree never needs it.
--
--   moonpost                -> <root>/modules/init.lua
--   moonpost.runtime.<x>    -> <root>/runtime/<x>.lua
--   moonpost.core.<x>       -> <root>/build/lib/moonpost/core/<x>.so
--   moonpost.<x>            -> <root>/modules/<x>.lua
local _M = {}

local function file_exists(path)
  local f = io.open(path, "r")
  if f then f:close() return true end
  return false
end

function _M.resolve(root, name)
  if name == "moonpost" then return root .. "/modules/init.lua", "lua" end
  local rest = name:match("^moonpost%.runtime%.([%w_]+)$")
  if rest then return root .. "/runtime/" .. rest .. ".lua", "lua" end
  rest = name:match("^moonpost%.core%.([%w_]+)$")
  if rest then return root .. "/build/lib/moonpost/core/" .. rest .. ".so", "c" end
  rest = name:match("^moonpost%.([%w_]+)$")
  if rest then return root .. "/modules/" .. rest .. ".lua", "lua" end
  local block, sub = name:match("^moonpost%.([%w_]+)%.([%w_]+)$")
  if block then return root .. "/modules/" .. block .. "/" .. sub .. ".lua", "lua" end
  return nil
end

function _M.install(root)
  local loaders = package.loaders -- LuaJIT (Lua 5.1)
  table.insert(loaders, 2, function(name)
    local path, kind = _M.resolve(root, name)
    if not path then return nil end
    if not file_exists(path) then
      return "\n\tno file '" .. path .. "' (moonpost checkout" ..
        (kind == "c" and "; run make" or "") .. ")"
    end
    if kind == "c" then
      local sym = "luaopen_" .. name:gsub("%.", "_")
      local f, err = package.loadlib(path, sym)
      if not f then error(err, 2) end
      return f
    end
    local f, err = loadfile(path)
    if not f then error(err, 2) end
    return f
  end)
  _M.root = root
end

return _M
