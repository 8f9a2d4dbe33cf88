-- Policy of scripts/bench/conns.sh: a listener that holds many idle sessions
-- (nothing is delivered; mail is not the point).
local moonpost = require "moonpost"
local env = moonpost.env
local mta = moonpost.new { spool = false }
mta:use(require("moonpost.accept").smtp {
  listen = env.listen, max_connections = 1000000, log_messages = false, backlog = 4096,
})
-- the Lua heap once a second, so conns.sh can say how much of a session is Lua
moonpost.spawn(function()
  while true do
    moonpost.sleep(1)
    io.stderr:write(string.format("lua heap %d KiB, %d sessions\n", collectgarbage("count"), mta:sessions()))
  end
end)
mta:run()
