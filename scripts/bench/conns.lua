-- Policy of scripts/bench/conns.sh: a listener that holds many idle sessions
-- (nothing is delivered; mail is not the point).
local moonpost = require "moonpost"
local env = moonpost.env
local mta = moonpost.new { spool = false }
mta:use(require("moonpost.accept").smtp {
  listen = env.listen, max_connections = 1000000, log_messages = false, backlog = 4096,
})
mta:run()
