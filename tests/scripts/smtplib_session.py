#!/usr/bin/env python3
"""A real SMTP client (Python's smtplib) for the XCLIENT, PROXY and MX tests
(`tests/common/tools.rs`, `SmtplibSession`).

Connects from a chosen source address, optionally STARTTLS and AUTH, sends one message,
and prints one JSON object: the client's own address and port (to find it again in
postern's and Postfix's logs) and the reply to each step. Exits 0 whatever the server
answered; the test decides what is right.
"""

import argparse
import json
import smtplib
import socket
import ssl
import sys


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--source", default=None, help="local address to connect from")
    p.add_argument("--ehlo", default="client.example")
    p.add_argument("--helo", action="store_true", help="greet with HELO, not EHLO")
    p.add_argument("--starttls", action="store_true")
    p.add_argument("--user")
    p.add_argument("--password")
    p.add_argument("--mail-from", default="sender@client.example")
    p.add_argument("--rcpt", action="append", default=[])
    p.add_argument("--timeout", type=float, default=20)
    a = p.parse_args()

    out = {"steps": {}}
    source = (a.source, 0) if a.source else None
    try:
        s = smtplib.SMTP(timeout=a.timeout, local_hostname=a.ehlo, source_address=source)
        code, msg = s.connect(a.host, a.port)
        # starttls() names the server from this (empty when connect() is called late).
        s._host = "localhost"
        out["steps"]["greeting"] = [code, msg.decode(errors="replace")]
        local = s.sock.getsockname()
        out["local"] = {"ip": local[0], "port": local[1]}
        code, msg = s.helo(a.ehlo) if a.helo else s.ehlo(a.ehlo)
        out["steps"]["ehlo"] = [code, msg.decode(errors="replace")]
        if a.starttls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            code, msg = s.starttls(context=ctx)
            out["steps"]["starttls"] = [code, msg.decode(errors="replace")]
            code, msg = s.ehlo(a.ehlo)
            out["steps"]["ehlo_tls"] = [code, msg.decode(errors="replace")]
        if a.user is not None:
            try:
                # PLAIN: one round trip, and the one every server offers.
                s.user, s.password = a.user, a.password
                code, msg = s.auth("PLAIN", s.auth_plain)
            except smtplib.SMTPAuthenticationError as e:
                code, msg = e.smtp_code, e.smtp_error
            out["steps"]["auth"] = [code, msg.decode(errors="replace")]
            if code != 235:
                print(json.dumps(out))
                return
        if a.rcpt:
            code, msg = s.mail(a.mail_from)
            out["steps"]["mail"] = [code, msg.decode(errors="replace")]
            if code == 250:
                rcpts = []
                ok = False
                for r in a.rcpt:
                    code, msg = s.rcpt(r)
                    rcpts.append([code, msg.decode(errors="replace")])
                    ok = ok or code in (250, 251)
                out["steps"]["rcpt"] = rcpts
                if ok:
                    body = (
                        f"From: <{a.mail_from}>\r\nTo: <{a.rcpt[0]}>\r\n"
                        "Subject: postern test session\r\n\r\nHello.\r\n"
                    )
                    code, msg = s.data(body.encode())
                    out["steps"]["data"] = [code, msg.decode(errors="replace")]
        try:
            code, msg = s.quit()
            out["steps"]["quit"] = [code, msg.decode(errors="replace")]
        except (smtplib.SMTPException, OSError):
            pass
    except smtplib.SMTPResponseException as e:
        out["error"] = f"{e.smtp_code} {e.smtp_error.decode(errors='replace')}"
        out["error_code"] = e.smtp_code
    except (smtplib.SMTPException, OSError, socket.timeout) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
