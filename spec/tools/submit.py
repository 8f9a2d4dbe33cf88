#!/usr/bin/python3
"""Submit messages the way a customer of an ESP does: one SMTP session
with STARTTLS and AUTH LOGIN (Python's smtplib), many transactions.

    submit.py PORT USER PASSWORD COUNT FROM RCPT [--subject S]

RCPT may contain {i} (the message number, from 1). Prints one JSON list,
an entry per message: {"i": n, "mail": code, "rcpt": code, "data": code,
"reply": "last reply text"}; a transaction refused at MAIL or RCPT is reset
and the next one goes on.
"""
import json
import smtplib
import ssl
import sys


def main():
    port, user, password, count, sender, rcpt = sys.argv[1:7]
    subject = "esp test"
    if "--subject" in sys.argv:
        subject = sys.argv[sys.argv.index("--subject") + 1]
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    s = smtplib.SMTP("127.0.0.1", int(port), timeout=30)
    s.ehlo("customer.test")
    s.starttls(context=ctx)
    s.ehlo("customer.test")
    s.login(user, password)
    out = []
    for i in range(1, int(count) + 1):
        to = rcpt.replace("{i}", str(i))
        entry = {"i": i, "mail": None, "rcpt": None, "data": None}
        code, msg = s.mail(sender)
        entry["mail"], entry["reply"] = code, msg.decode("utf-8", "replace")
        if code == 250:
            code, msg = s.rcpt(to)
            entry["rcpt"], entry["reply"] = code, msg.decode("utf-8", "replace")
        if entry["rcpt"] == 250:
            body = ("From: <%s>\r\nTo: <%s>\r\nSubject: %s %d\r\nMessage-ID: <%d.%s>\r\n\r\nHello %d\r\n"
                    % (sender, to, subject, i, i, sender, i))
            code, msg = s.data(body.encode())
            entry["data"], entry["reply"] = code, msg.decode("utf-8", "replace")
        else:
            s.rset()
        out.append(entry)
    s.quit()
    print(json.dumps(out))


main()
