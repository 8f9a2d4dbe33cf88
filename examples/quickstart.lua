-- Quickstart: an SMTP server that stores every message it receives in a
-- Maildir per recipient, <MOONPOST_MAILDIR>/<local-part>/new/.
--
--   make run                       (or: scripts/moonpost run examples/quickstart.lua)
--   swaks --server 127.0.0.1:2525 --to someone@example.com
--   ls var/mail/someone/new/
--
-- Environment: MOONPOST_LISTEN (default 127.0.0.1:2525), MOONPOST_MAILDIR
-- (default ./var/mail). It accepts mail for any recipient, so keep it on
-- loopback or a private network.
local moonpost = require "moonpost"
local env = moonpost.env

local mta = moonpost.new {}

mta:use(require("moonpost.accept").smtp { listen = env.listen })
mta:use(require("moonpost.maildir").deliver { root = env.maildir })

mta:run()
