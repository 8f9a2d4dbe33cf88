-- moonpost.bounce.rules: the pattern rules Moonpost ships for classifying
-- the replies of remote mail servers (docs/bounce.md).
--
-- A rule is { pattern, class [, permanent = true|false] }. The pattern is a
-- Lua pattern, matched against the lowercased subject
--
--   "<code> <enhanced> <text>"   e.g. "550 5.1.1 the email account that you tried to reach does not exist. ..."
--
-- (parts that the result lacks are left out; line breaks and runs of blanks
-- are one space). Rules are tried in order and the first that matches wins,
-- so the specific ones come first: a blocklist named in a reply says more
-- than the words around it. `permanent` overrides what the reply code says
-- (5xx hard, 4xx soft).
--
-- Each group names where its texts come from: the providers' published lists
-- of their SMTP errors (Google's "Gmail SMTP errors and codes", Microsoft's
-- Exchange Online NDR pages, Yahoo's "SMTP error codes", Apple's and Comcast's
-- postmaster pages, GMX/Web.de's "error messages", Mimecast's "SMTP error
-- codes") and the default texts of Postfix, Exim, Sendmail, qmail and
-- amavisd. A phrase that only one product uses is kept with that product's
-- group; the generic phrases come last in each class.
return {
  -- ---- Moonpost's own texts, and expiry reported by other MTAs ----------------------
  { "message expired", "message-expired" },              -- Exchange 4.4.7 QUEUE.Expired, 5.4.316
  { "queue%.expired", "message-expired" },
  { "delivery time expired", "message-expired" },

  -- ---- blocklists and reputation blocks (before any other word of the reply) ----------
  { "spamhaus", "spam-related" },                         -- zen/sbl/xbl/pbl/dbl.spamhaus.org
  { "spamcop", "spam-related" },                          -- bl.spamcop.net
  { "barracuda", "spam-related" },                        -- Barracuda Reputation (b.barracudacentral.org)
  -- Proofpoint: "Blocked - see https://ipcheck.proofpoint.com/?ip=..."
  { "ipcheck%.proofpoint", "spam-related" },
  { "cloudmark", "spam-related" },                        -- Cloudmark CSI (Comcast BL000010)
  { "senderscore", "spam-related" },
  -- Postfix reject_rbl_client: "Client host [x] blocked using <zone>"
  { "blocked using", "spam-related" },
  { "listed at", "spam-related" },                        -- Sendmail dnsbl: "Rejected: x listed at <zone>"
  { "dnsbls?%f[%A]", "spam-related" },                    -- Comcast: "found on one or more DNSBLs"
  { "%f[%a]rbls?%f[%A]", "spam-related" },                -- "RBL Rejection", "found on one or more RBLs"
  -- Outlook.com S3150 "on our block list"; GMX "IP address is block listed"
  { "block ?list", "spam-related" },
  { "black ?list", "spam-related" },                      -- Exim: "is in a black list at <zone>"
  { "banned sending ip", "spam-related" },                -- Exchange Online 5.7.606
  { "traffic not accepted from this ip", "spam-related" },-- Exchange Online 5.7.708
  { "%[tss0%d%]", "spam-related" },                       -- Yahoo TSS04/TSS05/TSS09 deferrals and blocks
  { "permanently deferred", "spam-related" },             -- Yahoo: "All messages from x will be permanently deferred"
  { "temporarily deferred %- 4%.16%.5", "spam-related" },  -- Yahoo: "temporarily deferred - 4.16.50"
  { "excessive unknown recipients", "spam-related" },     -- Yahoo VS1-IP / VS1-MF
  -- Barracuda ESS: "permanent failure for one or more recipients (x:blocked)"
  { "%(%S+:blocked%)", "spam-related" },

  -- ---- viruses and malware ------------------------------------------------------------
  { "virus", "virus-related" },                           -- Exim malware ACL: "This message contains a virus (...)"
  { "malware", "virus-related" },
  { "infected", "virus-related" },                        -- amavisd-new: "Reject, id=... - INFECTED: <name>"
  { "trojan", "virus-related" },

  -- ---- spam verdicts, complaints, reputation -----------------------------------------
  -- Gmail 5.7.1 "likely unsolicited mail", 4.7.0/4.7.28 "unusual rate of unsolicited mail"
  { "unsolicited", "spam-related" },
  { "low reputation", "spam-related" },                   -- Gmail 4.7.0 "very low reputation of the sending domain"
  { "poor reputation", "spam-related" },
  { "bad reputation", "spam-related" },
  { "user complaints", "spam-related" },                  -- Yahoo TSS04
  -- "classified as spam", "spam content", "to protect our users from spam"
  { "spam", "spam-related" },

  -- ---- sender authentication, reverse DNS, TLS -----------------------------------------
  { "dmarc", "policy-related" },                          -- Gmail 5.7.26, Exchange 5.7.509, Yahoo, iCloud
  { "%f[%a]spf%f[%A]", "policy-related" },                -- GMX "Reject due to SPF policy", Gmail 5.7.27
  { "%f[%a]dkim%f[%A]", "policy-related" },
  { "unauthenticated", "policy-related" },                -- Gmail 5.7.26 "the sender is unauthenticated"
  { "spoof", "policy-related" },                          -- Mimecast "Anti-Spoofing policy"
  { "ptr record", "policy-related" },                     -- Gmail 5.7.25
  { "reverse dns", "policy-related" },                    -- Comcast 421 "Reverse DNS failure"
  { "%f[%a]rdns%f[%A]", "policy-related" },
  { "cannot find your %a* ?hostname", "policy-related" }, -- Postfix reject_unknown_client_hostname
  { "dynamic/residential", "policy-related" },            -- Comcast ES000001/ES000010
  { "tls required", "policy-related" },                   -- Gmail 4.7.0 "TLS required for RCPT domain"
  { "must issue a starttls", "policy-related" },

  -- ---- rate and connection limits, greylisting -----------------------------------------
  { "greylist", "policy-related" },                       -- postgrey: "Recipient address rejected: Greylisted"
  { "graylist", "policy-related" },
  { "internal resource temporarily unavailable", "policy-related" }, -- Mimecast 451 (greylisting, reputation check)
  { "too quickly", "policy-related" },                    -- Gmail 4.2.1 "receiving mail too quickly"
  { "at a rate that prevents", "policy-related" },        -- Gmail 4.2.1
  -- Gmail 4.2.1 "Peak SMTP relay limit exceeded", "rate limited"
  { "rate limit", "policy-related" },
  { "relay limit", "policy-related" },
  { "excessive volume", "policy-related" },               -- iCloud 4.7.1 "deferred due to excessive volume"
  { "too many connections", "policy-related" },
  { "too many sessions", "policy-related" },              -- Comcast 421 "Too many sessions opened"
  { "too many concurrent", "policy-related" },
  -- a throttle on the sending IP for its bad addresses, not about this one:
  -- "550 5.7.1 Too many invalid recipients from your IP"
  { "too many invalid recipients", "policy-related" },
  { "too many unknown recipients", "policy-related" },
  -- the sending account at a relay or ESP (Amazon SES "Sending suspended
  -- for this account"), not the recipient's mailbox
  { "sending suspended", "policy-related" },
  { "sending has been suspended", "policy-related" },
  { "sending paused", "policy-related" },
  { "per connection", "policy-related" },                 -- Yahoo 421 "Max message per connection reached"

  -- ---- relaying -------------------------------------------------------------------------
  -- Postfix; Exchange 5.7.64 "TenantAttribution; Relay Access Denied"
  { "relay access denied", "relaying-issues" },
  { "relaying denied", "relaying-issues" },               -- Sendmail
  { "relay not permitted", "relaying-issues" },           -- Exim; iCloud Hide My Email
  { "relaying not permitted", "relaying-issues" },
  { "relay denied", "relaying-issues" },                  -- Gmail 5.7.0 "Mail relay denied"
  { "unable to relay", "relaying-issues" },               -- Exchange Server 5.7.1
  { "not permitted to relay", "relaying-issues" },
  { "relaying not allowed", "relaying-issues" },
  { "allowed rcpthosts", "relaying-issues" },             -- qmail: "that domain isn't in my list of allowed rcpthosts"

  -- ---- mailboxes that are full, or full and abandoned -----------------------------------
  -- Gmail 5.2.2 "out of storage space and inactive"
  { "storage space and inactive", "inactive-mailbox", permanent = true },
  { "over quota and inactive", "inactive-mailbox", permanent = true },
  { "over quota", "quota-issues", permanent = false },    -- Gmail 4.2.2, Yahoo "This account is over quota"
  { "quota exceeded", "quota-issues", permanent = false },-- Dovecot "Quota exceeded (mailbox for user is full)"
  { "quotaexceeded", "quota-issues", permanent = false }, -- Exchange STOREDRV QuotaExceededException
  { "exceeded %a* ?quota", "quota-issues", permanent = false },
  { "mailbox full", "quota-issues", permanent = false },
  { "mailbox is full", "quota-issues", permanent = false },
  { "mailbox for user is full", "quota-issues", permanent = false },
  { "out of storage", "quota-issues", permanent = false },-- Gmail 4.2.2/5.2.2 "inbox is out of storage space"
  { "insufficient system storage", "quota-issues", permanent = false }, -- Postfix 452 4.3.1
  { "insufficient disk space", "quota-issues", permanent = false },     -- Sendmail 452 4.4.5
  { "no space left on device", "quota-issues", permanent = false },     -- maildir ENOSPC
  { "enospc", "quota-issues", permanent = false },

  -- ---- mailboxes that are disabled, suspended, gone -------------------------------------
  -- Gmail 5.2.1 "tried to reach is disabled", Yahoo "This mailbox is disabled"
  { "is disabled", "inactive-mailbox" },
  { "been disabled", "inactive-mailbox" },
  { "suspended", "inactive-mailbox" },
  { "deactivated", "inactive-mailbox" },
  { "inactive", "inactive-mailbox" },
  { "account expired", "inactive-mailbox" },
  { "account has expired", "inactive-mailbox" },
  { "no longer active", "inactive-mailbox" },
  { "no longer in use", "inactive-mailbox" },

  -- ---- invalid senders (before recipients: their texts share words) ----------------------
  -- Exim callout: "Verification failed for <x> ... Sender verify failed"
  { "sender verify failed", "invalid-sender" },
  { "domain of sender address", "invalid-sender" },       -- Sendmail 553 5.1.8
  { "sender address rejected: domain not found", "invalid-sender" }, -- Postfix reject_unknown_sender_domain
  { "sender address rejected: user unknown", "invalid-sender" },
  { "sender address rejected: need fully%-qualified", "invalid-sender" },
  { "sender address has null mx", "invalid-sender" },
  { "invalid sender", "invalid-sender" },

  -- ---- invalid recipients ---------------------------------------------------------------
  { "recipient address rejected: access denied%. as%(", "invalid-recipient" }, -- Exchange Online 5.4.1 (edge blocking)
  { "recipientnotfound", "invalid-recipient" },           -- Exchange 5.1.10 RESOLVER.ADR.RecipientNotFound
  { "recipient not found", "invalid-recipient" },
  -- Postfix "User unknown in local recipient table", Sendmail "... User unknown"
  { "user unknown", "invalid-recipient" },
  { "unknown user", "invalid-recipient" },
  { "unknown recipient", "invalid-recipient" },
  { "recipient unknown", "invalid-recipient" },
  { "no such user", "invalid-recipient" },                -- Exim/cPanel "No Such User Here"
  { "no such recipient", "invalid-recipient" },
  { "no such mailbox", "invalid-recipient" },
  { "user not found", "invalid-recipient" },
  { "invalid recipient", "invalid-recipient" },           -- Mimecast 550 "Invalid Recipient"
  { "invalid mailbox", "invalid-recipient" },
  -- Yahoo 552 "Requested mail action aborted, mailbox not found"
  { "mailbox not found", "invalid-recipient" },
  { "mailbox unavailable", "invalid-recipient" },         -- Outlook.com 5.5.0, GMX/Web.de 550
  { "mailbox does not exist", "invalid-recipient" },
  { "user does not exist", "invalid-recipient" },         -- iCloud 5.1.1
  { "address does not exist", "invalid-recipient" },
  { "recipient does not exist", "invalid-recipient" },
  { "account that you tried to reach does not exist", "invalid-recipient" }, -- Gmail 5.1.1
  { "doesn't have an? %S+ account", "invalid-recipient" },-- Yahoo "This user doesn't have a yahoo.com account"
  { "not our customer", "invalid-recipient" },            -- Comcast 5.1.1
  { "undeliverable address", "invalid-recipient" },

  -- ---- domains ---------------------------------------------------------------------------
  { "find the recipient domain", "bad-domain" },          -- Gmail 5.1.2 "We weren't able to find the recipient domain"
  { "domain not found", "bad-domain" },
  { "no such domain", "bad-domain" },
  { "domain does not exist", "bad-domain" },
  { "host or domain name not found", "bad-domain" },      -- Postfix
  { "null mx", "bad-domain" },                            -- RFC 7505 (Moonpost's own 5.1.10)
  { "does not accept mail", "bad-domain" },               -- RFC 7504 521/556

  -- ---- routing and loops -------------------------------------------------------------------
  { "unrouteable address", "routing-errors" },            -- Exim
  { "mail loop", "routing-errors" },                      -- Exchange 5.4.14 "possible mail loop"
  { "forwarding loop", "routing-errors" },                -- Postfix "mail forwarding loop for x"
  { "hop count exceeded", "routing-errors" },
  { "too many hops", "routing-errors" },
  { "loop detected", "routing-errors" },

  -- ---- the message itself --------------------------------------------------------------------
  { "size limit", "content-related" },                    -- Gmail 5.2.3 "exceeded Google's message size limits"
  { "message size exceeds", "content-related" },          -- Postfix 552 5.3.4
  { "message is too large", "content-related" },
  { "message too large", "content-related" },
  { "message%-?id header", "content-related" },           -- Gmail 5.7.1 "Messages missing a valid messageId header"
  { "potential security issue", "content-related" },      -- Gmail 5.7.0 blocked attachment types
  { "attachment", "content-related" },
  { "malformed", "content-related" },                     -- Gmail 5.6.0 "Mail message is malformed"

  -- ---- protocol ----------------------------------------------------------------------------
  { "too many recipients", "protocol-errors" },           -- Exim 452, Gmail 4.5.3
  { "protocol violation", "protocol-errors" },            -- Gmail 4.5.0/5.5.0
  { "syntax error", "protocol-errors" },
  { "command unrecognized", "protocol-errors" },
  { "command not recognized", "protocol-errors" },
  { "bad sequence of commands", "protocol-errors" },
  { "protocol error", "protocol-errors" },                -- Moonpost: a reply it could not read
  { "helo command rejected", "bad-configuration" },       -- Postfix reject_invalid/non_fqdn_helo_hostname
  { "invalid helo", "bad-configuration" },

  -- ---- connections (Moonpost's own failures and other MTAs' reports) ----------------------------
  { "cannot connect to", "no-answer-from-host" },         -- Moonpost: every host of the route failed to connect
  { "connection refused", "no-answer-from-host" },
  { "no route to host", "no-answer-from-host" },
  { "network is unreachable", "no-answer-from-host" },
  { "timeout waiting for a reply", "bad-connection" },    -- Moonpost: connected, then no reply in time
  { "timed out", "bad-connection" },
  { "connection lost", "bad-connection" },                -- Moonpost: "connection lost: ECONNRESET"
  { "lost connection", "bad-connection" },                -- Postfix "lost connection with x while ..."
  { "connection reset", "bad-connection" },
  { "tls handshake", "bad-connection" },                  -- Moonpost: "TLS handshake with x failed: ..."

  -- ---- generic refusals by policy (last: many replies say "denied" about something specific) ----
  { "sender address blocked", "policy-related" },         -- Mimecast 421 (a Blocked Senders policy)
  { "administrative prohibition", "policy-related" },     -- Exim, Mimecast "envelope blocked"
  -- "local policy", "policy reasons", "policy restrictions", "security policies"
  { "polic[yi]", "policy-related" },
  { "will not accept delivery", "policy-related" },       -- AOL 521 5.2.1
  { "not authorized", "policy-related" },
  { "access denied", "policy-related" },
}
