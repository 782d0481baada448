#!/usr/bin/env python3
"""Send one message through postern with Python's smtplib, the way a script would.

Used by the integration tests (tests/tools via common::tools::smtplib). Exit status:
0 sent, 2 authentication refused, 3 other SMTP error (the reply is printed).
"""
import argparse
import smtplib
import ssl
import sys


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=["starttls", "implicit"], required=True)
    p.add_argument("--cafile", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--mech", default="auto", help="auto (smtplib.login), PLAIN, LOGIN or CRAM-MD5")
    p.add_argument("--no-initial-response", action="store_true")
    p.add_argument("--sender", default="sender@client.test")
    p.add_argument("--rcpt", action="append", default=[])
    p.add_argument("--message-file", required=True)
    a = p.parse_args()

    ctx = ssl.create_default_context(cafile=a.cafile)
    ctx.check_hostname = True
    with open(a.message_file, "rb") as f:
        message = f.read()
    try:
        # The certificate's SAN includes IP:127.0.0.1, so ssl checks the host we dial.
        if a.mode == "implicit":
            s = smtplib.SMTP_SSL(a.host, a.port, local_hostname="client.test", context=ctx, timeout=20)
        else:
            s = smtplib.SMTP(a.host, a.port, local_hostname="client.test", timeout=20)
            s.ehlo()
            print("pre-TLS features:", sorted(s.esmtp_features))
            s.starttls(context=ctx)
        s.ehlo()
        print("features:", sorted(s.esmtp_features))
        print("auth:", s.esmtp_features.get("auth", "").strip())
        if a.mech == "auto":
            s.login(a.user, a.password)
        else:
            s.user, s.password = a.user, a.password
            auth = {"PLAIN": s.auth_plain, "LOGIN": s.auth_login, "CRAM-MD5": s.auth_cram_md5}[a.mech]
            s.auth(a.mech, auth, initial_response_ok=not a.no_initial_response)
        refused = s.sendmail(a.sender, a.rcpt or ["rcpt@backend.test"], message)
        print("refused:", refused)
        s.quit()
    except smtplib.SMTPAuthenticationError as e:
        print("auth refused:", e.smtp_code, e.smtp_error.decode(errors="replace"))
        return 2
    except smtplib.SMTPResponseException as e:
        print("smtp error:", e.smtp_code, e.smtp_error.decode(errors="replace"))
        return 3
    print("sent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
