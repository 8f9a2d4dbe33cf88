-- Benchmark policy for scripts/bench/workers.sh: BENCH_WORKERS processes
-- (default 1) running one of three loads, by BENCH_MODE:
--   accept   accept every message and discard it (as scripts/bench/accept.lua)
--   durable  spool and fdatasync before the 250, deliver nothing (durable.lua)
--   relay    spool, then relay to MOONPOST_RELAY (as relay_tls.lua, plaintext)
-- MOONPOST_LISTEN, MOONPOST_SPOOL and MOONPOST_RELAY as in the examples.
local moonpost = require "moonpost"
local env = moonpost.env
local mode = env.get("BENCH_MODE", "accept")
local workers = tonumber(env.get("BENCH_WORKERS", "1"))
local mta = moonpost.new {
  workers = workers,
  spool = mode ~= "accept" and { dir = env.spool, min_free = 0 } or nil,
}
mta:use(require("moonpost.accept").smtp { listen = env.listen, log_messages = false })
if mode == "accept" then
  mta:on("smtp_server_message_received", function() end)
elseif mode == "relay" then
  mta:use(require("moonpost.route").smtp { relay = env.relay, tls = "none" })
end
mta:run()
