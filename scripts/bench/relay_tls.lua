-- Benchmark policy: examples/relay.lua with an outbound TLS policy from
-- BENCH_TLS ("none", "required", ...), relaying to MOONPOST_RELAY.
local moonpost = require "moonpost"
local env = moonpost.env
local mta = moonpost.new { spool = env.spool }
mta:use(require("moonpost.accept").smtp { listen = env.listen, log_messages = false })
mta:use(require("moonpost.route").smtp { relay = env.relay, tls = env.get("BENCH_TLS", "none") })
mta:run()
