-- moonpost.bounce: the classification of remote replies (shipped rules,
-- RFC 3463 enhanced codes, reply codes), user rules and their config errors.
local bounce = require "moonpost.bounce"

-- Replies as the SMTP client reports them: code, enhanced code, and the text
-- without its codes (the lines of a multi-line reply joined with "\n"). The
-- texts follow the providers' published lists of their errors and the MTAs'
-- default messages; addresses, IPs and session ids are made up.
-- { source, code, enhanced, text, class, permanent [, stage] }
local REPLIES = {
  -- Google (Gmail / Workspace): "Gmail SMTP errors and codes"
  { "Gmail", 550, "5.1.1", "The email account that you tried to reach does not exist. Please try\ndouble-checking the recipient's email address for typos or\nunnecessary spaces. https://support.google.com/mail/?p=NoSuchUser a1si5 - gsmtp", "invalid-recipient", true, "RCPT TO" },
  { "Gmail", 550, "5.2.1", "The email account that you tried to reach is disabled. https://support.google.com/mail/?p=DisabledUser b2si6 - gsmtp", "inactive-mailbox", true, "RCPT TO" },
  { "Gmail", 452, "4.2.2", "The email account that you tried to reach is over quota. Please direct\nthe recipient to https://support.google.com/mail/?p=OverQuotaTemp c3si7 - gsmtp", "quota-issues", false, "RCPT TO" },
  { "Gmail", 552, "5.2.2", "The recipient's inbox is out of storage space. Please direct the recipient to https://support.google.com/mail/?p=OverQuotaPerm - gsmtp", "quota-issues", false, "RCPT TO" },
  { "Gmail", 552, "5.2.2", "The recipient's inbox is out of storage space and inactive. Please direct the recipient to https://support.google.com/mail/?p=OverQuotaPerm - gsmtp", "inactive-mailbox", true, "RCPT TO" },
  { "Gmail", 550, "5.7.1", "[203.0.113.5] Our system has detected that this message is\nlikely unsolicited mail. To reduce the amount of spam sent to Gmail,\nthis message has been blocked. https://support.google.com/mail/?p=UnsolicitedMessageError - gsmtp", "spam-related", true, "end of data" },
  { "Gmail", 421, "4.7.0", "[203.0.113.5] Our system has detected an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been temporarily blocked. - gsmtp", "spam-related", false, "MAIL FROM" },
  { "Gmail", 421, "4.7.28", "[203.0.113.5] Our system has detected an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been temporarily rate limited. - gsmtp", "spam-related", false, "end of data" },
  { "Gmail", 421, "4.7.0", "[203.0.113.5] Our system has detected that this message is suspicious due to the very low reputation of the sending domain. To best protect our users from spam, the message has been blocked. - gsmtp", "spam-related", false, "end of data" },
  { "Gmail", 550, "5.7.26", "This mail has been blocked because the sender is unauthenticated. Gmail requires all senders to authenticate with either SPF or DKIM. - gsmtp", "policy-related", true, "end of data" },
  { "Gmail", 550, "5.7.26", "Unauthenticated email from example.com is not accepted due to domain's DMARC policy. Please contact the administrator of example.com domain if this was a legitimate mail. - gsmtp", "policy-related", true, "end of data" },
  { "Gmail", 550, "5.7.25", "[2001:db8::5] The IP address sending this message does not have a PTR record setup, or the corresponding forward DNS entry does not point to the sending IP. - gsmtp", "policy-related", true, "end of data" },
  { "Gmail", 421, "4.7.0", "TLS required for RCPT domain, closing connection. - gsmtp", "policy-related", false, "RCPT TO" },
  { "Gmail", 421, "4.7.0", "IP not in whitelist for RCPT domain, closing connection. - gsmtp", "policy-related", false, "RCPT TO" },
  { "Gmail", 450, "4.2.1", "The user you are trying to contact is receiving mail too quickly. Please resend your message at a later time. - gsmtp", "policy-related", false, "RCPT TO" },
  { "Gmail", 450, "4.2.1", "The user you are trying to contact is receiving mail at a rate that prevents additional messages from being delivered. - gsmtp", "policy-related", false, "RCPT TO" },
  { "Gmail", 552, "5.2.3", "Your message exceeded Google's message size limits. https://support.google.com/mail/?p=MaxSizeError - gsmtp", "content-related", true, "end of data" },
  { "Gmail", 550, "5.7.1", "The user or domain that you are sending to (or from) has a policy that prohibited the mail that you sent. - gsmtp", "policy-related", true, "end of data" },
  { "Gmail", 552, "5.7.0", "This message was blocked because its content presents a potential\nsecurity issue. https://support.google.com/mail/?p=BlockedMessage - gsmtp", "content-related", true, "end of data" },
  { "Gmail", 553, "5.1.2", "We weren't able to find the recipient domain. Please check for any\nspelling errors, and make sure you didn't enter any spaces. - gsmtp", "bad-domain", true, "RCPT TO" },
  { "Gmail", 550, "5.7.0", "Mail relay denied [203.0.113.5]. Invalid credentials for relay for one of the domains in: example.com - gsmtp", "relaying-issues", true, "RCPT TO" },
  { "Gmail", 550, "5.7.1", "[203.0.113.5] Messages missing a valid messageId header are not accepted. - gsmtp", "content-related", true, "end of data" },
  { "Gmail", 451, "4.3.0", "Mail server temporarily rejected message. - gsmtp", "other", false, "end of data" },
  { "Gmail", 421, "4.4.5", "Server busy, try again later. - gsmtp", "bad-connection", false, "connect" },
  { "Gmail", 451, "4.4.2", "Timeout - closing connection. - gsmtp", "bad-connection", false, "DATA" },
  { "Gmail", 451, "4.5.0", "SMTP protocol violation, see RFC 2821. - gsmtp", "protocol-errors", false, "DATA" },
  { "Gmail", 452, "4.5.3", "Your message has too many recipients. - gsmtp", "protocol-errors", false, "RCPT TO" },
  { "Gmail", 450, "4.2.1", "Peak SMTP relay limit exceeded for customer. - gsmtp", "policy-related", false, "MAIL FROM" },
  { "Workspace", 550, "5.7.1", "This message violates example.com email policy. - gcdp a1b2 - gsmtp", "policy-related", true, "end of data" },

  -- Microsoft: Outlook.com / Hotmail and Exchange Online NDR pages
  { "Outlook.com", 550, "5.5.0", "Requested action not taken: mailbox unavailable (S2017062302). [AM0EUR02FT011.eop-EUR02.prod.protection.outlook.com]", "invalid-recipient", true, "RCPT TO" },
  { "Outlook.com", 550, "5.7.1", "Unfortunately, messages from [203.0.113.5] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3150). You can also refer your provider to http://mail.live.com/mail/troubleshooting.aspx#errors.", "spam-related", true, "MAIL FROM" },
  { "Exchange Online", 550, "5.1.10", "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup", "invalid-recipient", true, "end of data" },
  { "Exchange Online", 550, "5.4.1", "Recipient address rejected: Access denied. AS(201806281) [BN1NAM02FT022.eop-nam02.prod.protection.outlook.com]", "invalid-recipient", true, "RCPT TO" },
  { "Exchange Online", 550, "5.7.606", "Access denied, banned sending IP [203.0.113.5]. To request removal from this list please visit https://sender.office.com/ and follow the directions.", "spam-related", true, "RCPT TO" },
  { "Exchange Online", 550, "5.7.708", "Service unavailable. Access denied, traffic not accepted from this IP.", "spam-related", true, "RCPT TO" },
  { "Exchange Online", 550, "5.7.509", "Access denied, sending domain example.com does not pass DMARC verification and has a DMARC policy of reject.", "policy-related", true, "end of data" },
  { "Exchange Online", 451, "4.7.500", "Server busy. Please try again later from [203.0.113.5]. (S77714) [DB5EUR03FT050.eop-EUR03.prod.protection.outlook.com]", "policy-related", false, "RCPT TO" },
  { "Exchange Online", 550, "5.7.1", "Service unavailable, Client host [203.0.113.5] blocked using Spamhaus. To request removal from this list see https://www.spamhaus.org/query/ip/203.0.113.5 (AS3130)", "spam-related", true, "RCPT TO" },
  { "Exchange Online", 554, "5.2.2", "mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException.MapiExceptionShutoffQuotaExceeded", "quota-issues", false, "end of data" },
  { "Exchange Online", 550, "5.7.520", "Access denied, Your organization does not allow external forwarding. Please contact your administrator for further assistance. AS(7555)", "policy-related", true, "end of data" },
  { "Exchange Online", 550, "5.7.133", "RESOLVER.RST.SenderNotAuthenticatedForGroup; authentication required; Delivery restriction check failed because the sender was not authenticated when sending to this group", "policy-related", true, "end of data" },
  { "Exchange Online", 554, "5.4.14", "Hop count exceeded - possible mail loop ATTR34 [SN1NAM02FT0123.eop-nam02.prod.protection.outlook.com]", "routing-errors", true, "end of data" },
  { "Exchange Online", 550, "4.4.7", "QUEUE.Expired; message expired", "message-expired", true, "end of data" },
  { "Exchange Online", 550, "5.7.64", "TenantAttribution; Relay Access Denied [BY2NAM03FT011.eop-NAM03.prod.protection.outlook.com]", "relaying-issues", true, "RCPT TO" },
  { "Exchange Server", 550, "5.7.1", "Unable to relay", "relaying-issues", true, "RCPT TO" },

  -- Yahoo / AOL: "SMTP error codes" on the Yahoo sender hub
  { "Yahoo", 554, nil, "delivery error: dd This user doesn't have a yahoo.com account (someone@yahoo.com) [0] - mta1011.mail.gq1.yahoo.com", "invalid-recipient", true, "end of data" },
  { "Yahoo", 554, nil, "delivery error: dd Sorry your message to someone@yahoo.com cannot be delivered. This mailbox is disabled (554.30). - mta1032.mail.ne1.yahoo.com", "inactive-mailbox", true, "end of data" },
  { "Yahoo", 554, nil, "delivery error: dd Sorry, your message to someone@yahoo.com cannot be delivered. This account is over quota. - mta1030.mail.bf1.yahoo.com", "quota-issues", false, "end of data" },
  { "Yahoo", 421, "4.7.0", "[TSS04] Messages from 203.0.113.5 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes", "spam-related", false, "MAIL FROM" },
  { "Yahoo", 553, "5.7.2", "[TSS09] All messages from 203.0.113.5 will be permanently deferred; Retrying will NOT succeed. See https://postmaster.yahooinc.com/error-codes", "spam-related", true, "MAIL FROM" },
  { "Yahoo", 554, "5.7.9", "Message not accepted for policy reasons.  See https://postmaster.yahooinc.com/error-codes", "policy-related", true, "end of data" },
  { "Yahoo", 421, nil, "Message from (203.0.113.5) temporarily deferred - 4.16.50. Please refer to http://postmaster.yahoo.com/errors/postmaster-21.html", "spam-related", false, "MAIL FROM" },
  { "Yahoo", 451, nil, "VS1-IP Excessive unknown recipients - possible Open Relay (#4.1.8)", "spam-related", false, "RCPT TO" },
  { "Yahoo", 421, nil, "Max message per connection reached, closing transmission channel", "policy-related", false, "MAIL FROM" },
  { "Yahoo", 552, nil, "1 Requested mail action aborted, mailbox not found", "invalid-recipient", true, "RCPT TO" },
  { "AOL", 521, "5.2.1", "AOL will not accept delivery of this message.", "policy-related", true, "end of data" },
  { "AOL", 550, "5.1.1", "<someone@aol.com>: Recipient address rejected: aol.com", "invalid-recipient", true, "RCPT TO" },

  -- Apple iCloud: postmaster page and its published rejections
  { "iCloud", 550, "5.1.1", "<someone@icloud.com>: user does not exist", "invalid-recipient", true, "RCPT TO" },
  { "iCloud", 550, "5.7.1", "[CS01] Message rejected due to local policy. Please visit https://support.apple.com/en-us/HT204137", "policy-related", true, "end of data" },
  { "iCloud", 421, "4.7.1", "Messages to someone@icloud.com deferred due to excessive volume. Try again later - https://support.apple.com/en-us/HT204137", "policy-related", false, "RCPT TO" },
  { "iCloud", 550, "5.7.1", "Your email was rejected due to having a domain present in the Spamhaus DBL -- see https://www.spamhaus.org/dbl/", "spam-related", true, "end of data" },
  { "iCloud", 550, "5.7.1", "Your message was rejected due to example.com DMARC policy.", "policy-related", true, "end of data" },
  { "iCloud", 550, "5.7.1", "Relay not permitted for user.", "relaying-issues", true, "RCPT TO" },

  -- Comcast: postmaster "mail delivery error codes"
  { "Comcast", 550, "5.1.1", "<someone@comcast.net> Not our Customer", "invalid-recipient", true, "RCPT TO" },
  { "Comcast", 554, nil, "resimta-po-21v.sys.comcast.net comcast 203.0.113.5 found on one or more DNSBLs, see http://postmaster.comcast.net/smtp-error-codes.php#BL000001", "spam-related", true, "connect" },
  { "Comcast", 421, nil, "[Too many sessions opened]", "policy-related", false, "connect" },
  { "Comcast", 421, nil, "[Reverse DNS failure : Try again later]", "policy-related", false, "connect" },
  { "Comcast", 554, nil, "203.0.113.5 rejected - mail from dynamic/residential IP space, see http://postmaster.comcast.net/smtp-error-codes.php#ES000010", "policy-related", true, "connect" },

  -- GMX / Web.de (United Internet): "error messages when sending emails to GMX"
  { "GMX", 554, nil, "gmx.net (mxgmx104) Nemesis ESMTP Service not available\nNo SMTP service\nIP address is block listed.\nFor explanation visit https://postmaster.gmx.net/en/case?c=r0201&i=ip&v=203.0.113.5&r=1MNcgj", "spam-related", true, "connect" },
  { "GMX", 550, nil, "Requested action not taken: mailbox unavailable", "invalid-recipient", true, "RCPT TO" },
  { "GMX", 550, nil, "<someone@gmx.net>: Reject due to SPF policy. The originating IP of the message is not permitted by the domain owner", "policy-related", true, "MAIL FROM" },
  { "Web.de", 554, nil, "Transaction failed\nReject due to policy restrictions.\nFor explanation visit https://web.de/email/senderguidelines?ip=203.0.113.5", "policy-related", true, "end of data" },

  -- Mimecast: "Mimecast SMTP error codes"
  { "Mimecast", 550, nil, "Invalid Recipient - https://community.mimecast.com/docs/DOC-1369#550 [Ab1Cd2Ef.uk123]", "invalid-recipient", true, "RCPT TO" },
  { "Mimecast", 550, nil, "Rejected by header based Anti-Spoofing policy: sender@example.com - https://community.mimecast.com/docs/DOC-1369#550", "policy-related", true, "end of data" },
  { "Mimecast", 451, nil, "Internal resource temporarily unavailable - https://community.mimecast.com/docs/DOC-1369#451", "policy-related", false, "RCPT TO" },
  { "Mimecast", 554, nil, "Email rejected due to security policies - https://community.mimecast.com/docs/DOC-1369#554", "policy-related", true, "end of data" },
  { "Mimecast", 550, nil, "Administrative prohibition - envelope blocked - https://community.mimecast.com/docs/DOC-1369#550", "policy-related", true, "RCPT TO" },
  { "Mimecast", 421, nil, "Sender address blocked - https://community.mimecast.com/docs/DOC-1369#421", "policy-related", false, "MAIL FROM" },

  -- Proofpoint and Barracuda
  { "Proofpoint", 554, "5.7.0", "Blocked - see https://ipcheck.proofpoint.com/?ip=203.0.113.5", "spam-related", true, "connect" },
  { "Barracuda", 554, nil, "Service unavailable; Client host [203.0.113.5] blocked using Barracuda Reputation; http://www.barracudanetworks.com/reputation/?r=1&ip=203.0.113.5", "spam-related", true, "RCPT TO" },
  { "Barracuda", 550, nil, "permanent failure for one or more recipients (someone@example.com:blocked)", "spam-related", true, "end of data" },

  -- DNSBLs as Postfix, Exim and Sendmail report them
  { "Spamhaus", 554, "5.7.1", "Service unavailable; Client host [203.0.113.5] blocked using zen.spamhaus.org; https://www.spamhaus.org/query/ip/203.0.113.5", "spam-related", true, "RCPT TO" },
  { "Spamcop", 554, "5.7.1", "Service unavailable; Client host [203.0.113.5] blocked using bl.spamcop.net; Blocked - see https://www.spamcop.net/bl.shtml?203.0.113.5", "spam-related", true, "RCPT TO" },
  { "Spamhaus DBL", 554, "5.7.1", "<bounce@spam.example>: Sender address rejected: Service unavailable; Sender address [spam.example] blocked using dbl.spamhaus.org", "spam-related", true, "RCPT TO" },
  { "Exim dnslists", 550, nil, "rejected because 203.0.113.5 is in a black list at zen.spamhaus.org", "spam-related", true, "RCPT TO" },
  { "Sendmail dnsbl", 550, "5.7.1", "Rejected: 203.0.113.5 listed at bl.spamcop.net", "spam-related", true, "MAIL FROM" },

  -- Postfix defaults
  { "Postfix", 550, "5.1.1", "<bob@example.org>: Recipient address rejected: User unknown in local recipient table", "invalid-recipient", true, "RCPT TO" },
  { "Postfix", 550, "5.1.1", "<bob@example.org>: Recipient address rejected: User unknown in virtual mailbox table", "invalid-recipient", true, "RCPT TO" },
  { "Postfix", 554, "5.7.1", "<bob@example.org>: Relay access denied", "relaying-issues", true, "RCPT TO" },
  { "Postfix", 450, "4.7.1", "Client host rejected: cannot find your hostname, [203.0.113.5]", "policy-related", false, "RCPT TO" },
  { "Postfix", 450, "4.7.1", "Client host rejected: cannot find your reverse hostname, [203.0.113.5]", "policy-related", false, "RCPT TO" },
  { "postgrey", 450, "4.2.0", "<bob@example.org>: Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/help/example.org.html", "policy-related", false, "RCPT TO" },
  { "Postfix", 504, "5.5.2", "<localhost>: Helo command rejected: need fully-qualified hostname", "bad-configuration", true, "RCPT TO" },
  { "Postfix", 450, "4.1.8", "<bounce@example.net>: Sender address rejected: Domain not found", "invalid-sender", false, "RCPT TO" },
  { "Postfix", 552, "5.3.4", "Message size exceeds fixed limit", "content-related", true, "end of data" },
  { "Postfix", 452, "4.3.1", "Insufficient system storage", "quota-issues", false, "MAIL FROM" },
  { "Postfix", 554, "5.4.6", "mail forwarding loop for bob@example.org", "routing-errors", true, "end of data" },
  { "Postfix", 503, "5.5.1", "Error: need MAIL command", "protocol-errors", true, "RCPT TO" },
  { "Postfix", 451, "4.3.5", "Server configuration error", "bad-configuration", false, "RCPT TO" },
  { "Dovecot LMTP", 552, "5.2.2", "<bob@example.org> Quota exceeded (mailbox for user is full)", "quota-issues", false, "end of data" },
  { "amavisd-new", 554, "5.7.0", "Reject, id=12345-07 - INFECTED: Eicar-Test-Signature", "virus-related", true, "end of data" },

  -- Exim defaults (and cPanel's)
  { "Exim", 550, nil, "Unrouteable address", "routing-errors", true, "RCPT TO" },
  { "cPanel Exim", 550, nil, "No Such User Here", "invalid-recipient", true, "RCPT TO" },
  { "Exim", 550, nil, "Administrative prohibition", "policy-related", true, "RCPT TO" },
  { "Exim", 550, nil, "relay not permitted", "relaying-issues", true, "RCPT TO" },
  { "Exim", 451, nil, "Temporary local problem - please try later", "other", false, "end of data" },
  { "Exim", 550, nil, "Verification failed for <bounce@example.net>\nUnrouteable address\nSender verify failed", "invalid-sender", true, "RCPT TO" },
  { "Exim", 550, nil, "This message contains a virus (Eicar-Test-Signature).", "virus-related", true, "end of data" },
  { "Exim", 452, nil, "too many recipients", "protocol-errors", false, "RCPT TO" },

  -- Sendmail and qmail defaults
  { "Sendmail", 550, "5.1.1", "<bob@example.org>... User unknown", "invalid-recipient", true, "RCPT TO" },
  { "Sendmail", 553, "5.1.8", "<bounce@example.net>... Domain of sender address bounce@example.net does not exist", "invalid-sender", true, "MAIL FROM" },
  { "Sendmail", 550, "5.7.1", "<bob@example.org>... Relaying denied. Proper authentication required.", "relaying-issues", true, "RCPT TO" },
  { "Sendmail", 452, "4.4.5", "Insufficient disk space; try again later", "quota-issues", false, "MAIL FROM" },
  { "Sendmail", 554, "5.0.0", "Service unavailable", "other", true, "connect" },
  { "qmail", 553, nil, "sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)", "relaying-issues", true, "RCPT TO" },
  { "qmail", 550, nil, "sorry, no mailbox here by that name. (#5.1.1)", "invalid-recipient", true, "RCPT TO" },
}

-- Moonpost's own results (runtime/client.lua, modules/route.lua, the queue).
local OWN = {
  { "connect failure", { status = "deferred", code = 451, enhanced = "4.4.1", text = "cannot connect to [192.0.2.1]:25: ECONNREFUSED" }, "no-answer-from-host", false },
  { "reply timeout", { status = "deferred", enhanced = "4.4.0", text = "timeout waiting for a reply" }, "bad-connection", false },
  { "lost connection", { status = "deferred", enhanced = "4.4.0", text = "connection lost: ECONNRESET" }, "bad-connection", false },
  { "unreadable reply", { status = "deferred", enhanced = "4.4.0", text = "protocol error: bad reply" }, "protocol-errors", false },
  { "null MX", { status = "bounced", code = 550, enhanced = "5.1.10", text = "nullmx.example has a null MX: it accepts no mail (RFC 7505)", stage = "routing" }, "bad-domain", true },
  { "NXDOMAIN", { status = "bounced", code = 550, enhanced = "5.1.2", text = "example.invalid does not exist", stage = "routing" }, "bad-domain", true },
  { "DNS failure", { status = "deferred", code = 451, enhanced = "4.4.3", text = "MX lookup for example.org failed: timeout", stage = "routing" }, "routing-errors", false },
  { "no transport", { status = "deferred", code = 451, enhanced = "4.4.3", text = "no transport for example.org" }, "routing-errors", false },
  { "5xx greeting", { status = "bounced", code = 554, enhanced = "5.0.0", text = "greeting: 554 5.7.1 Service unavailable; Client host [203.0.113.5] blocked using zen.spamhaus.org" }, "spam-related", true },
  { "size check", { status = "bounced", code = 552, enhanced = "5.3.4", text = "message size 2000 exceeds the limit of [192.0.2.1]:25 (500)" }, "content-related", true },
  { "SMTPUTF8 check", { status = "bounced", code = 553, enhanced = "5.6.7", text = "[192.0.2.1]:25 does not support SMTPUTF8, which this message needs" }, "content-related", true },
  { "TLS required", { status = "deferred", code = 451, enhanced = "4.7.4", text = "TLS is required, but [192.0.2.1]:25 does not offer STARTTLS" }, "policy-related", false },
  { "expired", { status = "bounced", text = "4.4.7 message expired: 451 4.2.0 try again later", expired = true }, "message-expired", true },
  { "maildir ENOSPC", { status = "deferred", text = "4.3.0 maildir /var/mail/bob: ENOSPC: no space left on device" }, "quota-issues", false },
  { "maildir other", { status = "deferred", text = "4.3.0 maildir /var/mail/bob: EACCES: permission denied" }, "other", false },
  { "transport gave nothing", { status = "deferred", text = "transport gave no result" }, "uncategorized", false },
}

-- RFC 3463 section 3 and the registry's additions: every code, its class.
local ENHANCED = {
  ["0.0"] = "other",
  ["1.0"] = "invalid-recipient", ["1.1"] = "invalid-recipient", ["1.2"] = "bad-domain",
  ["1.3"] = "invalid-recipient", ["1.4"] = "invalid-recipient", ["1.5"] = "other",
  ["1.6"] = "inactive-mailbox", ["1.7"] = "invalid-sender", ["1.8"] = "invalid-sender",
  ["1.9"] = "other", ["1.10"] = "bad-domain",
  ["2.0"] = "other", ["2.1"] = "inactive-mailbox", ["2.2"] = "quota-issues",
  ["2.3"] = "content-related", ["2.4"] = "routing-errors",
  ["3.0"] = "other", ["3.1"] = "quota-issues", ["3.2"] = "bad-configuration", ["3.3"] = "protocol-errors",
  ["3.4"] = "content-related", ["3.5"] = "bad-configuration", ["3.6"] = "other",
  ["4.0"] = "routing-errors", ["4.1"] = "no-answer-from-host", ["4.2"] = "bad-connection",
  ["4.3"] = "routing-errors", ["4.4"] = "routing-errors", ["4.5"] = "bad-connection",
  ["4.6"] = "routing-errors", ["4.7"] = "message-expired",
  ["5.0"] = "protocol-errors", ["5.1"] = "protocol-errors", ["5.2"] = "protocol-errors",
  ["5.3"] = "protocol-errors", ["5.4"] = "protocol-errors", ["5.5"] = "protocol-errors",
  ["5.6"] = "protocol-errors",
  ["6.0"] = "content-related", ["6.1"] = "content-related", ["6.2"] = "content-related",
  ["6.3"] = "content-related", ["6.4"] = "content-related", ["6.5"] = "content-related",
  ["6.6"] = "content-related", ["6.7"] = "content-related", ["6.8"] = "content-related",
  ["6.9"] = "content-related", ["6.10"] = "content-related",
  ["7.0"] = "policy-related", ["7.1"] = "policy-related", ["7.2"] = "policy-related",
  ["7.3"] = "policy-related", ["7.4"] = "policy-related", ["7.5"] = "policy-related",
  ["7.6"] = "policy-related", ["7.7"] = "policy-related", ["7.8"] = "bad-configuration",
  ["7.9"] = "bad-configuration", ["7.10"] = "policy-related", ["7.11"] = "policy-related",
  ["7.12"] = "bad-configuration", ["7.13"] = "bad-configuration", ["7.14"] = "policy-related",
  ["7.15"] = "policy-related", ["7.16"] = "content-related", ["7.17"] = "inactive-mailbox",
  ["7.18"] = "bad-domain", ["7.19"] = "policy-related", ["7.20"] = "policy-related",
  ["7.21"] = "policy-related", ["7.22"] = "policy-related", ["7.23"] = "policy-related",
  ["7.24"] = "policy-related", ["7.25"] = "policy-related", ["7.26"] = "policy-related",
  ["7.27"] = "invalid-sender", ["7.28"] = "spam-related", ["7.29"] = "policy-related",
  ["7.30"] = "policy-related",
}

local function res_of(c)
  return { code = c[2], enhanced = c[3], text = c[4], stage = c[7],
    status = c[2] >= 500 and "bounced" or "deferred" }
end

describe("moonpost.bounce", function()
  describe("classify() on real replies", function()
    it("has at least 60 of them from at least 12 sources", function()
      local sources = {}
      local n = 0
      for _, c in ipairs(REPLIES) do
        if not sources[c[1]] then
          sources[c[1]] = true
          n = n + 1
        end
      end
      assert.is_true(#REPLIES >= 60, #REPLIES .. " replies")
      assert.is_true(n >= 12, n .. " sources")
    end)

    for i, c in ipairs(REPLIES) do
      local head = string.format("%d %s %s", c[2], c[3] or "", c[4]):gsub("\n", " "):sub(1, 70)
      it(string.format("classify() %s #%d: %s -> %s, %s", c[1], i, head, c[5], c[6] and "hard" or "soft"), function()
        local class, permanent, description = bounce.classify(res_of(c))
        assert.equal(c[5], class)
        assert.equal(c[6], permanent)
        assert.equal(bounce.describe(c[5]), description)
      end)
    end
  end)

  describe("classify() on Moonpost's own results", function()
    for _, c in ipairs(OWN) do
      it("classify() " .. c[1] .. " -> " .. c[3], function()
        local class, permanent = bounce.classify(c[2])
        assert.equal(c[3], class)
        assert.equal(c[4], permanent)
      end)
    end
  end)

  describe("classify() of refusals that are not about the recipient", function()
    it("a recipient class given at MAIL FROM is the sender's: invalid-sender", function()
      local class, permanent, _, source = bounce.classify({ code = 550, enhanced = "5.1.1", stage = "MAIL FROM",
        text = "<news@acme.test>: Sender address rejected: not owned by user" })
      assert.same({ "invalid-sender", true }, { class, permanent })
      assert.matches("at MAIL FROM$", source)
      assert.equal("invalid-recipient", (bounce.classify({ code = 550, enhanced = "5.1.1", stage = "RCPT TO",
        text = "no such user" })))
    end)

    it("a throttle for invalid recipients and a suspended sending account are policy-related", function()
      for _, text in ipairs({ "Too many invalid recipients from your IP", "Message rejected: Sending suspended for "
        .. "this account. For more information, please check the inbox of the email address associated with your "
        .. "AWS account." }) do
        assert.equal("policy-related", (bounce.classify({ code = 550, enhanced = "5.7.1", text = text, stage = "end of data" })),
          text)
      end
      -- a suspended mailbox is still one
      assert.equal("inactive-mailbox", (bounce.classify({ code = 550, enhanced = "5.2.1",
        text = "The email account that you tried to reach is suspended", stage = "RCPT TO" })))
    end)
  end)

  describe("classify() on RFC 3463 codes", function()
    it("lists every code of RFC 3463 and of the registry additions the tests know", function()
      for key, class in pairs(ENHANCED) do assert.equal(class, bounce.ENHANCED[key], key) end
      for key in pairs(bounce.ENHANCED) do assert.is_string(ENHANCED[key], "untested code " .. key) end
    end)

    it("classify() maps every code, 4.x.y soft and 5.x.y hard, from a reply without words it knows", function()
      for key, class in pairs(ENHANCED) do
        for _, cls in ipairs({ 4, 5 }) do
          local enh = cls .. "." .. key
          local got, permanent, _, source = bounce.classify({ code = cls * 100 + 50, enhanced = enh, text = "xyzzy" })
          assert.equal(class, got, enh)
          assert.equal("enhanced " .. enh, source)
          if key == "2.2" then
            assert.is_false(permanent, enh .. ": mailbox full is a persistent transient failure (RFC 3463)")
          else
            assert.equal(cls == 5, permanent, enh)
          end
        end
      end
    end)

    it("classify() falls back to the subject for a detail it does not list (5.7.999 -> 5.7.0)", function()
      assert.equal("policy-related", (bounce.classify({ code = 550, enhanced = "5.7.999", text = "xyzzy" })))
      assert.equal("routing-errors", (bounce.classify({ code = 554, enhanced = "5.4.316", text = "xyzzy" })))
    end)

    it("classify() reads the enhanced code at the start of the text when the result has none", function()
      local class, permanent = bounce.classify({ status = "bounced", text = "5.2.1 mailbox closed" })
      assert.equal("inactive-mailbox", class)
      assert.is_true(permanent)
    end)
  end)

  describe("classify() on reply codes alone", function()
    local cases = {
      { 421, nil, "bad-connection", false }, { 450, nil, "other", false }, { 451, nil, "other", false },
      { 452, nil, "quota-issues", false }, { 454, nil, "policy-related", false },
      { 455, nil, "protocol-errors", false }, { 500, nil, "protocol-errors", true },
      { 501, nil, "protocol-errors", true }, { 502, nil, "protocol-errors", true },
      { 503, nil, "protocol-errors", true }, { 504, nil, "protocol-errors", true },
      { 521, nil, "bad-domain", true }, { 530, nil, "policy-related", true },
      { 534, nil, "bad-configuration", true }, { 535, nil, "bad-configuration", true },
      { 550, "RCPT TO", "invalid-recipient", true }, { 550, "end of data", "other", true },
      { 551, "RCPT TO", "invalid-recipient", true }, { 552, "RCPT TO", "quota-issues", true },
      { 552, "end of data", "content-related", true }, { 553, "MAIL FROM", "invalid-sender", true },
      { 553, "RCPT TO", "invalid-recipient", true }, { 554, "connect", "policy-related", true },
      { 554, "end of data", "other", true }, { 555, "MAIL FROM", "protocol-errors", true },
      { 556, "RCPT TO", "bad-domain", true }, { 599, nil, "uncategorized", true },
      { 499, nil, "uncategorized", false },
    }
    for _, c in ipairs(cases) do
      it(string.format("classify() %d at %s -> %s", c[1], tostring(c[2]), c[3]), function()
        local class, permanent = bounce.classify({ code = c[1], text = "xyzzy", stage = c[2] })
        assert.equal(c[3], class)
        assert.equal(c[4], permanent)
      end)
    end
  end)

  describe("classes", function()
    it("describe() gives a sentence for every class, and nil for an unknown one", function()
      assert.is_true(#bounce.CLASSES >= 17)
      for _, name in ipairs(bounce.CLASSES) do
        assert.matches("^%u[%w%s',]+$", bounce.describe(name), name)
      end
      assert.is_nil(bounce.describe("spam"))
      assert.equal("The recipient address does not exist", bounce.describe("invalid-recipient"))
    end)

    it("every shipped rule names a known class", function()
      local rules = require "moonpost.bounce.rules"
      assert.is_true(#rules >= 100, #rules .. " rules")
      for i, r in ipairs(rules) do
        assert.is_string(bounce.describe(r[2]), "rule " .. i)
        assert.is_true(pcall(string.find, "", r[1]), "rule " .. i .. ": " .. r[1])
        local letters = r[1]:gsub("%%.", "") -- "%A" is a class, not a letter to match
        assert.equal(letters:lower(), letters, "rule " .. i .. " is not lowercase")
      end
    end)
  end)

  describe("setup()", function()
    it("setup() returns a block whose attach sets mta.classify", function()
      local block = bounce.setup {}
      assert.equal("bounce", block.name)
      local mta = {}
      block:attach(mta)
      assert.equal(block.classify, mta.classify)
      assert.equal("invalid-recipient", (mta.classify({ code = 550, enhanced = "5.1.1", text = "no such user" })))
    end)

    it("user rules come before the shipped ones and may set permanent", function()
      local block = bounce.setup { rules = {
        { pattern = "over quota", class = "inactive-mailbox", permanent = true },
        { pattern = "Spamhaus", class = "policy-related" },                    -- any letter case
        { pattern = { regex = [[^4\d\d .*\bgrey(list)?ed\b]] }, class = "other" },
        { pattern = "^550 5%.7%.1 %[CS01%]", class = "spam-related", permanent = false },
      } }
      local c, p, d, source = block.classify({ code = 452, enhanced = "4.2.2", text = "The email account that you tried to reach is over quota." })
      assert.same({ "inactive-mailbox", true, bounce.describe("inactive-mailbox"), "rule 1" }, { c, p, d, source })
      c, p = block.classify({ code = 554, enhanced = "5.7.1", text = "Client host [203.0.113.5] blocked using zen.spamhaus.org" })
      assert.same({ "policy-related", true }, { c, p })
      c, p = block.classify({ code = 450, enhanced = "4.2.0", text = "Recipient address rejected: Greyed out; Greylisted" })
      assert.same({ "other", false }, { c, p })
      c, p = block.classify({ code = 550, enhanced = "5.7.1", text = "[CS01] Message rejected due to local policy." })
      assert.same({ "spam-related", false }, { c, p })
      -- what no user rule matches still goes through the shipped rules
      assert.equal("invalid-recipient", (block.classify({ code = 550, enhanced = "5.1.1", text = "User unknown" })))
      -- and an expired message stays message-expired
      assert.equal("message-expired", (block.classify({ status = "bounced", text = "4.4.7 message expired: over quota", expired = true })))
    end)

    it("shipped_rules = false leaves the user rules and the codes", function()
      local block = bounce.setup { shipped_rules = false, rules = { { pattern = "frozen", class = "inactive-mailbox" } } }
      assert.equal("inactive-mailbox", (block.classify({ code = 550, text = "mailbox frozen" })))
      -- Gmail's "likely unsolicited" with 5.7.1 is then only what the code says
      assert.equal("policy-related", (block.classify({ code = 550, enhanced = "5.7.1", text = "likely unsolicited mail" })))
    end)

    it("the shipped classifier and a block do not share state", function()
      local block = bounce.setup { rules = { { pattern = "user unknown", class = "other" } } }
      assert.equal("other", (block.classify({ code = 550, enhanced = "5.1.1", text = "User unknown" })))
      assert.equal("invalid-recipient", (bounce.classify({ code = 550, enhanced = "5.1.1", text = "User unknown" })))
    end)

    it("a second bounce block on one MTA is a config error", function()
      local mta = {}
      bounce.setup({}):attach(mta)
      local line, ok, err = debug.getinfo(1, "l").currentline, pcall(bounce.setup({}).attach, bounce.setup({}), mta)
      assert.is_false(ok)
      assert.equal("spec/01-unit/bounce_spec.lua:" .. line .. ": bounce.setup: this MTA already uses another moonpost.bounce block", err)
    end)
  end)

  describe("setup() config errors name the policy's file and line", function()
    local cases = {
      { { rules = { { pattern = "x", class = "spam" } } },
        "bounce.setup: field 'rules[1].class': unknown class 'spam' (known: invalid-recipient, inactive-mailbox, " },
      { { rules = { { pattern = "x", class = "other" }, { pattern = "y", class = "Spam-Related" } } },
        "bounce.setup: field 'rules[2].class': unknown class 'Spam-Related'" },
      { { rules = { { pattern = "x", class = 3 } } }, "bounce.setup: field 'rules[1].class': unknown class number" },
      { { rules = { { pattern = "50%", class = "other" } } },
        "bounce.setup: field 'rules[1].pattern': bad Lua pattern \"50%\": malformed pattern (ends with '%')" },
      { { rules = { { pattern = "(user unknown", class = "other" } } },
        "bounce.setup: field 'rules[1].pattern': bad Lua pattern \"(user unknown\": unfinished capture" },
      { { rules = { { pattern = "[a-z", class = "other" } } },
        "bounce.setup: field 'rules[1].pattern': bad Lua pattern \"[a-z\": malformed pattern (missing ']')" },
      { { rules = { { pattern = { regex = "(user" }, class = "other" } } },
        "bounce.setup: field 'rules[1].pattern': bad regex \"(user\": missing ) at position 6" },
      { { rules = { { pattern = 42, class = "other" } } },
        "bounce.setup: field 'rules[1].pattern': expected a Lua pattern or { regex = \"...\" }, got number" },
      { { rules = { { class = "other" } } }, "bounce.setup: field 'rules[1].pattern' is required" },
      { { rules = { { pattern = "x" } } }, "bounce.setup: field 'rules[1].class' is required" },
      { { rules = { { pattern = "x", class = "other", permanent = "yes" } } },
        "bounce.setup: field 'rules[1].permanent': expected true or false, got string" },
      { { rules = { { pattern = "x", class = "other", action = "bounce" } } },
        "bounce.setup: field 'rules[1]': unknown field 'action' (known: class, pattern, permanent)" },
      { { rules = { "user unknown" } }, "bounce.setup: field 'rules[1]': expected a table { pattern = ..., class = ... }, got string" },
      { { rules = { x = { pattern = "x", class = "other" } } }, "bounce.setup: field 'rules': expected a list of rules, got a key x" },
      { { rules = "user unknown" }, "bounce.setup: field 'rules': expected a table, got \"user unknown\"" },
      { { retry = { "5m" } }, "bounce.setup: unknown field 'retry' (known: rules, shipped_rules)" },
    }
    for i, c in ipairs(cases) do
      it("setup() case " .. i .. ": " .. c[2]:sub(1, 60), function()
        local line, ok, err = debug.getinfo(1, "l").currentline, pcall(bounce.setup, c[1])
        assert.is_false(ok)
        local want = "spec/01-unit/bounce_spec.lua:" .. line .. ": " .. c[2]
        assert.equal(want, tostring(err):sub(1, #want))
      end)
    end
  end)
end)
