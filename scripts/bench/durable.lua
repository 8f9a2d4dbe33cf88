-- Benchmark policy: durable accept. Every message is written to the spool
-- and fdatasynced (group commit) before its 250; nothing delivers it.
-- MOONPOST_LISTEN and MOONPOST_SPOOL set the address and the spool.
local moonpost = require "moonpost"
local env = moonpost.env
local mta = moonpost.new { spool = { dir = env.spool, min_free = 0 } }
mta:use(require("moonpost.accept").smtp { listen = env.listen, log_messages = false })
mta:run()
