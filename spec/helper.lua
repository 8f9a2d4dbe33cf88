-- Loaded by busted before any spec (see .busted): module search for this
-- checkout, and the spec helpers on package.path.
local root = os.getenv("MOONPOST_DEV_ROOT")
if not root then
  local src = debug.getinfo(1, "S").source:sub(2)
  root = src:match("^(.*)/spec/helper%.lua$") or "."
  if root:sub(1, 1) ~= "/" then root = assert(io.popen("pwd")):read("*l") .. "/" .. root end
  root = root:gsub("/%./?$", ""):gsub("/%.$", "")
end
dofile(root .. "/runtime/devpath.lua").install(root)
package.path = root .. "/spec/?.lua;" .. package.path
_G.MOONPOST_ROOT = root

-- Keep the process log out of the test output; specs can read it from
-- _G.MOONPOST_LOG (MOONPOST_SPEC_LOG=1 prints it as well).
local log = require "moonpost.runtime.log"
local lines = {}
_G.MOONPOST_LOG = lines
local echo = os.getenv("MOONPOST_SPEC_LOG")
log.set_sink(function(line)
  lines[#lines + 1] = line
  if #lines > 10000 then table.remove(lines, 1) end
  if echo then io.stderr:write(line) end
end)

-- Each test reads the log of its own run: it is emptied when a test starts
-- (a spec that looked for "no DSN was logged" saw every earlier spec's).
local ok_busted, busted = pcall(require, "busted")
if ok_busted and busted.subscribe then
  busted.subscribe({ "test", "start" }, function()
    for i = #lines, 1, -1 do lines[i] = nil end
    return nil, true
  end)
  -- A failing test shows the end of its log (CI keeps only the output).
  busted.subscribe({ "test", "end" }, function(_, _, status)
    if status == "failure" or status == "error" then
      for i = math.max(1, #lines - 40), #lines do
        io.stderr:write("# log: ", (lines[i]:gsub("\n$", "")), "\n")
      end
    end
    return nil, true
  end)
end
