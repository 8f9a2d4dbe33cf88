-- Loading a policy file: `moonpost run` and `moonpost check`, and the
-- reload of a running policy (SIGHUP, the HTTP API).
--
--   local policy = require "moonpost.runtime.policy"
--   local ok, err = policy.load(path, args)   -- err starts with "<path>:<line>: " where there is a line
--   policy.source                             -- { path, args } of the policy `moonpost run` runs
--   error(policy.REACHED_RUN)                 -- mta:run() during a reload: the rest of the file is not run
--
-- Each load runs the file in a fresh table of globals that reads through to
-- the standard ones (_G): what one run of the policy left in its globals is
-- not seen by the next. Modules it loads with require() stay loaded.
local _M = { _VERSION = "0.1" }

local setmetatable, setfenv, xpcall, tostring, unpack, ipairs = setmetatable, setfenv, xpcall, tostring, unpack,
  ipairs

_M.source = nil

-- Raised by mta:run() while a reload loads the policy again: the policy
-- has built its MTA. The code after run() is the policy's shutdown code,
-- which must not run at a reload; load() takes this error as success.
_M.REACHED_RUN = setmetatable({}, { __tostring = function() return "mta:run() reached during a reload" end })

-- load(path, args) -> true | nil, err. args: the extra command-line
-- arguments, given to the chunk as `...` and in the global `arg`.
function _M.load(path, args)
  local f = io.open(path, "r")
  if not f then return nil, path .. ": cannot open file" end
  f:close()
  local chunk, err = loadfile(path)
  if not chunk then return nil, err end
  args = args or {}
  local argt = { [0] = path }
  for i, a in ipairs(args) do argt[i] = a end
  -- modules that read the global `arg` still find it
  _G.arg = argt
  local env = setmetatable({ arg = argt }, { __index = _G })
  env._G = env
  setfenv(chunk, env)
  local tb = os.getenv("MOONPOST_TRACEBACK")
  local with_traceback = tb and tb ~= "" and tb ~= "0"
  local ok, perr = xpcall(chunk, function(e)
    if e == _M.REACHED_RUN or not with_traceback then return e end
    return debug.traceback(tostring(e), 2)
  end, unpack(args))
  if not ok and perr ~= _M.REACHED_RUN then return nil, tostring(perr) end
  return true
end

return _M
