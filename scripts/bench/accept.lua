-- Benchmark policy: accept every message and discard it (accept-only rate).
-- MOONPOST_LISTEN sets the address.
local moonpost = require "moonpost"
local mta = moonpost.new {}
mta:use(require("moonpost.accept").smtp { listen = moonpost.env.listen, log_messages = false })
mta:on("smtp_server_message_received", function() end)
mta:run()
