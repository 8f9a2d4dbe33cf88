-- Relay: accept mail, spool it, and deliver it over SMTP.
--
--   MOONPOST_RELAY=127.0.0.1:2526 scripts/moonpost run examples/relay.lua
--
-- Environment: MOONPOST_LISTEN (default 127.0.0.1:2525), MOONPOST_SPOOL
-- (default ./var/spool), MOONPOST_RELAY (host:port: every message goes
-- there; unset: each recipient domain's MX). It relays for anyone who can
-- reach the listener: keep that on loopback or a private network.
local moonpost = require "moonpost"
local env = moonpost.env

local mta = moonpost.new { spool = env.spool, dns = env.dns }

mta:use(require("moonpost.accept").smtp { listen = env.listen, log_messages = false })
mta:use(require("moonpost.route").smtp { relay = env.relay })

mta:run()
