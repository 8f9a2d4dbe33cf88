-- The shipped destination entries of moonpost.shape (`defaults = true`):
-- the big mailbox providers, found by their MX hosts, with conservative
-- connection limits and the backoff rules their published deferral texts
-- call for. A policy's own `destinations` entry of the same name replaces
-- one of these entirely. See docs/shape.md.
return {
  gmail = {
    domains = { "gmail.com", "googlemail.com" },
    mx = { "google.com", "googlemail.com" },
    max_connections = 20,
    max_messages_per_connection = 100,
    rules = {
      -- "421-4.7.0 ... Our system has detected an unusual rate of unsolicited mail ..."
      { contains = "unusual rate of unsolicited mail", action = "suspend", duration = "30m" },
      -- "421-4.7.28 ... Gmail has detected an unusual rate of mail originating from your ..."
      { match = "4%.7%.28", action = "slow", rate = "1/s", duration = "1h" },
      -- "421-4.7.0 ... very low reputation of the sending IP address/domain"
      { contains = "very low reputation", action = "suspend", duration = "1h" },
    },
  },
  microsoft = {
    domains = { "outlook.com", "hotmail.com", "live.com", "msn.com" },
    mx = { "protection.outlook.com" },
    max_connections = 10,
    max_messages_per_connection = 50,
    rules = {
      -- "451 4.7.650 The mail server [x] has been temporarily rate limited due to IP reputation."
      { match = "4%.7%.650", action = "suspend", duration = "30m" },
      -- "421 RP-001 ... We have limits for how many messages can be sent per hour and per day."
      { match = "RP%-00%d", action = "slow", rate = "60/m", duration = "1h" },
      -- "451 4.7.500 Server busy. Please try again later from [x]. (S77714)"
      { match = "4%.7%.500 Server busy", action = "suspend", duration = "5m" },
      -- "550 5.7.1 Unfortunately, messages from [x] weren't sent. ... (S3140)": a block list entry
      { match = "%(S3%d%d%d%)", action = "suspend", duration = "1h" },
    },
  },
  yahoo = {
    domains = { "yahoo.com", "ymail.com", "rocketmail.com", "aol.com" },
    mx = { "yahoodns.net" },
    max_connections = 10,
    max_messages_per_connection = 20,
    rules = {
      -- "421 4.7.0 [TSS04] Messages from x temporarily deferred due to unexpected volume or user complaints"
      { match = "%[TSS?0[1-4]%]", action = "suspend", duration = "1h" },
      -- "553 5.7.2 [TSS09] All messages from x will be permanently deferred"
      { match = "%[TSS09%]", action = "suspend", duration = "4h" },
      -- "421 4.7.0 [GL01] Message from x temporarily deferred"
      { match = "%[GL01%]", action = "slow", rate = "30/m", duration = "30m" },
    },
  },
  apple = {
    domains = { "icloud.com", "me.com", "mac.com" },
    mx = { "mail.icloud.com" },
    max_connections = 10,
    max_messages_per_connection = 50,
    rules = {
      -- "550 5.7.1 [CS01] Message rejected due to local policy"
      { match = "%[CS01%]", action = "suspend", duration = "30m" },
      -- "421 4.7.0 [HM08] Too many connections"
      { match = "%[HM0[78]%]", action = "slow", rate = "30/m", duration = "30m" },
    },
  },
}
