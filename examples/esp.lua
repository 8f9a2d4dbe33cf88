-- A multi-tenant sending service (ESP): customers submit over SMTP AUTH,
-- each is a tenant with its own credentials, DKIM keys, egress addresses,
-- queue quota, rate limits and suppression list; the ESP signs what its
-- customers cannot, and the big mailbox providers get their own limits.
--
--   MOONPOST_TLS_CERT=cert.pem MOONPOST_TLS_KEY=key.pem MOONPOST_DKIM_DIR=dkim \
--     scripts/moonpost run examples/esp.lua
--   swaks --server 127.0.0.1:2525 --tls --auth LOGIN --auth-user acme-app --auth-password ... \
--     --from news@acme.example --to someone@example.org
--
-- Environment: MOONPOST_LISTEN, MOONPOST_SPOOL, MOONPOST_RELAY (unset: MX),
-- MOONPOST_DNS, MOONPOST_TLS_CERT/KEY (AUTH is only offered over TLS),
-- MOONPOST_DKIM_DIR (<dir>/<domain>/<selector>.pem), as in the other
-- examples; MOONPOST_TENANTS (default examples/esp/tenants.lua),
-- MOONPOST_USERS (user:hash:tenant lines made with `moonpost passwd`;
-- default examples/esp/users.txt) and MOONPOST_SUPPRESS (the suppression
-- store; default ./var/suppress). Only authenticated users may relay.
local moonpost = require "moonpost"
local env = moonpost.env

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local conf = dofile(env.get("MOONPOST_TENANTS", here .. "esp/tenants.lua"))

-- moonpost.new: the tenants and their inbound budgets
local tenants, pools, dkim_owned, send_limits = {}, {}, {}, {}
for name, t in pairs(conf.tenants) do
  tenants[name] = { max_queued = t.max_queued, max_connections = t.max_connections, max_messages = t.max_messages }
  pools[name] = t.sources
  pools[name].tenants = { name }
  dkim_owned[name] = t.domains
  send_limits[name] = t.send_rate and { rate = t.send_rate } or nil
end

local mta = moonpost.new { spool = env.spool, dns = env.dns, tenants = tenants, http = env.http,
  api_token = env.api_token }

-- accept: submission with AUTH over TLS; the user's tenant is the message's
mta:use(require("moonpost.accept").smtp {
  listen = env.listen,
  tls = (env.tls_cert or env.tls_key) and { cert = env.tls_cert, key = env.tls_key } or nil,
  auth = { file = env.get("MOONPOST_USERS", here .. "esp/users.txt") },
  relay = { authenticated = true, networks = {} },
  log_messages = false,
})

-- suppress: per tenant; hard bounces of unknown users add entries
local suppress = require("moonpost.suppress").setup {
  path = env.get("MOONPOST_SUPPRESS", "./var/suppress"),
  check = "rcpt",
  auto = { classes = { "invalid-recipient", "bad-domain", "inactive-mailbox" } },
}
mta:use(suppress)

-- dkim: each tenant's keys for its own domains; the ESP's for the rest
if env.dkim_dir then
  local esp = conf.esp
  mta:use(require("moonpost.dkim").sign {
    keys = env.dkim_dir,
    tenants = dkim_owned,
    fallback = esp and esp.selector and { domain = esp.domain, selector = esp.selector } or nil,
  })
end

-- route: each tenant leaves from its own pool
mta:use(require("moonpost.route").smtp { relay = env.relay, pools = pools })

-- shape: the providers' limits, and each tenant's sending rate
mta:use(require("moonpost.shape").setup { defaults = true, tenants = send_limits })

-- bounce: the classes (result.class) that suppress and the DSNs use
mta:use(require("moonpost.bounce").setup {})

mta:run()
