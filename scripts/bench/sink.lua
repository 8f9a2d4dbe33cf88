-- Benchmark policy: a Moonpost that takes every message and discards it,
-- offering STARTTLS when MOONPOST_TLS_CERT and MOONPOST_TLS_KEY are set.
-- It prints "mesg=<count>" on stdout (like smtp-sink -c) at most every
-- 20 ms while messages arrive, so relay.py can tell when all have come.
local moonpost = require "moonpost"
local uv = require "luv"
local env = moonpost.env
local mta = moonpost.new {}
mta:use(require("moonpost.accept").smtp {
  listen = env.listen, log_messages = false,
  tls = env.tls_cert and { cert = env.tls_cert, key = env.tls_key } or nil,
})
local count, shown = 0, 0
mta:on("smtp_server_message_received", function() count = count + 1 end)
local timer = uv.new_timer()
timer:start(20, 20, function()
  if count ~= shown then
    shown = count
    io.stdout:write("mesg=", count, "\n")
    io.stdout:flush()
  end
end)
timer:unref()
mta:run()
