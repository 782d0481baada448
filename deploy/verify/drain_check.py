#!/usr/bin/env python3
"""SIGTERM drain check against a running postern (used by deploy/verify.sh).

Opens an implicit-TLS session, authenticates and starts a transaction, then runs
--signal-cmd (which sends SIGTERM). While draining: /readyz must answer 503 (if --metrics)
and a new connection must be refused or get 421; the session already relayed must still
complete its message, which must reach the mailbox (--mailbox-cmd).
"""
import argparse
import shlex
import smtplib
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

from smtp_check import fail, message, say, wait_until

TIMEOUT = 15


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--starttls-port", type=int, required=True)
    ap.add_argument("--tls-port", type=int, required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--signal-cmd", required=True)
    ap.add_argument("--mailbox-cmd", required=True)
    ap.add_argument("--metrics")
    a = ap.parse_args()

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    token = uuid.uuid4().hex

    s = smtplib.SMTP_SSL(a.host, a.tls_port, timeout=TIMEOUT, context=ctx, local_hostname="client.verify")
    s.ehlo()
    s.user, s.password = a.user, a.password
    code, resp = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
    if code != 235:
        fail(f"AUTH LOGIN: {code} {resp!r}")
    code, resp = s.mail("verify@example.org")
    if code != 250:
        fail(f"MAIL: {code} {resp!r}")

    subprocess.run(shlex.split(a.signal_cmd), check=True, capture_output=True)
    time.sleep(1)

    if a.metrics:
        try:
            with urllib.request.urlopen(f"http://{a.metrics}/readyz", timeout=5) as r:
                fail(f"/readyz answered {r.status} while draining, expected 503")
        except urllib.error.HTTPError as e:
            if e.code != 503:
                fail(f"/readyz answered {e.code} while draining, expected 503")
        except OSError as e:
            fail(f"/readyz unreachable while draining ({e}); it should answer 503")
        say("draining: /readyz answers 503")

    try:
        with smtplib.SMTP(a.host, a.starttls_port, timeout=5) as n:
            code, resp = n.ehlo()
            fail(f"new connection while draining was served: {code} {resp!r}")
    except smtplib.SMTPConnectError as e:
        if e.smtp_code != 421:
            fail(f"new connection while draining: {e.smtp_code}, expected 421 or refusal")
    except (ConnectionError, smtplib.SMTPServerDisconnected, OSError):
        pass
    say("draining: new connections are refused")

    code, resp = s.rcpt("demo@example.org")
    if code != 250:
        fail(f"RCPT during drain: {code} {resp!r}")
    code, resp = s.data(message(token, a.tls_port).as_bytes())
    if code != 250:
        fail(f"DATA during drain: {code} {resp!r}")
    s.quit()
    say("draining: the session in flight completed its message")

    def mailbox():
        out = subprocess.run(shlex.split(a.mailbox_cmd), capture_output=True, text=True).stdout
        return token in out, "not yet"
    wait_until("the drained message in the backend mailbox", mailbox, 30)
    say("the drained message arrived")
    return 0


if __name__ == "__main__":
    sys.exit(main())
