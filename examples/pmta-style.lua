-- PowerMTA-style delivery: virtual MTAs (a source address and HELO name
-- each) grouped in pools, chosen per message by the X-Virtual-MTA header,
-- per-domain connection and rate limits and backoff rules from a shaping
-- file. docs/route.md (pools) and docs/shape.md explain each part.
--
--   MOONPOST_VMTAS="vmta1=192.0.2.10/mta1.example.net,vmta2=192.0.2.11/mta2.example.net" \
--     scripts/moonpost run examples/pmta-style.lua
--
-- Environment: MOONPOST_LISTEN, MOONPOST_SPOOL, MOONPOST_RELAY (unset: MX),
-- MOONPOST_DNS, MOONPOST_TLS_CERT/KEY, MOONPOST_DKIM_DIR as in the other
-- examples; MOONPOST_VMTAS (name=address/helo, comma-separated; default two
-- virtual MTAs on 127.0.0.2 and 127.0.0.3); MOONPOST_SHAPING (a shaping
-- file; default examples/shaping/pmta.lua). It relays for
-- the networks in MOONPOST_RELAY_NETWORKS only (default loopback).
local moonpost = require "moonpost"
local env = moonpost.env

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"

-- <virtual-mta vmta1> smtp-source-host 192.0.2.10 mta1.example.net
local vmtas = {}
for name, addr, helo in env.get("MOONPOST_VMTAS",
    "vmta1=127.0.0.2/vmta1.example.net,vmta2=127.0.0.3/vmta2.example.net"):gmatch("([%w_%-]+)=([^/,]+)/([^,]+)") do
  vmtas[#vmtas + 1] = { name = name, source = addr, helo = helo }
end

local mta = moonpost.new { spool = env.spool, dns = env.dns, http = env.http, api_token = env.api_token,
  queue = { retry = { "5m", "10m", "20m", "40m", "1h" }, max_age = "5d" } }

mta:use(require("moonpost.accept").smtp {
  listen = env.listen,
  log_messages = false,
  tls = (env.tls_cert or env.tls_key) and { cert = env.tls_cert, key = env.tls_key } or nil,
})
if env.dkim_dir then
  mta:use(require("moonpost.dkim").sign { keys = env.dkim_dir })
end

-- <virtual-mta-pool pool1> virtual-mta vmta1 virtual-mta vmta2
mta:use(require("moonpost.route").smtp {
  relay = env.relay,
  pools = { pool1 = vmtas },
  default_pool = "pool1",
  pool_header = "X-Virtual-MTA", -- a pool or a single virtual MTA, by name
})

mta:use(require("moonpost.shape").load(env.get("MOONPOST_SHAPING", here .. "shaping/pmta.lua")))

mta:run()
