-- The shaping file of examples/pmta-style.lua: what PowerMTA keeps in
-- <domain> blocks and <smtp-pattern-list> backoff rules, as one Lua table
-- (docs/shape.md has every field). PowerMTA directive -> field:
--
--   max-smtp-out              max_connections
--   max-msg-per-connection    max_messages_per_connection
--   max-msg-rate 100/h        rate = "100/h"   (several: rate = { "100/s", "50000/d" })
--   mx-rollup                 mx = { "<MX host suffix>" }
--   <smtp-pattern-list> ... mode=backoff      rules = { { match = ..., action = "slow", rate = ..., duration = ... } }
--   <smtp-pattern-list> ... (suspend)          action = "suspend"
return {
  defaults = true, -- gmail, microsoft, yahoo, apple: connection caps and their deferral texts

  -- <domain *>
  default = { max_connections = 20, max_messages_per_connection = 100 },

  destinations = {
    -- <domain comcast.net> max-smtp-out 5 max-msg-rate 2000/h
    comcast = { domains = { "comcast.net" }, mx = { "comcast.net" }, max_connections = 5, rate = "2000/h",
      rules = { { match = "RL0000%d", action = "slow", rate = "500/h", duration = "1h" } } },
    -- <domain gmx.net> (mx-rollup over the United Internet MX hosts)
    united_internet = { domains = { "gmx.net", "gmx.de", "web.de" }, mx = { "gmx.net", "web.de" },
      max_connections = 10, rate = { "50/s", "500000/d" } },
  },

  -- backoff patterns that apply everywhere
  rules = {
    { contains = "spamhaus", action = "suspend", duration = "1h" },
    { match = "4%.7%.1 .*[Rr]ate limit", action = "slow", rate = "1/s", duration = "30m" },
  },
}
