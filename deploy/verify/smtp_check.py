#!/usr/bin/env python3
"""End-to-end SMTP check against a running postern (used by deploy/verify.sh).

STARTTLS port: no AUTH offered and MAIL refused (530) before TLS; after STARTTLS a wrong
password gets 535 and the right one (AUTH PLAIN) relays a message. Implicit-TLS port:
AUTH LOGIN relays a second message. Both must show up in the backend's mailbox, read
with --mailbox-cmd. With --metrics HOST:PORT, /healthz, /readyz and /metrics are checked.
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
from email.message import EmailMessage

TIMEOUT = 15
CONTRACT_METRICS = [
    "postern_connections_total", "postern_connections_active", "postern_tls_handshakes_total",
    "postern_auth_attempts_total", "postern_backend_connections_total", "postern_bytes_total",
    "postern_session_duration_seconds_bucket", "postern_backend_up", "postern_reloads_total",
]


def say(msg):
    print(f"smtp-check: {msg}", file=sys.stderr, flush=True)


def fail(msg):
    say(f"FAIL: {msg}")
    sys.exit(1)


def http_get(addr, path):
    try:
        with urllib.request.urlopen(f"http://{addr}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_until(what, check, seconds=60):
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        try:
            ok, last = check()
            if ok:
                return last
        except (OSError, smtplib.SMTPException) as e:
            last = repr(e)
        time.sleep(1)
    fail(f"{what}: still not there after {seconds}s (last: {last})")


def message(token, port):
    m = EmailMessage()
    m["From"] = "verify@example.org"
    m["To"] = "demo@example.org"
    m["Subject"] = f"postern verify {token}"
    m["Message-ID"] = f"<{token}@verify.example.org>"
    m.set_content(f"token {token} via port {port}\n")
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--starttls-port", type=int, required=True)
    ap.add_argument("--tls-port", type=int, required=True)
    ap.add_argument("--user", required=True)
    ap.add_argument("--password", required=True)
    ap.add_argument("--cafile", help="verify the server chain (hostname is not checked)")
    ap.add_argument("--mailbox-cmd", required=True, help="prints the backend mailbox")
    ap.add_argument("--metrics", help="HOST:PORT of postern's metrics listener")
    ap.add_argument("--rejected-password", help="must get 535 (default: a wrong password)")
    a = ap.parse_args()

    ctx = ssl.create_default_context(cafile=a.cafile) if a.cafile else ssl.create_default_context()
    ctx.check_hostname = False
    if not a.cafile:
        ctx.verify_mode = ssl.CERT_NONE

    def greeting():
        with smtplib.SMTP(a.host, a.starttls_port, timeout=TIMEOUT) as s:
            code, _ = s.noop()
            return code == 250, f"NOOP {code}"
    wait_until("postern greeting on the STARTTLS port", greeting)

    if a.metrics:
        wait_until("/healthz 200", lambda: (lambda r: (r[0] == 200, r))(http_get(a.metrics, "/healthz")))
        wait_until("/readyz 200 (backend probe)", lambda: (lambda r: (r[0] == 200, r))(http_get(a.metrics, "/readyz")))
        say("/healthz and /readyz answer 200")

    tokens = [uuid.uuid4().hex, uuid.uuid4().hex]

    # Port 587 style.
    with smtplib.SMTP(a.host, a.starttls_port, timeout=TIMEOUT, local_hostname="client.verify") as s:
        s.ehlo()
        if not s.has_extn("starttls"):
            fail(f"STARTTLS not offered: {s.esmtp_features}")
        if s.has_extn("auth"):
            fail("AUTH offered before TLS")
        code, resp = s.docmd("MAIL", "FROM:<verify@example.org>")
        if code != 530:
            fail(f"MAIL before TLS+AUTH: expected 530, got {code} {resp!r}")
        s.starttls(context=ctx)
        s.ehlo()
        if not s.has_extn("auth"):
            fail(f"AUTH not offered after STARTTLS: {s.esmtp_features}")
        try:
            bad = a.rejected_password or f"wrong-{a.password}"
            s.auth("PLAIN", lambda challenge=None: f"\0{a.user}\0{bad}")
            fail(f"password {bad!r} accepted")
        except smtplib.SMTPAuthenticationError as e:
            if e.smtp_code != 535:
                fail(f"wrong password: expected 535, got {e.smtp_code} {e.smtp_error!r}")
        code, resp = s.auth("PLAIN", lambda challenge=None: f"\0{a.user}\0{a.password}")
        if code != 235:
            fail(f"AUTH PLAIN: {code} {resp!r}")
        refused = s.send_message(message(tokens[0], a.starttls_port))
        if refused:
            fail(f"recipients refused: {refused}")
    say(f"STARTTLS port {a.starttls_port}: 530 before AUTH, 535 on a wrong password, relayed with AUTH PLAIN")

    # Port 465 style.
    with smtplib.SMTP_SSL(a.host, a.tls_port, timeout=TIMEOUT, context=ctx,
                          local_hostname="client.verify") as s:
        s.ehlo()
        s.user, s.password = a.user, a.password
        code, resp = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
        if code != 235:
            fail(f"AUTH LOGIN: {code} {resp!r}")
        refused = s.send_message(message(tokens[1], a.tls_port))
        if refused:
            fail(f"recipients refused: {refused}")
    say(f"implicit-TLS port {a.tls_port}: relayed with AUTH LOGIN")

    def mailbox():
        out = subprocess.run(shlex.split(a.mailbox_cmd), capture_output=True, text=True).stdout
        missing = [t for t in tokens if t not in out]
        return not missing, f"missing {missing}"
    wait_until("both messages in the backend mailbox", mailbox, 30)
    say("both messages arrived at the backend")

    if a.metrics:
        status, body = http_get(a.metrics, "/metrics")
        if status != 200:
            fail(f"/metrics: {status}")
        absent = [m for m in CONTRACT_METRICS if m not in body]
        if absent:
            fail(f"/metrics lacks {absent}")
        say("/metrics exposes every contract metric")
    return 0


if __name__ == "__main__":
    sys.exit(main())
