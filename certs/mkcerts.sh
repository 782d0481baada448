#!/usr/bin/env bash
# Make a local development CA and a server certificate for localhost, with openssl.
#
#   certs/mkcerts.sh [--algo ecdsa|rsa|ed25519] [--force] [DIR]
#
# DIR defaults to certs/dev/ next to this script. Writes:
#   ca.pem      the development CA certificate (give it to clients: swaks --tls-ca-path, ...)
#   ca.key      the CA private key
#   server.pem  the server certificate for postern --cert (SAN DNS:localhost, IP:127.0.0.1, IP:::1)
#   server.key  its private key, PKCS#8, for postern --key
#
# Idempotent: files that exist, match --algo, verify against the CA and stay valid for
# another day are kept; anything else is (re)made. --force remakes everything.
# These are development credentials only: never commit them (certs/dev/ is git-ignored).
set -euo pipefail

algo=ecdsa
force=0
dir=""

usage() {
    sed -n '2,15s/^# \{0,1\}//p' "$0"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --algo) [ $# -ge 2 ] || { usage >&2; exit 2; }; algo="$2"; shift 2 ;;
        --algo=*) algo="${1#--algo=}"; shift ;;
        --force) force=1; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "mkcerts.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) [ -z "$dir" ] || { echo "mkcerts.sh: only one DIR" >&2; exit 2; }; dir="$1"; shift ;;
    esac
done

case "$algo" in
    ecdsa|ec|p256) algo=ecdsa; keyopts=(-algorithm EC -pkeyopt ec_paramgen_curve:P-256); digest=(-sha256) ;;
    rsa) keyopts=(-algorithm RSA -pkeyopt rsa_keygen_bits:3072); digest=(-sha256) ;;
    ed25519) keyopts=(-algorithm ED25519); digest=() ;;  # Ed25519 takes no digest option
    *) echo "mkcerts.sh: --algo must be ecdsa, rsa or ed25519, not '$algo'" >&2; exit 2 ;;
esac

command -v openssl >/dev/null || { echo "mkcerts.sh: openssl not found" >&2; exit 1; }

[ -n "$dir" ] || dir="$(cd "$(dirname "$0")" && pwd)/dev"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cat >"$work/openssl.cnf" <<'CNF'
[req]
distinguished_name = dn
prompt = no

[dn]
CN = postern development certificate

[ca_ext]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CNF

# key_algo FILE: ecdsa, rsa, ed25519 or unknown.
key_algo() {
    local text
    text="$(openssl pkey -in "$1" -noout -text_pub 2>/dev/null)" || { echo unknown; return; }
    case "$text" in
        *ED25519*) echo ed25519 ;;
        *prime256v1*|*P-256*) echo ecdsa ;;
        *Modulus*|*modulus*) echo rsa ;;
        *) echo unknown ;;
    esac
}

# usable CERT KEY: the pair exists, is of the wanted algorithm, matches, and is valid a day more.
usable() {
    [ -s "$1" ] && [ -s "$2" ] || return 1
    [ "$(key_algo "$2")" = "$algo" ] || return 1
    openssl x509 -in "$1" -noout -checkend 86400 >/dev/null 2>&1 || return 1
    [ "$(openssl x509 -in "$1" -noout -pubkey 2>/dev/null)" = "$(openssl pkey -in "$2" -pubout 2>/dev/null)" ]
}

made=()
kept=()

if [ "$force" = 0 ] && usable "$dir/ca.pem" "$dir/ca.key"; then
    kept+=("ca.pem" "ca.key")
    new_ca=0
else
    (umask 077 && openssl genpkey "${keyopts[@]}" -out "$dir/ca.key" 2>/dev/null)
    openssl req -x509 -new -key "$dir/ca.key" "${digest[@]}" -days 3650 \
        -config "$work/openssl.cnf" -extensions ca_ext \
        -subj "/CN=postern development CA ($(date -u +%Y-%m-%d))" -out "$dir/ca.pem"
    made+=("ca.pem" "ca.key")
    new_ca=1
fi

if [ "$force" = 0 ] && [ "$new_ca" = 0 ] && usable "$dir/server.pem" "$dir/server.key" \
    && openssl verify -CAfile "$dir/ca.pem" "$dir/server.pem" >/dev/null 2>&1; then
    kept+=("server.pem" "server.key")
else
    (umask 077 && openssl genpkey "${keyopts[@]}" -out "$dir/server.key" 2>/dev/null)
    openssl req -new -key "$dir/server.key" -config "$work/openssl.cnf" -subj "/CN=localhost" \
        -out "$work/server.csr"
    openssl x509 -req -in "$work/server.csr" "${digest[@]}" -days 825 \
        -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
        -extfile "$work/openssl.cnf" -extensions server_ext -out "$dir/server.pem" 2>/dev/null
    made+=("server.pem" "server.key")
fi

openssl verify -CAfile "$dir/ca.pem" "$dir/server.pem" >/dev/null

echo "mkcerts.sh: $algo certificates in $dir"
for f in "${made[@]}"; do echo "  made  $f"; done
for f in "${kept[@]}"; do echo "  kept  $f"; done
echo "  server: $(openssl x509 -in "$dir/server.pem" -noout -subject -enddate | tr '\n' ' ')"
echo "  use: postern serve --cert $dir/server.pem --key $dir/server.key ...; clients trust $dir/ca.pem"
