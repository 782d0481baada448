#!/usr/bin/env bash
# Verify deploy/: static checks always; with POSTERN_VERIFY_IMAGE=1 also build the image
# for real with podman and send real SMTP sessions through a running container.
#
#   deploy/verify.sh                          # YAML/JSON parse + consistency (~1 s)
#   POSTERN_VERIFY_IMAGE=1 deploy/verify.sh   # + image build and end-to-end run (root)
#
# The image check needs no container registry: it makes stand-ins for the official base
# images from Debian packages (debootstrap from the mirror apt is configured with, the
# host's Rust toolchain, the host's CA bundle) and tags them with the official names, so
# deploy/Dockerfile is built unmodified with --pull=never. Base images already in the
# podman store are reused; POSTERN_VERIFY_REBUILD_BASE=1 rebuilds them.
#
# Environment:
#   POSTERN_VERIFY_IMAGE=1            run the image build and end-to-end check
#   POSTERN_VERIFY_REBUILD_BASE=1     rebuild the local base-image stand-ins
#   POSTERN_VERIFY_SKIP_METRICS=1     don't require /healthz, /readyz, /metrics (and skip
#                                     the reload checks, which read the reload counter)
#   POSTERN_VERIFY_KEEP=1             leave the pod and work directory for inspection
set -euo pipefail
export PYTHONDONTWRITEBYTECODE=1  # keep the checkout clean

