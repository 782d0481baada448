#!/usr/bin/env bash
# Where a postern session's resources go, counted rather than sampled: heap allocations
# per session and per relayed MB, live heap per idle authenticated TLS session (by block
# size), and system calls per session and per relayed MB. A manual step, not part of CI;
# see benches/README.md ("Profiling").
#
#   benches/profile.sh                      # allocations, then syscalls (needs strace)
#   SESSIONS=4000 IDLE=10000 benches/profile.sh
#   PARTS=allocs benches/profile.sh         # or PARTS=syscalls
#
# Allocations come from postern-bench-inproc: postern's own server (`postern::server::run`)
# in a process whose global allocator counts, loaded from another process. Syscalls come
# from `strace -c -f` on the real postern binary (strace slows it down: only the counts
# are meaningful, not the times).
#
# Knobs: SESSIONS=2000 (handshake sessions counted), BULK_SECS=5, IDLE=2000, HOLD=3,
# PROXY_CPU=0 LOAD_CPU=1, PORT_BASE=25900, PARTS="allocs syscalls", KEEP=1.
set -euo pipefail

SESSIONS=${SESSIONS:-2000}
BULK_SECS=${BULK_SECS:-5}
IDLE=${IDLE:-2000}
HOLD=${HOLD:-3}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PORT_BASE=${PORT_BASE:-25900}
PARTS=${PARTS:-allocs syscalls}

SINK_PORT=$PORT_BASE
SMTP_PORT=$((PORT_BASE + 1))
export POSTERN_BENCH_AUTH=bench:bench-secret

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$repo/target}
bin=$target_dir/release
work=$(mktemp -d -t postern-profile.XXXXXX)
pids=()

log() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'profile.sh: %s\n' "$*" >&2
    exit 1
}
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ -n ${KEEP:-} ]]; then log "work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
calc() { awk "BEGIN { printf \"%.${2:-1}f\", $1 }"; }

wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    die "nothing listening on 127.0.0.1:$1"
}

bench() { taskset -c "$LOAD_CPU" "$bin/postern-bench" --target "127.0.0.1:$SMTP_PORT" --ca "$work/cert.pem" --quiet --json "$@"; }
jnum() { grep -o "\"$2\":[-0-9.]*" "$1" | head -1 | cut -d: -f2; }

serve_flags=(--listen "127.0.0.1:$SMTP_PORT" --backend "127.0.0.1:$SINK_PORT"
    --cert "$work/cert.pem" --key "$work/key.pem" --users "$work/users"
    --hostname bench.invalid --log-level warn)
# All load comes from 127.0.0.1 (see compare.sh).
export POSTERN_MAX_CONNECTIONS_PER_IP=1000000 POSTERN_MAX_VERIFICATIONS_PER_NETWORK=1000000

ulimit -n "$(ulimit -Hn)"
log "building (release)"
(cd "$repo" && cargo build --release --quiet --bin postern --bin postern-bench \
    --bin postern-bench-sink --bin postern-bench-inproc)
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$work/key.pem" -out "$work/cert.pem" -days 2 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
    -addext basicConstraints=critical,CA:FALSE -addext extendedKeyUsage=serverAuth 2>/dev/null
printf 'bench:{PLAIN}bench-secret\n' >"$work/users"
taskset -c "$LOAD_CPU" "$bin/postern-bench-sink" --listen "127.0.0.1:$SINK_PORT" >"$work/sink.log" 2>&1 &
pids+=("$!")
wait_port "$SINK_PORT"

# field LINE KEY: a value from a snapshot line.
field() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"; }
# delta A B KEY
delta() { echo $(($(field "$2" "$3") - $(field "$1" "$3"))); }

