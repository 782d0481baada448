#!/usr/bin/env python3
"""Writes fuzz/seeds/relay/: inputs for the `relay` target in the encoding of
tests/common/relay_harness.rs (two setup bytes, then op/argument pairs)."""

import os

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds", "relay")

STRICT, CHUNKING, AUTH, TLS, MSG, RCPT, PER_MSG, SMALL = (1 << i for i in range(8))
BASE = CHUNKING | AUTH | TLS
LIMITS = BASE | MSG | RCPT | PER_MSG
# messages 4, recipients 8, recipients per message 2
EXTRA = 0b001_111_11


def client(data: bytes) -> bytes:
    out = b""
    for i in range(0, len(data), 255):
        piece = data[i : i + 255]
        out += bytes([0, len(piece)]) + piece
    return out


PUMP = bytes([15, 0])


def answer(kind: int) -> bytes:
    return bytes([7, kind])


POSITIVE, OK, MULTI, BARE_LF, R550, T451, S503, GO354, C421 = 0, 4, 5, 6, 7, 8, 9, 10, 11


def read_backend(n: int) -> bytes:
    return bytes([9, n - 1])


def read_client(n: int) -> bytes:
    return bytes([4, (n - 1) // 64])


def write_backend(n: int) -> bytes:
    return bytes([5, n // 16])


def store(kind: int) -> bytes:
    return bytes([10, kind])


CLIENT_EOF, BACKEND_EOF, WRITE_FAILED = bytes([12, 0]), bytes([12, 1]), bytes([12, 2])

TXN = b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n"
SMUGGLED = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@x>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n"

seeds = {}
for name, seq in [
    ("lf-dot-lf", b"\n.\n"),
    ("lf-dot-crlf", b"\n.\r\n"),
    ("crlf-dot-lf", b"\r\n.\n"),
    ("cr-dot-cr", b"\r.\r"),
    ("crlf-dot-cr", b"\r\n.\r"),
    ("nul-dot", b"\r\n\x00.\r\n"),
]:
    body = b"Subject: first\r\n\r\nhello" + seq + SMUGGLED
    seeds["smuggle-" + name] = bytes([BASE, 0]) + client(TXN) + PUMP + client(body) + PUMP
    seeds["strict-" + name] = bytes([BASE | STRICT, 0]) + client(TXN) + PUMP + client(body) + PUMP
seeds["body-split-bytewise"] = (
    bytes([BASE, 0])
    + client(TXN)
    + PUMP
    + b"".join(client(bytes([b])) + read_client(1) for b in b"a\r\n..x\r\n.\r")
    + client(b"\nNOOP\r\n")
    + PUMP
)
seeds["bdat-sizes"] = (
    bytes([BASE, 0])
    + client(b"MAIL FROM:<a>\r\nRCPT TO:<b>\r\nBDAT 0000000010 LAST\r\n0123456789")
    + PUMP
    + client(b"MAIL FROM:<a>\r\nBDAT 10 LAST\r\n\r\n.\r\nAUTH xMAIL FROM:<b>\r\nRCPT TO:<c>\r\nBDAT 0 LAST\r\n")
    + PUMP
    + client(b"BDAT 2147483648\r\n")
    + PUMP
)
seeds["bdat-wraps"] = bytes([BASE, 0]) + client(b"BDAT 4294967306 LAST\r\n0123456789") + PUMP
seeds["bdat-over-size"] = bytes([BASE | SMALL, 0]) + client(b"BDAT 1001 LAST\r\n") + PUMP
seeds["bdat-not-offered"] = bytes([AUTH | TLS, 0]) + client(b"BDAT 4 LAST\r\nAUTH\r\n") + PUMP
seeds["pipelined-resets"] = (
    bytes([LIMITS, EXTRA])
    + client(b"MAIL FROM:<a>\r\nRCPT TO:<1>\r\nRCPT TO:<2>\r\nRSET x\r\nRCPT TO:<3>\r\n")
    + read_client(4096)
    + store(0)
    + read_client(4096)
    + store(4)
    + read_client(4096)
    + store(0)
    + write_backend(0)
    + answer(POSITIVE)
    + answer(POSITIVE)
    + answer(POSITIVE)
    + answer(S503)
    + read_backend(200)
    + PUMP
    + client(b"RSET\r\nMAIL FROM:<a>\r\nRCPT TO:<4>\r\nRCPT TO:<5>\r\nRCPT TO:<6>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n")
    + PUMP
)
seeds["control-octets"] = (
    bytes([BASE, 0])
    + client(b"MAIL\x0bFROM:<a>\r\nNOOP\nAUTH PLAIN\r\n\x0bXCLIENT ADDR=1\r\nXFORWARD x\r\nstarttls\r\nNOOP\x00\r\nRSET\rMAIL\r\nNOOP\r\n")
    + PUMP
)
seeds["replies-split"] = (
    bytes([BASE, 0])
    + client(b"EHLO c\r\nNOOP\r\nNOOP\r\nNOOP\r\n")
    + read_client(4096)
    + write_backend(0)
    + answer(POSITIVE)
    + answer(MULTI)
    + answer(BARE_LF)
    + answer(R550)
    + b"".join(read_backend(3) for _ in range(80))
    + PUMP
)
seeds["go354-to-noop"] = (
    bytes([BASE, 0])
    + client(b"MAIL FROM:<a>\r\nNOOP\r\nBDAT 7\r\n\r\n.\r\nAB")
    + read_client(4096)
    + answer(POSITIVE)
    + answer(GO354)
    + read_backend(255)
    + PUMP
)
seeds["deep-pipeline"] = bytes([BASE, 0]) + bytes([3, 3, 6]) + b"NOOP\r\n" + PUMP
seeds["auth-flood"] = bytes([BASE, 0]) + bytes([3, 20, 6]) + b"AUTH\r\n" + read_client(16384)
seeds["eof-mid-data"] = bytes([BASE, 0]) + client(TXN) + PUMP + client(b"half a body") + CLIENT_EOF + PUMP
seeds["backend-eof"] = bytes([BASE, 0]) + client(b"NOOP\r\nNOOP\r\n") + read_client(64) + answer(C421) + BACKEND_EOF + PUMP
seeds["write-failed"] = (
    bytes([LIMITS, EXTRA]) + client(TXN) + PUMP + client(b"body\r\n") + WRITE_FAILED + answer(R550) + PUMP
)

os.makedirs(HERE, exist_ok=True)
for name, data in seeds.items():
    with open(os.path.join(HERE, name), "wb") as f:
        f.write(data)
print(f"{len(seeds)} seeds in {HERE}")
