-- Relay: accept mail, spool it, and deliver it over SMTP.
--
--   MOONPOST_RELAY=127.0.0.1:2526 scripts/moonpost run examples/relay.lua
--
-- Environment: MOONPOST_LISTEN (default 127.0.0.1:2525), MOONPOST_SPOOL
-- (default ./var/spool), MOONPOST_RELAY (host:port: every message goes
-- there; unset: each recipient domain's MX), MOONPOST_DNS, MOONPOST_TLS_CERT
-- and MOONPOST_TLS_KEY (STARTTLS offered to clients), MOONPOST_DKIM_DIR
-- (keys as <dir>/<domain>/<selector>.pem: mail whose From domain has a key
-- is signed; scripts/dkim-keygen makes them). Outbound, STARTTLS is used
-- whenever the next hop offers it. Clients on loopback may relay (the
-- default relay rule of accept.smtp); list other networks in
-- relay = { networks = { ... } }, or use AUTH (docs/accept.md#relay-control).
local moonpost = require "moonpost"
local env = moonpost.env

local mta = moonpost.new { spool = env.spool, dns = env.dns, http = env.http, api_token = env.api_token }

mta:use(require("moonpost.accept").smtp {
  listen = env.listen,
  log_messages = false,
  tls = (env.tls_cert or env.tls_key) and { cert = env.tls_cert, key = env.tls_key } or nil,
})
if env.dkim_dir then
  mta:use(require("moonpost.dkim").sign { keys = env.dkim_dir })
end
mta:use(require("moonpost.route").smtp { relay = env.relay })

mta:run()
