-- Quickstart: an SMTP server that spools every message it receives (250 only
-- once it is on disk) and delivers it from the spool into a Maildir per
-- recipient, <MOONPOST_MAILDIR>/<local-part>/new/.
--
--   make run                       (or: scripts/moonpost run examples/quickstart.lua)
--   swaks --server 127.0.0.1:2525 --to someone@example.com
--   ls var/mail/someone/new/
--
-- Environment: MOONPOST_LISTEN (default 127.0.0.1:2525), MOONPOST_SPOOL
-- (default ./var/spool), MOONPOST_MAILDIR (default ./var/mail),
-- MOONPOST_TLS_CERT and MOONPOST_TLS_KEY (PEM files: STARTTLS is offered;
-- SIGHUP reads them again). It accepts mail for any recipient from clients
-- on loopback (the default relay rule of accept.smtp); to take mail from
-- other hosts, list their networks: relay = { networks = { "10.0.0.0/8" } }
-- (docs/accept.md#relay-control).
local moonpost = require "moonpost"
local env = moonpost.env

local mta = moonpost.new { spool = env.spool, http = env.http, api_token = env.api_token }

mta:use(require("moonpost.accept").smtp {
  listen = env.listen,
  tls = (env.tls_cert or env.tls_key) and { cert = env.tls_cert, key = env.tls_key } or nil,
})
mta:use(require("moonpost.maildir").deliver { root = env.maildir })

mta:run()
