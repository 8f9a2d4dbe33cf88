-- The customers of examples/esp.lua: one entry per tenant. An ESP keeps
-- this file in its provisioning system and reloads it; the example reads it
-- at start (MOONPOST_TENANTS names another file).
return {
  -- the ESP itself: its DKIM signature goes on mail whose From domain has
  -- no key of its own tenant (set selector once dkim/<domain>/<selector>.pem exists)
  esp = { domain = "esp.example", selector = nil },

  tenants = {
    acme = {
      domains = { "acme.example" },                 -- its DKIM keys sign only its mail
      sources = {                                   -- its egress pool: address and HELO
        { source = "127.0.0.2", helo = "o1.mail.acme.example" },
      },
      max_queued = 100000,                          -- queue quota: 452 4.3.1 beyond it
      max_connections = 50,                         -- inbound SMTP sessions at once
      max_messages = "500/s",                       -- inbound message rate
      send_rate = "100/s",                          -- outbound, over all destinations
    },
    globex = {
      domains = { "globex.example" },
      sources = {
        { source = "127.0.0.3", helo = "o1.mail.globex.example", weight = 2 },
        { source = "127.0.0.4", helo = "o2.mail.globex.example", weight = 1 },
      },
      max_queued = 500000,
      max_connections = 100,
      max_messages = "2000/s",
    },
  },
}
