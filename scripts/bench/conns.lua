-- Policy of scripts/bench/conns.sh: a listener that holds many idle sessions
-- (nothing is delivered; mail is not the point). CONNS_WORKERS (default 1)
-- worker processes share the port (docs/cli.md#workers): one process is held
-- under the machine's descriptor limit, so many sessions need many workers.
local moonpost = require "moonpost"
local env = moonpost.env
local workers = tonumber(os.getenv("CONNS_WORKERS") or "") or 1
local mta = moonpost.new { spool = false, workers = workers }
mta:use(require("moonpost.accept").smtp {
  listen = env.listen, max_connections = 1000000, log_messages = false, backlog = 4096,
})
-- the Lua heap once a second, so conns.sh can say how much of a session is
-- Lua; with workers, each worker's own line (its index and pid)
local index = require("moonpost.runtime.workers").index
moonpost.spawn(function()
  while true do
    moonpost.sleep(1)
    io.stderr:write(string.format("lua heap %d KiB, %d sessions, worker %s pid %d\n",
      collectgarbage("count"), mta:sessions(), index or "-", require("luv").os_getpid()))
  end
end)
mta:run()