# All in one function: bash parses it whole before running, so editing this file
# during a (long) run cannot derail that run.
main() {

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
started=$(date +%s)

log() { printf '%s verify: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

# --- static checks ---------------------------------------------------------------------
python3 -c 'import yaml' 2>/dev/null \
  || die "python3 PyYAML missing (Debian: apt-get install python3-yaml)"
python3 "$here/verify/check_config.py" "$root"
if command -v kubectl >/dev/null; then
  kubectl kustomize "$root/deploy/kubernetes" >/dev/null || die "kubectl kustomize deploy/kubernetes failed"
  log "kubectl kustomize deploy/kubernetes renders"
fi

if [[ "${POSTERN_VERIFY_IMAGE:-0}" != 1 ]]; then
  log "image build and end-to-end run skipped (set POSTERN_VERIFY_IMAGE=1)"
  exit 0
fi

# --- image build -----------------------------------------------------------------------
[[ $(id -u) == 0 ]] || die "the image check runs podman as root"
missing=()
for tool in podman runc debootstrap openssl; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v rustc >/dev/null || die "rustc not found: the builder stand-in uses the host's toolchain"

work=$(mktemp -d /var/tmp/postern-verify.XXXXXX)
pod=postern-verify-$$
cleanup() {
  if [[ "${POSTERN_VERIFY_KEEP:-0}" == 1 ]]; then
    log "kept pod $pod and $work"
    return
  fi
  podman pod rm -f "$pod" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# Podman's defaults don't fit this kind of machine: crun fails on hybrid cgroups, and
# root without CAP_SYS_RESOURCE can't raise nofile above the host's hard limit.
hard_nofile=$(ulimit -Hn)
cat > "$work/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$hard_nofile:$hard_nofile", "nproc=4096:4096"]
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF="$work/containers.conf"

phase_start=$(date +%s)
declare -a timings=()
phase_done() {
  local now; now=$(date +%s)
  timings+=("$(printf '%-28s %4ds' "$1" $((now - phase_start)))")
  phase_start=$now
}

# The Debian mirror apt uses, from /etc/apt/sources.list{,.d/*} (one-line or deb822).
debian_mirror() {
  python3 - <<'PY'
import glob, re, sys
files = glob.glob("/etc/apt/sources.list") + sorted(glob.glob("/etc/apt/sources.list.d/*"))
for path in files:
    try:
        text = open(path).read()
    except OSError:
        continue
    if path.endswith(".sources"):
        for block in re.split(r"\n\s*\n", text):
            fields = {}
            for line in block.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.split()
            if "deb" in fields.get("types", []) and "bookworm" in fields.get("suites", []):
                print(fields["uris"][0]); sys.exit(0)
    else:
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", "", line).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == "bookworm":
                print(words[1]); sys.exit(0)
sys.exit("no 'bookworm' suite in /etc/apt/sources.list*")
PY
}

rust_version=$(rustc --version | sed -E 's/^rustc ([0-9]+\.[0-9]+).*/\1/')
debian_base=docker.io/library/debian:bookworm-slim
rust_base=docker.io/library/rust:${rust_version}-bookworm
runtime_base=gcr.io/distroless/cc-debian12:nonroot
rebuild=${POSTERN_VERIFY_REBUILD_BASE:-0}

if [[ $rebuild == 1 ]] || ! podman image exists "$debian_base"; then
  mirror=$(debian_mirror)
  log "debootstrap bookworm minbase from $mirror"
  debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log"; die "debootstrap failed"; }

  # Runtime stand-in for distroless/cc: the same idea as distroless itself (files
  # extracted from Debian packages, no shell, no package manager), user nonroot = 65532.
  mkdir -p "$work/distroless"
  for pkg in base-files libc6 libgcc-s1; do
    deb=$(ls "$work/rootfs/var/cache/apt/archives/${pkg}_"*.deb | head -1)
    dpkg-deb -x "$deb" "$work/distroless"
  done
  (
    cd "$work/distroless"
    rm -rf usr/share/doc usr/share/man usr/share/locale usr/share/lintian
    mkdir -p etc/ssl/certs tmp home/nonroot
    chmod 1777 tmp
    chown 65532:65532 home/nonroot
    cp "$work/rootfs/etc/ssl/certs/ca-certificates.crt" etc/ssl/certs/ 2>/dev/null || true
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > etc/passwd
    printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' > etc/group
    [[ ! -e bin/sh && ! -e usr/bin/sh ]] || die "distroless stand-in has a shell"
  )
  tar -C "$work/distroless" -c . \
    | podman import --change 'USER 65532:65532' --change 'WORKDIR /home/nonroot' - "$runtime_base" >/dev/null 2>&1

  rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
  tar -C "$work/rootfs" -c . | podman import - "$debian_base" >/dev/null 2>&1
  rm -rf "$work/rootfs" "$work/distroless"
  phase_done "base images (debootstrap)"
fi

if [[ $rebuild == 1 ]] || ! podman image exists "$rust_base"; then
  log "builder stand-in $rust_base from $(rustc --print sysroot)"
  mkdir -p "$work/builder"
  # An intercepting proxy may sit between this machine and the package registry.
  cp /etc/ssl/certs/ca-certificates.crt "$work/builder/host-ca.crt"
  cat > "$work/builder/Containerfile" <<CF
FROM $debian_base
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates \\
 && rm -rf /var/lib/apt/lists/*
COPY host-ca.crt /etc/ssl/certs/ca-certificates.crt
RUN cp -a /tc/bin/. /usr/local/bin/ && cp -a /tc/lib/. /usr/local/lib/ && ldconfig && cargo --version
ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
CF
  podman build --pull=never -q -v "$(rustc --print sysroot)":/tc:ro -t "$rust_base" "$work/builder" \
    >"$work/builder.log" 2>&1 || { tail -20 "$work/builder.log"; die "builder stand-in failed"; }
  phase_done "builder stand-in"
fi

image=postern:verify
log "podman build deploy/Dockerfile -> $image (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
podman build --pull=never --build-arg RUST_VERSION="$rust_version" \
  --build-arg REVISION="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  -t "$image" -f "$root/deploy/Dockerfile" "$root" >"$work/build.log" 2>&1 \
  || { tail -40 "$work/build.log"; die "podman build failed (log above)"; }
phase_done "postern image build"
log "image size: $(podman image inspect "$image" --format '{{.Size}}' | numfmt --to=iec)"
image_user=$(podman image inspect "$image" --format '{{.Config.User}}')
[[ $image_user == 65532:65532 ]] || die "image USER is '$image_user', expected 65532:65532"
if podman run --rm --entrypoint /bin/sh "$image" -c true >/dev/null 2>&1; then
  die "the runtime image has a shell"
fi
podman run --rm "$image" --version >/dev/null || die "postern --version fails in the image"

# --- end-to-end: the Kubernetes pod, reproduced with podman ------------------------------
# The MTA is deploy/compose/postfix (plain SMTP, loopback only, as in the pod); postern
# runs with the Deployment's own env, securityContext and sysctl.
podman build --pull=never -q -t postern-verify-postfix "$root/deploy/compose/postfix" >/dev/null \
  || die "building deploy/compose/postfix failed"
phase_done "postfix image build"

# The secrets directory has the layout of a Kubernetes Secret volume (files are symlinks
# through ..data to a timestamped directory) so that a Secret update can be replayed.
secrets="$work/secrets"
user=verify
users_line() {  # PASSWORD -> a users-file line made by the image's hash-password
  local hashed
  hashed=$(printf '%s' "$1" | podman run --rm -i "$image" hash-password) \
    || die "postern hash-password failed"
  [[ $hashed == *'{ARGON2ID}'* ]] || die "postern hash-password printed '$hashed', expected a {ARGON2ID} line"
  [[ $hashed == '{'* ]] && hashed="$user:$hashed"  # it prints the password field only
  printf '%s\n' "$hashed"
}
secret_version() {  # NAME: write tls.*, users into secrets/..NAME and point ..data at it
  local dir="$secrets/..$1"
  mkdir -p "$dir"
  cp "$work/tls.crt" "$work/tls.key" "$work/users" "$dir/"
  # Kubernetes mounts these 0440 root:fsGroup; the nearest here is world-readable.
  chmod 0755 "$dir"; chmod 0644 "$dir"/*
  ln -sfn "..$1" "$secrets/..data_tmp"
  mv -T "$secrets/..data_tmp" "$secrets/..data"
  for f in tls.crt tls.key users; do ln -sfn "..data/$f" "$secrets/$f"; done
}
mkdir -p "$secrets"; chmod 0755 "$secrets"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=mail.example.org -addext subjectAltName=DNS:mail.example.org \
  -keyout "$work/tls.key" -out "$work/tls.crt" 2>/dev/null
password=$(openssl rand -hex 12)
users_line "$password" > "$work/users"
secret_version v1

read -r port_587 port_465 port_metrics < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')

podman pod create --name "$pod" --sysctl net.ipv4.ip_unprivileged_port_start=0 \
  -p "127.0.0.1:$port_587:587" -p "127.0.0.1:$port_465:465" -p "127.0.0.1:$port_metrics:9587" >/dev/null
podman run -d --pod "$pod" --name "$pod-mta" postern-verify-postfix \
  sh -c 'postconf -e inet_interfaces=loopback-only mynetworks=127.0.0.0/8 && exec postfix start-fg' >/dev/null

env_args=()
while IFS= read -r kv; do env_args+=(--env "$kv"); done \
  < <(python3 "$here/verify/check_config.py" --print-env "$root")
# "Check, then serve": `postern check` with the same env, user and mounts must pass once
# the MTA is up. It binds the listen addresses to test them, so it has to run before
# serve in this network namespace.
for i in $(seq 30); do
  podman run --rm --pod "$pod" --user 65532:65532 --read-only --read-only-tmpfs=false \
    --cap-drop ALL -v "$secrets:/etc/postern:ro" "${env_args[@]}" "$image" check \
    >"$work/check.log" 2>&1 && break
  ((i < 30)) || { cat "$work/check.log" >&2; die "postern check failed"; }
  sleep 1
done
log "postern check: OK after $i attempt(s) ($(grep -c '^ok:' "$work/check.log") ok lines)"
podman run -d --pod "$pod" --name "$pod-postern" \
  --user 65532:65532 --read-only --read-only-tmpfs=false --cap-drop ALL --security-opt no-new-privileges \
  -v "$secrets:/etc/postern:ro" "${env_args[@]}" "$image" >/dev/null
phase_done "pod start"

metrics_args=()
[[ "${POSTERN_VERIFY_SKIP_METRICS:-0}" == 1 ]] || metrics_args=(--metrics "127.0.0.1:$port_metrics")
if ! python3 "$here/verify/smtp_check.py" --host 127.0.0.1 --starttls-port "$port_587" \
    --tls-port "$port_465" --user "$user" --password "$password" \
    --mailbox-cmd "podman exec $pod-mta cat /var/mail/demo" "${metrics_args[@]}"; then
  log "postern logs:"; podman logs "$pod-postern" 2>&1 | tail -40 >&2
  log "mta logs:"; podman logs "$pod-mta" 2>&1 | tail -20 >&2
  die "end-to-end SMTP check failed"
fi
phase_done "SMTP sessions"

if [[ "${POSTERN_VERIFY_SKIP_METRICS:-0}" != 1 ]]; then
  reloads_ok() {
    python3 - "127.0.0.1:$port_metrics" <<'PY'
import re, sys, urllib.request
body = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=5).read().decode()
print(int(sum(float(v) for v in re.findall(r'^postern_reloads_total\{[^}]*result="ok"[^}]*\} (\S+)$', body, re.M))))
PY
  }
  wait_reload() {  # BEFORE WHAT
    local i
    for i in $(seq 20); do
      (( $(reloads_ok) > $1 )) && { log "$2: reloaded (postern_reloads_total{result=\"ok\"} $(reloads_ok))"; return; }
      sleep 1
    done
    podman logs "$pod-postern" 2>&1 | tail -10 >&2
    die "$2: no successful reload within 20s"
  }
  before=$(reloads_ok)
  podman kill -s HUP "$pod-postern" >/dev/null
  wait_reload "$before" "SIGHUP"

  # A Secret update as Kubernetes does it: new files, ..data swapped atomically. The new
  # password must work and the old one must be refused, with no signal sent.
  new_password=$(openssl rand -hex 12)
  users_line "$new_password" > "$work/users"
  before=$(reloads_ok)
  secret_version v2
  wait_reload "$before" "Secret symlink swap"
  python3 "$here/verify/smtp_check.py" --host 127.0.0.1 --starttls-port "$port_587" \
    --tls-port "$port_465" --user "$user" --password "$new_password" \
    --rejected-password "$password" --mailbox-cmd "podman exec $pod-mta cat /var/mail/demo" \
    || die "sessions with the swapped-in users file failed"
  phase_done "reloads"
fi

# SIGTERM with a relayed session in flight: it must finish its message while new
# connections are refused and /readyz says 503, then postern must exit 0 by itself.
t0=$(date +%s)
python3 "$here/verify/drain_check.py" --host 127.0.0.1 --starttls-port "$port_587" \
  --tls-port "$port_465" --user "$user" --password "${new_password:-$password}" \
  --signal-cmd "podman kill -s TERM $pod-postern" \
  --mailbox-cmd "podman exec $pod-mta cat /var/mail/demo" "${metrics_args[@]}" \
  || { podman logs "$pod-postern" 2>&1 | tail -20 >&2; die "SIGTERM drain check failed"; }
code=$(timeout 40 podman wait "$pod-postern") || die "postern still running 40s after SIGTERM"
took=$(( $(date +%s) - t0 ))
log "SIGTERM: drained and exited with code $code after ${took}s"
[[ $code == 0 ]] || { podman logs "$pod-postern" 2>&1 | tail -20 >&2; die "postern exited $code on SIGTERM"; }
phase_done "SIGTERM"

log "timings (load average now: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs):"
for t in "${timings[@]}"; do log "  $t"; done
log "OK in $(( $(date +%s) - started ))s"
}

main "$@"; exit  # one line: nothing after it is read, even if the file changed