allocs() {
    coproc INPROC { taskset -c "$PROXY_CPU" "$bin/postern-bench-inproc" -- "${serve_flags[@]}" 2>"$work/inproc.log"; }
    pids+=("$INPROC_PID")
    wait_port "$SMTP_PORT"
    snap() {
        echo >&"${INPROC[1]}"
        local line
        read -r line <&"${INPROC[0]}"
        echo "$line"
    }
    bench --sessions 200 -c 8 >/dev/null 2>>"$work/bench.log" # warm: caches, pools, tables

    local a b n mb
    a=$(snap)
    bench --sessions "$SESSIONS" -c 8 >"$work/hs.json" 2>>"$work/bench.log"
    b=$(snap)
    n=$(jnum "$work/hs.json" sessions)
    echo "handshake sessions (STARTTLS + AUTH + one 1 KiB message + QUIT), $n sessions:"
    echo "  allocations per session: $(calc "($(delta "$a" "$b" allocs) + $(delta "$a" "$b" reallocs)) / $n")" \
        "(of which reallocs $(calc "$(delta "$a" "$b" reallocs) / $n"))"
    echo "  bytes allocated per session: $(calc "$(delta "$a" "$b" bytes) / $n" 0)"
    echo "  CPU per session (in-process, counting allocator): $(calc "$(delta "$a" "$b" cpu_ms) * 1000 / $n" 0) us"

    a=$(snap)
    bench -c 8 -d "$BULK_SECS" --size 1048576 --messages-per-conn 0 >"$work/bulk.json" 2>>"$work/bench.log"
    b=$(snap)
    mb=$(calc "$(jnum "$work/bulk.json" bytes) / 1e6" 1)
    echo "bulk (8 connections, 1 MiB messages), $mb MB:"
    echo "  allocations per MB: $(calc "($(delta "$a" "$b" allocs) + $(delta "$a" "$b" reallocs)) / $mb")"
    echo "  bytes allocated per MB: $(calc "$(delta "$a" "$b" bytes) / $mb" 0)"

    a=$(snap)
    bench --idle "$IDLE" -c 32 -d "$HOLD" >"$work/idle.json" 2>"$work/idle.err" &
    local idle_pid=$!
    for _ in $(seq 1200); do
        grep -qs '^idle: .* holding' "$work/idle.err" && break
        kill -0 "$idle_pid" 2>/dev/null || break
        sleep 0.1
    done
    grep -qs '^idle: .* holding' "$work/idle.err" || die "idle sessions never established: $(cat "$work/idle.err")"
    sleep 1
    b=$(snap)
    n=$(sed -n 's/^idle: \([0-9]*\) sessions established.*/\1/p' "$work/idle.err")
    echo "idle authenticated TLS sessions, $n held:"
    echo "  live heap per session: $(calc "$(delta "$a" "$b" live) / $n / 1024") KiB" \
        "(RSS per session $(calc "$(delta "$a" "$b" rss_kib) / $n") KiB)"
    echo "  live blocks per session, by size class (bytes >= class):"
    # The difference of the two histograms, per session.
    join -t: -a2 -e0 -o 0,1.2,2.2 \
        <(field "$a" live_blocks | tr , '\n' | sort -t: -k1,1) \
        <(field "$b" live_blocks | tr , '\n' | sort -t: -k1,1) |
        sort -t: -k1,1n | awk -F: -v n="$n" '{ d = ($3 - $2) / n; if (d >= 0.05) printf "    %7d: %.2f\n", $1, d }'
    echo "  live blocks of 1-64 KiB per session, by size (rounded up to 64 bytes):"
    join -t: -a2 -e0 -o 0,1.2,2.2 \
        <(field "$a" live_big | tr , '\n' | sort -t: -k1,1) \
        <(field "$b" live_big | tr , '\n' | sort -t: -k1,1) |
        sort -t: -k1,1n | awk -F: -v n="$n" '{ d = ($3 - $2) / n; if (d >= 0.05) printf "    %7d: %.2f\n", $1, d }'
    wait "$idle_pid" || true
    sleep 1
    b=$(snap)
    echo "  after they closed: live heap $(calc "$(delta "$a" "$b" live) / 1024") KiB above the level before"
    exec {INPROC[1]}>&-
    wait "$INPROC_PID" 2>/dev/null || true
}

syscalls() {
    command -v strace >/dev/null || die "strace is needed (apt-get install strace)"
    local n mb
    strace_run() {
        local name=$1
        shift
        taskset -c "$PROXY_CPU" strace -c -f -o "$work/strace-$name.txt" \
            "$bin/postern" serve "${serve_flags[@]}" 2>>"$work/postern.log" &
        local spid=$!
        wait_port "$SMTP_PORT"
        bench "$@" >"$work/$name.json" 2>>"$work/bench.log"
        # strace -o FILE PROG blocks SIGINT itself: stop postern, its child, and strace
        # writes its table when postern has exited.
        kill -INT "$(pgrep -P "$spid")" 2>/dev/null || true
        wait "$spid" 2>/dev/null || true
    }
    # table FILE DIVISOR: calls per unit, largest first.
    table() {
        awk -v d="$2" '$1 ~ /^[0-9.]+$/ && NF >= 5 { name = $NF; calls = $4; if (NF == 5) calls = $4;
            printf "    %-16s %8.2f\n", name, calls / d }' "$1" | sort -k2,2nr | head -12
        awk -v d="$2" '/total/ { printf "    %-16s %8.2f\n", "total", $3 / d }' "$1"
    }
    strace_run hs --sessions "$SESSIONS" -c 8
    n=$(jnum "$work/hs.json" sessions)
    echo "system calls per handshake session ($n sessions; probes and start-up included):"
    table "$work/strace-hs.txt" "$n"
    strace_run bulk -c 8 -d "$BULK_SECS" --size 1048576 --messages-per-conn 0
    mb=$(calc "$(jnum "$work/bulk.json" bytes) / 1e6" 1)
    echo "system calls per relayed MB ($mb MB, 1 MiB messages):"
    table "$work/strace-bulk.txt" "$mb"
}

for part in $PARTS; do
    "$part"
done
