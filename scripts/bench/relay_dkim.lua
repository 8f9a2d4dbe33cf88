-- Benchmark policy: examples/relay.lua with DKIM signing. Every message is
-- signed with the key BENCH_DKIM_DIR/bench.test/<BENCH_DKIM_SELECTOR>.pem
-- (the fallback: smtp-source's From domain has no key of its own).
local moonpost = require "moonpost"
local env = moonpost.env
local mta = moonpost.new { spool = env.spool }
mta:use(require("moonpost.accept").smtp { listen = env.listen, log_messages = false })
mta:use(require("moonpost.dkim").sign {
  keys = env.get("BENCH_DKIM_DIR"),
  fallback = { domain = "bench.test", selector = env.get("BENCH_DKIM_SELECTOR") },
})
mta:use(require("moonpost.route").smtp { relay = env.relay, tls = "none" })
mta:run()
