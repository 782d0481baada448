#!/usr/bin/env bash
# Development secrets for deploy/compose.yaml: a self-signed certificate for
# mail.example.org and a users file with one user (default demo/demo, argon2id),
# hashed by the postern image itself. Written to deploy/compose/secrets/ (git-ignored).
#
#   deploy/compose/make-dev-secrets.sh [USER [PASSWORD]]
#
# Uses docker or podman (CONTAINER_ENGINE=...) to run `postern hash-password`; build the image
# first (docker compose -f deploy/compose.yaml build).
set -euo pipefail
dir="$(cd "$(dirname "$0")" && pwd)/secrets"
user=${1:-demo}
password=${2:-demo}
# CONTAINER_ENGINE overrides; otherwise docker if its daemon answers, else podman.
if [[ -n ${CONTAINER_ENGINE:-} ]]; then
  engine=$CONTAINER_ENGINE
elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  engine=docker
elif command -v podman >/dev/null; then
  engine=podman
else
  echo "need docker (with a running daemon) or podman" >&2; exit 1
fi

mkdir -p "$dir"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
  -subj /CN=mail.example.org -addext subjectAltName=DNS:mail.example.org,DNS:localhost \
  -keyout "$dir/tls.key" -out "$dir/tls.crt" 2>/dev/null
line=$(printf '%s' "$password" | "$engine" run --rm -i postern:latest hash-password)
[[ $line == '{'* ]] && line="$user:$line"
printf '%s\n' "$line" > "$dir/users"
# The container runs as uid 65532, not the owner of these files. Development only:
# production keys belong in a Secret (Kubernetes) or a secrets store.
chmod 0644 "$dir/tls.crt" "$dir/tls.key" "$dir/users"
echo "wrote $dir/{tls.crt,tls.key,users} (user $user)"
