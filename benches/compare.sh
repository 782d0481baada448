#!/usr/bin/env bash
# Compare postern with nginx's mail proxy on this machine: the same sink behind both, the
# same load from `postern-bench`, the same certificate, the proxy under test pinned to one
# core and the load generator plus sink to another. See benches/README.md.
#
# Knobs (environment):
#   DURATION=10            seconds per load scenario (DURATION=3 for a smoke run)
#   HOLD=10                seconds the idle sessions are held open
#   IDLE=2000              sessions in the idle scenario
#   HS_CONC=32             concurrent connections, handshake scenario
#   BULK_CONC=8            concurrent connections, bulk scenario
#   BULK_SIZE=1048576      message size, bulk scenario
#   ATTACK_CONC=16         attacking connections (failed AUTHs at argon2 cost), attack scenario
#   FLOOR_SECS=2           server CPU-seconds per crypto-floor measurement (FLOOR=0: skip it,
#                          and the relay floor too)
#   KX=x25519              key exchange of the crypto floor (what the load generator negotiates)
#   PROXIES="nginx postern"            which proxies to measure
#   SCENARIOS="idle handshake resumed bulk attack hidden"    which scenarios to run
#       resumed: the handshake scenario with TLS 1.3 session tickets (--tls-resumption)
#       attack:  postern only, the handshake scenario while ATTACK_CONC clients flood
#                failed AUTHs for an argon2id user
#       hidden:  postern only, what the options cost: bulk with --strict-data, handshake
#                and bulk with --xclient (the sink then offers XCLIENT)
#   PROXY_CPU=0 LOAD_CPU=1 cores for the proxy, and for the load generator and sink
#   PORT_BASE=25800        seven consecutive loopback ports from here
#   SPIN=1                 keep both cores awake with SCHED_IDLE busy loops (see below)
#   KEEP=1                 keep the work directory (configs, logs, JSON, recorded mail)
#   POSTERN_EXTRA="..."    extra flags for `postern serve`
#   BENCH_EXTRA="..."      extra flags for every `postern-bench` run
#   POSTERN_BIN=path       measure this postern build as the proxy (A/B a change); the
#                          load generator is still this tree's build
#
# Everything listens on 127.0.0.1 only. Needs root only to install nginx if it is missing.
set -euo pipefail

DURATION=${DURATION:-10}
HOLD=${HOLD:-10}
IDLE=${IDLE:-2000}
HS_CONC=${HS_CONC:-32}
BULK_CONC=${BULK_CONC:-8}
BULK_SIZE=${BULK_SIZE:-1048576}
ATTACK_CONC=${ATTACK_CONC:-16}
FLOOR=${FLOOR:-1}
FLOOR_SECS=${FLOOR_SECS:-2}
KX=${KX:-x25519}
PROXIES=${PROXIES:-nginx postern}
SCENARIOS=${SCENARIOS:-idle handshake resumed bulk attack hidden}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PORT_BASE=${PORT_BASE:-25800}
POSTERN_EXTRA=${POSTERN_EXTRA:-}
SPIN=${SPIN:-0}
BENCH_EXTRA=${BENCH_EXTRA:-}

SINK_PORT=$PORT_BASE
AUTH_PORT=$((PORT_BASE + 1))
NGINX_SMTP=$((PORT_BASE + 2))
NGINX_SMTPS=$((PORT_BASE + 3))
POSTERN_SMTP=$((PORT_BASE + 4))
POSTERN_SMTPS=$((PORT_BASE + 5))
FORWARD_PORT=$((PORT_BASE + 6))

# The bench user. Passed through the environment so it stays out of `ps`.
bench_auth=bench:bench-secret
export POSTERN_BENCH_AUTH=$bench_auth

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$repo/target}
postern=$target_dir/release/postern
proxy_bin=${POSTERN_BIN:-$postern}
bench_bin=$target_dir/release/postern-bench
sink=$target_dir/release/postern-bench-sink
floor_bin=$target_dir/release/postern-bench-floor
forward_bin=$target_dir/release/postern-bench-forward
hz=$(getconf CLK_TCK)

work=$(mktemp -d -t postern-compare.XXXXXX)
pids=()

log() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'compare.sh: %s\n' "$*" >&2
    exit 1
}

cleanup() {
    local pid
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if [[ -n ${KEEP:-} ]]; then
        log "work directory kept: $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

# --- prerequisites -------------------------------------------------------------------

mail_module() {
    dpkg -L libnginx-mod-mail 2>/dev/null | grep -m1 '/ngx_mail_module\.so$' || true
}

ensure_nginx() {
    if ! command -v nginx >/dev/null || [[ -z $(mail_module) ]]; then
        log "installing nginx-light and libnginx-mod-mail"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y nginx-light libnginx-mod-mail >/dev/null ||
            { apt-get update >/dev/null && apt-get install -y nginx-light libnginx-mod-mail >/dev/null; } ||
            die "could not install nginx-light libnginx-mod-mail"
    fi
    # The package may have started the distribution's nginx; it would not be pinned.
    [[ -n $(mail_module) ]] || die "ngx_mail_module.so not found"
}

build() {
    log "building postern and the postern-bench tools (release)"
    (cd "$repo" && cargo build --release --quiet --bin postern --bin postern-bench \
        --bin postern-bench-sink --bin postern-bench-floor --bin postern-bench-forward)
}

make_certs() {
    # P-256 ECDSA, the same certificate and key for both proxies.
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$work/key.pem" -out "$work/cert.pem" -days 2 -subj /CN=localhost \
        -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
        -addext basicConstraints=critical,CA:FALSE -addext extendedKeyUsage=serverAuth 2>/dev/null
    printf 'bench:{PLAIN}bench-secret\n' >"$work/users"
    # The attack scenario's target: a failed AUTH for this user costs an argon2id verify
    # (Dovecot's defaults, 64 MiB and ~0.1 s). Its password is "secret"; the attackers
    # never send it.
    printf '%s\n' 'attacker:{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$x8cApe1EfAGc4ozjzjYR0w$ahZZ0PtVJTaYwSnOF4ddxA0Mtn0ETmK8ya2o0VecKx4' >>"$work/users"
}

# --- processes -----------------------------------------------------------------------

# On virtual machines an idle vCPU halts, and waking it takes the host's scheduler
# milliseconds (measured here: p99 of a plain loopback SMTP transaction 3-16 ms instead of
# 0.1-0.2 ms). Every message crosses cores twice, so without this the run measures vCPU
# wake-up latency, not the proxies. A busy loop at SCHED_IDLE runs only when nothing else
# wants the core, so it takes no CPU from the processes measured, and CPU is accounted per
# process anyway. SPIN=0 measures the machine as it is.
start_spinners() {
    local cpu
    for cpu in "$PROXY_CPU" "$LOAD_CPU"; do
        chrt --idle 0 taskset -c "$cpu" sh -c 'while :; do :; done' &
        pids+=("$!")
    done
}

wait_port() {
    local port=$1
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    die "nothing listening on 127.0.0.1:$port (see logs in $work; KEEP=1 keeps them)"
}

sink_pid=
start_sink() {
    taskset -c "$LOAD_CPU" "$sink" --listen "127.0.0.1:$SINK_PORT" "$@" >>"$work/sink.log" 2>&1 &
    sink_pid=$!
    pids+=("$sink_pid")
    wait_port "$SINK_PORT"
}

stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

proxy_pid=
start_proxy() {
    case $1 in
    nginx)
        sed -e "s|@MAIL_MODULE@|$(mail_module)|" -e "s|@WORK@|$work|g" \
            -e "s|@CERT@|$work/cert.pem|" -e "s|@KEY@|$work/key.pem|" \
            -e "s|@AUTH_PORT@|$AUTH_PORT|g" -e "s|@SINK_PORT@|$SINK_PORT|" \
            -e "s|@SMTP_PORT@|$NGINX_SMTP|" -e "s|@SMTPS_PORT@|$NGINX_SMTPS|" \
            -e "s|@CONNECTIONS@|$((2 * IDLE + 1024))|" -e "s|@NOFILE@|$((4 * IDLE + 4096))|" \
            "$here/nginx.conf.template" >"$work/nginx.conf"
        taskset -c "$PROXY_CPU" nginx -p "$work/" -c "$work/nginx.conf" -e "$work/nginx-error.log" &
        proxy_pid=$!
        pids+=("$proxy_pid")
        wait_port "$NGINX_SMTP"
        ;;
    postern)
        # All load comes from 127.0.0.1, and postern's per-IP limit (default 50) would
        # refuse most of the idle sessions, its verifier share per network (default 2)
        # would answer 454 to most concurrent AUTHs; nginx has neither. Set through the
        # environment so that POSTERN_BIN builds without the flags still start.
        # shellcheck disable=SC2086 # POSTERN_EXTRA is a list of flags
        POSTERN_MAX_CONNECTIONS_PER_IP=1000000 POSTERN_MAX_VERIFICATIONS_PER_NETWORK=1000000 \
            taskset -c "$PROXY_CPU" "$proxy_bin" serve \
            --listen "127.0.0.1:$POSTERN_SMTP" --listen-tls "127.0.0.1:$POSTERN_SMTPS" \
            --backend "127.0.0.1:$SINK_PORT" --cert "$work/cert.pem" --key "$work/key.pem" \
            --users "$work/users" --hostname bench.invalid --log-level warn \
            $POSTERN_EXTRA >>"$work/postern.log" 2>&1 &
        proxy_pid=$!
        pids+=("$proxy_pid")
        wait_port "$POSTERN_SMTP"
        ;;
    esac
}

smtp_port() {
    case $1 in
    nginx) echo "$NGINX_SMTP" ;;
    forward) echo "$FORWARD_PORT" ;;
    *) echo "$POSTERN_SMTP" ;;
    esac
}
smtps_port() { if [[ $1 == nginx ]]; then echo "$NGINX_SMTPS"; else echo "$POSTERN_SMTPS"; fi; }

# The proxy's processes: nginx's master and its workers; postern is one process.
proxy_pids() {
    echo "$proxy_pid"
    pgrep -P "$proxy_pid" || true
}

# User+system CPU ticks of the given processes (all threads), /proc/PID/stat 14 and 15.
cpu_ticks() {
    local pid total=0 t
    for pid in "$@"; do
        # Drop "pid (comm) " first: comm may contain spaces.
        t=$(sed 's/^.*) //' "/proc/$pid/stat" | awk '{print $12 + $13}') || t=0
        total=$((total + t))
    done
    echo "$total"
}

rss_kib() {
    local pid total=0 r
    for pid in "$@"; do
        r=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status") || r=0
        total=$((total + r))
    done
    echo "$total"
}

now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.${2:-1}f\", $1 }"; }

# --- postern-bench and its JSON ------------------------------------------------------

bench() {
    # shellcheck disable=SC2086 # BENCH_EXTRA is a list of flags
    taskset -c "$LOAD_CPU" "$bench_bin" --ca "$work/cert.pem" --quiet --json $BENCH_EXTRA "$@"
}

# jnum FILE KEY [OBJECT]: a number from the summary JSON, top level or inside OBJECT.
jnum() {
    local scope
    if [[ -n ${3:-} ]]; then
        scope=$(grep -o "\"$3\":{[^}]*}" "$1")
    else
        scope=$(cat "$1")
    fi
    grep -o "\"$2\":[-0-9.]*" <<<"$scope" | head -1 | cut -d: -f2
}

declare -A R
declare -A F

# run_load PROXY SCENARIO ARGS...: one timed bench run with CPU accounting.
run_load() {
    local proxy=$1 scenario=$2 out
    shift 2
    out=$work/$proxy-$scenario.json
    local -a ppids
    mapfile -t ppids < <(proxy_pids)
    local p0 s0 t0 p1 s1 t1 wall
    p0=$(cpu_ticks "${ppids[@]}")
    s0=$(cpu_ticks "$sink_pid")
    t0=$(now)
    bench --target "127.0.0.1:$(smtp_port "$proxy")" "$@" >"$out" 2>>"$work/bench.log"
    t1=$(now)
    p1=$(cpu_ticks "${ppids[@]}")
    s1=$(cpu_ticks "$sink_pid")
    wall=$(calc "$t1 - $t0" 3)
    R[$proxy.$scenario.proxy_cpu]=$(calc "($p1 - $p0) / $hz / $wall * 100" 0)
    R[$proxy.$scenario.sink_cpu]=$(calc "($s1 - $s0) / $hz / $wall * 100" 0)
    R[$proxy.$scenario.client_cpu]=$(calc "$(jnum "$out" client_cpu_s) / $wall * 100" 0)
    R[$proxy.$scenario.proxy_cpu_s]=$(calc "($p1 - $p0) / $hz" 2)
    R[$proxy.$scenario.errors]=$(jnum "$out" errors_total)
    log "$proxy $scenario: $(head -c 400 "$out")"
}

# handshake_run PROXY NAME [BENCH ARGS...]: the handshake load, results under NAME.
handshake_run() {
    local proxy=$1 name=$2 out=$work/$1-$2.json
    shift 2
    run_load "$proxy" "$name" -c "$HS_CONC" -d "$DURATION" --size 1024 --messages-per-conn 1 "$@"
    R[$proxy.$name.rate]=$(calc "$(jnum "$out" sessions_per_s)" 0)
    R[$proxy.$name.p50]=$(calc "$(jnum "$out" p50 handshake_ms)" 2)
    R[$proxy.$name.p99]=$(calc "$(jnum "$out" p99 handshake_ms)" 2)
    # What one fully used core would do: the rate divided by the share of a core used.
    R[$proxy.$name.per_core]=$(calc "$(jnum "$out" sessions) / ${R[$proxy.$name.proxy_cpu_s]}" 0)
    R[$proxy.$name.us_per_session]=$(calc "${R[$proxy.$name.proxy_cpu_s]} * 1e6 / $(jnum "$out" sessions)" 0)
    # "tls":"TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519": the key exchange is the last word.
    R[$proxy.$name.kx]=$(sed -n 's/.*"tls":"[^"]* \([^" ]*\)".*/\1/p' "$out")
}

# bulk_run PROXY NAME [BENCH ARGS...]: the bulk load, results under NAME.
bulk_run() {
    local proxy=$1 name=$2 out=$work/$1-$2.json
    shift 2
    run_load "$proxy" "$name" -c "$BULK_CONC" -d "$DURATION" --size "$BULK_SIZE" --messages-per-conn 0 "$@"
    R[$proxy.$name.rate]=$(calc "$(jnum "$out" mb_per_s)" 0)
    R[$proxy.$name.p50]=$(calc "$(jnum "$out" p50 message_ms)" 2)
    R[$proxy.$name.p99]=$(calc "$(jnum "$out" p99 message_ms)" 2)
    R[$proxy.$name.per_core]=$(calc "$(jnum "$out" bytes) / 1e6 / ${R[$proxy.$name.proxy_cpu_s]}" 0)
}

scenario_handshake() { handshake_run "$1" handshake; }

# Mail clients reconnect for every send: with the tickets of an earlier session the
# server skips its certificate signature (TLS 1.3 still does the key exchange).
scenario_resumed() { handshake_run "$1" resumed --tls-resumption; }

scenario_bulk() { bulk_run "$1" bulk; }

# The attack scenario: the handshake load while ATTACK_CONC clients send wrong
# passwords for an argon2id user, each a full session (TLS handshake, AUTH, 535 after
# the failure delay, reconnect). The attackers connect from 127.0.0.2, another network
# than the legitimate clients. postern's per-IP and per-user failure limits would soon
# answer them 454 without a verify; they are lifted to measure the worst case, a flood
# from many networks where every attempt pays for an argon2 verify (64 MiB, ~0.1 s).
# nginx is skipped: its auth_http in this setup accepts every password.
scenario_attack() {
    local proxy=$1
    [[ $proxy == postern ]] || return 0
    stop_pid "$proxy_pid"
    POSTERN_MAX_AUTH_FAILURES_PER_IP=1000000 POSTERN_MAX_AUTH_FAILURES_PER_USER=1000000 \
        start_proxy postern
    bench --target "127.0.0.1:$POSTERN_SMTP" --sessions 1 >/dev/null 2>>"$work/bench.log"
    POSTERN_BENCH_AUTH=attacker:not-the-password \
        bench --target "127.0.0.1:$POSTERN_SMTP" --source 127.0.0.2 \
        -c "$ATTACK_CONC" -d "$((DURATION + 4))" \
        --messages-per-conn 1 >"$work/attacker.json" 2>>"$work/bench.log" &
    local attacker=$!
    pids+=("$attacker")
    sleep 2 # the flood is under way before the measurement starts
    handshake_run "$proxy" attack
    wait "$attacker" || true
    R[$proxy.attack.attempts]=$(jnum "$work/attacker.json" errors_total)
    R[$proxy.attack.attempts_per_s]=$(calc "${R[$proxy.attack.attempts]:-0} / ($DURATION + 4)" 1)
    stop_pid "$proxy_pid"
    start_proxy postern
}

# What postern's options cost, next to the plain figures: --strict-data (bulk) and
# --xclient (handshake and bulk; the sink offers XCLIENT for it).
scenario_hidden() {
    local proxy=$1
    [[ $proxy == postern ]] || return 0
    local extra=$POSTERN_EXTRA
    stop_pid "$proxy_pid"
    POSTERN_EXTRA="$extra --strict-data" start_proxy postern
    bulk_run "$proxy" bulk_strict
    stop_pid "$proxy_pid"
    stop_pid "$sink_pid"
    start_sink --xclient
    POSTERN_EXTRA="$extra --xclient" start_proxy postern
    handshake_run "$proxy" handshake_xclient
    bulk_run "$proxy" bulk_xclient
    stop_pid "$proxy_pid"
    stop_pid "$sink_pid"
    start_sink
    start_proxy postern
}

# The crypto floor on the proxies' core: TLS server work alone, in memory.
run_floor() {
    local out=$work/floor.json
    taskset -c "$PROXY_CPU" "$floor_bin" --cert "$work/cert.pem" --key "$work/key.pem" \
        --kx "$KX" -d "$FLOOR_SECS" --json >"$out" 2>>"$work/bench.log" ||
        die "crypto floor failed (see $work/bench.log)"
    F[full]=$(calc "$(jnum "$out" full_handshakes_per_cpu_s)" 0)
    F[resumed]=$(calc "$(jnum "$out" resumed_handshakes_per_cpu_s)" 0)
    F[open]=$(calc "$(jnum "$out" open_mb_per_cpu_s)" 0)
    F[seal]=$(calc "$(jnum "$out" seal_mb_per_cpu_s)" 0)
    F[aead_open]=$(calc "$(jnum "$out" aead_open_mb_per_cpu_s)" 0)
    F[aead_seal]=$(calc "$(jnum "$out" aead_seal_mb_per_cpu_s)" 0)
    F[client_us]=$(calc "$(jnum "$out" client_us_per_full_handshake)" 0)
    log "crypto floor: $(cat "$out")"
}

# The relay floor on the proxies' core: postern-bench-forward, which only copies bytes,
# between the load generator and the sink, loaded with plain sessions (no TLS, no AUTH) of
# the handshake and bulk shapes. Each shape gets the buffer that suits it (see the tool's
# --buffer: for bulk, writes of one loopback MSS), so the floor is the cheapest relay of
# that load.
run_relay_floor() {
    local shape buffer
    unset POSTERN_BENCH_AUTH # the sink offers no AUTH
    for shape in handshake bulk; do
        buffer=8192
        [[ $shape == bulk ]] && buffer=65483
        taskset -c "$PROXY_CPU" "$forward_bin" --listen "127.0.0.1:$FORWARD_PORT" \
            --to "127.0.0.1:$SINK_PORT" --buffer "$buffer" >>"$work/forward.log" 2>&1 &
        proxy_pid=$!
        pids+=("$proxy_pid")
        wait_port "$FORWARD_PORT"
        "${shape}_run" forward "$shape" --mode plain
        stop_pid "$proxy_pid"
    done
    export POSTERN_BENCH_AUTH=$bench_auth
    # A proxy that spent only the two floors: their costs per session (per MB) add up.
    F[ceiling_full]=$(calc "1 / (1 / ${F[full]} + 1 / ${R[forward.handshake.per_core]})" 0)
    F[ceiling_open]=$(calc "1 / (1 / ${F[open]} + 1 / ${R[forward.bulk.per_core]})" 0)
}

# Two rounds: the first fills fresh memory, which the allocator hands out untouched (calloc
# of never-used pages costs no RSS until written); the second reuses what the first freed,
# as a long-running proxy always does. The second is the steady-state cost. Both are
# measured against the RSS before the first round.
scenario_idle() {
    idle_round "$1" 1
    idle_round "$1" 2
}

idle_round() {
    local proxy=$1 round=$2 out=$work/$1-idle$2.json err=$work/$1-idle$2.err
    local -a ppids
    mapfile -t ppids < <(proxy_pids)
    local before after established
    before=$(rss_kib "${ppids[@]}")
    bench --target "127.0.0.1:$(smtp_port "$proxy")" --idle "$IDLE" -c 32 -d "$HOLD" >"$out" 2>"$err" &
    local bench_pid=$!
    pids+=("$bench_pid")
    for _ in $(seq 1200); do
        grep -qs '^idle: .* holding' "$err" && break
        kill -0 "$bench_pid" 2>/dev/null || break
        sleep 0.1
    done
    grep -qs '^idle: .* holding' "$err" || die "$proxy idle: sessions never established: $(cat "$err")"
    sleep 1 # let the last sessions' buffers settle
    mapfile -t ppids < <(proxy_pids)
    after=$(rss_kib "${ppids[@]}")
    established=$(sed -n 's/^idle: \([0-9]*\) sessions established.*/\1/p' "$err")
    wait "$bench_pid" || die "$proxy idle: bench failed: $(cat "$err")"
    sleep 1 # sessions closed: let the proxy free them before the next round
    R[$proxy.idle.held]=$established
    R[$proxy.idle.rss_before$round]=$(calc "$before / 1024" 1)
    R[$proxy.idle.rss_after$round]=$(calc "$after / 1024" 1)
    # Both rounds count from the baseline before round 1: memory the first round kept
    # (allocator caches) is memory the proxy needs to hold that many sessions.
    [[ $round == 1 ]] && R[$proxy.idle.base]=$before
    R[$proxy.idle.rate$round]=$(calc "($after - ${R[$proxy.idle.base]}) / ($established > 0 ? $established : 1)" 1)
    R[$proxy.idle.errors]=$(($(jnum "$out" errors_total) + ${R[$proxy.idle.errors]:-0}))
    log "$proxy idle round $round: $established sessions, RSS ${R[$proxy.idle.rss_before$round]} -> ${R[$proxy.idle.rss_after$round]} MiB"
}

# --- byte-exact check ----------------------------------------------------------------

# Sends messages through a proxy to a recording sink and compares what arrived, byte for
# byte, with what was sent: the DATA payloads and the whole post-AUTH client stream.
check_bytes() {
    local proxy=$1 rec=$work/record sent=$work/sent.data expected=$work/expected.stream
    rm -rf "$rec" && mkdir -p "$rec"
    start_sink --record "$rec"
    start_proxy "$proxy"
    # 70001 bytes: several TLS records, an odd size, lines that need dot-stuffing.
    bench --target "127.0.0.1:$(smtp_port "$proxy")" --mode starttls -c 1 --sessions 2 \
        --messages-per-conn 2 --size 70001 --dump-message "$sent" >"$work/$proxy-check.json" 2>>"$work/bench.log"
    bench --target "127.0.0.1:$(smtps_port "$proxy")" --mode tls -c 1 --sessions 1 \
        --messages-per-conn 2 --size 70001 >>"$work/$proxy-check.json" 2>>"$work/bench.log"
    stop_pid "$proxy_pid"
    stop_pid "$sink_pid"

    {
        for _ in 1 2; do
            printf 'MAIL FROM:<bench@example.test>\r\nRCPT TO:<sink@example.test>\r\nDATA\r\n'
            cat "$sent"
        done
        printf 'QUIT\r\n'
    } >"$expected"
    local f n=0 streams=0 off
    for f in "$rec"/conn-*-msg-*.data; do
        [[ -e $f ]] || continue
        cmp -s "$f" "$sent" || die "$proxy: $f differs from what was sent (KEEP=1 to inspect)"
        n=$((n + 1))
    done
    [[ $n -eq 6 ]] || die "$proxy: expected 6 messages at the sink, found $n"
    for f in "$rec"/conn-*.raw; do
        # Backend probes (EHLO, QUIT) carry no mail; sessions start at their first MAIL.
        off=$(grep -boa -m1 'MAIL FROM:' "$f" | cut -d: -f1) || continue
        [[ -n $off ]] || continue
        tail -c "+$((off + 1))" "$f" | cmp -s - "$expected" ||
            die "$proxy: relayed stream in $f differs from what the client sent"
        streams=$((streams + 1))
    done
    [[ $streams -eq 3 ]] || die "$proxy: expected 3 relayed sessions, found $streams"
    log "$proxy: byte-exact: 6 messages of $(stat -c %s "$sent") bytes and 3 sessions identical"
}

# --- report --------------------------------------------------------------------------

ratio() {
    local a=${R[nginx.$1]:-} b=${R[postern.$1]:-}
    if [[ -n $a && -n $b ]] && awk "BEGIN { exit !($a > 0) }"; then
        calc "$b / $a" 2
    else
        echo "-"
    fi
}

row() {
    printf '| %-9s | %-34s | %10s | %10s | %7s |\n' "$1" "$2" "${R[nginx.$3]:--}" "${R[postern.$3]:--}" "$(ratio "$3")"
}

report() {
    local cpu
    cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
    echo
    echo "Machine: $cpu, $(nproc) cores, Linux $(uname -r); proxy on core $PROXY_CPU," \
        "load generator and sink on core $LOAD_CPU"
    echo "nginx $(nginx -v 2>&1 | sed 's|.*/||'), $(openssl version | cut -d' ' -f1-2);" \
        "postern $(git -C "$repo" describe --always --dirty 2>/dev/null || echo unknown)"
    echo "DURATION=${DURATION}s HS_CONC=$HS_CONC BULK_CONC=$BULK_CONC BULK_SIZE=$BULK_SIZE IDLE=$IDLE SPIN=$SPIN"
    echo
    printf '| %-9s | %-34s | %10s | %10s | %7s |\n' scenario metric nginx postern ratio
    printf '|%s|%s|%s|%s|%s|\n' ----------- ------------------------------------ ------------ ------------ ---------
    if [[ " $SCENARIOS " == *" handshake "* ]]; then
        row handshake "sessions/s (as clients see it)" handshake.rate
        row handshake "sessions per proxy CPU-second" handshake.per_core
        row handshake "handshake p50 ms" handshake.p50
        row handshake "handshake p99 ms" handshake.p99
        row handshake "proxy CPU %" handshake.proxy_cpu
        row handshake "load generator CPU %" handshake.client_cpu
        row handshake "sink CPU %" handshake.sink_cpu
        row handshake "errors" handshake.errors
    fi
    if [[ " $SCENARIOS " == *" resumed "* ]]; then
        row resumed "sessions/s (as clients see it)" resumed.rate
        row resumed "sessions per proxy CPU-second" resumed.per_core
        row resumed "proxy CPU us per session" resumed.us_per_session
        row handshake "proxy CPU us per session (full)" handshake.us_per_session
        row resumed "handshake p99 ms" resumed.p99
        row resumed "errors" resumed.errors
    fi
    if [[ " $SCENARIOS " == *" bulk "* ]]; then
        row bulk "MB/s (as clients see it)" bulk.rate
        row bulk "MB per proxy CPU-second" bulk.per_core
        row bulk "message p50 ms" bulk.p50
        row bulk "message p99 ms" bulk.p99
        row bulk "proxy CPU %" bulk.proxy_cpu
        row bulk "load generator CPU %" bulk.client_cpu
        row bulk "sink CPU %" bulk.sink_cpu
        row bulk "errors" bulk.errors
    fi
    if [[ " $SCENARIOS " == *" idle "* ]]; then
        row idle "sessions held" idle.held
        row idle "proxy RSS before, MiB" idle.rss_before1
        row idle "proxy RSS holding them, MiB" idle.rss_after1
        row idle "RSS per session, first fill, KiB" idle.rate1
        row idle "RSS after they closed, MiB" idle.rss_before2
        row idle "RSS holding them again, MiB" idle.rss_after2
        row idle "RSS per session, steady state, KiB" idle.rate2
        row idle "errors" idle.errors
    fi
    echo
    echo "ratio = postern / nginx (higher is better for rates, lower for ms, CPU and RSS)."
    if [[ " $SCENARIOS " == *" attack "* || " $SCENARIOS " == *" hidden "* ]]; then
        echo
        echo "postern alone (attack: $ATTACK_CONC connections flooding failed AUTHs for an argon2id user):"
        echo
        printf '| %-34s | %10s | %10s |\n' metric plain "with it"
        printf '|%s|%s|%s|\n' ------------------------------------ ------------ ------------
    fi
    if [[ " $SCENARIOS " == *" attack "* ]]; then
        prow "attack: sessions/s" handshake.rate attack.rate
        prow "attack: sessions per proxy CPU-s" handshake.per_core attack.per_core
        prow "attack: handshake p50 ms" handshake.p50 attack.p50
        prow "attack: handshake p99 ms" handshake.p99 attack.p99
        prow "attack: proxy CPU %" handshake.proxy_cpu attack.proxy_cpu
        prow "attack: failed AUTH sessions/s" - attack.attempts_per_s
        prow "attack: legitimate errors" handshake.errors attack.errors
    fi
    if [[ " $SCENARIOS " == *" hidden "* ]]; then
        prow "--strict-data: bulk MB per CPU-s" bulk.per_core bulk_strict.per_core
        prow "--xclient: sessions per CPU-s" handshake.per_core handshake_xclient.per_core
        prow "--xclient: handshake p50 ms" handshake.p50 handshake_xclient.p50
        prow "--xclient: bulk MB per CPU-s" bulk.per_core bulk_xclient.per_core
    fi
    [[ -n ${F[full]:-} ]] || return 0
    echo
    echo "The crypto floor: TLS 1.3 AES-256-GCM, $KX, the same certificate, server side"
    echo "only, in memory on core $PROXY_CPU (postern-bench-floor). Negotiated in the handshake" \
        "scenario: nginx ${R[nginx.handshake.kx]:-?}, postern ${R[postern.handshake.kx]:-?}."
    echo
    printf '| %-42s | %9s | %9s | %9s | %7s | %9s |\n' measure floor nginx postern "nginx/F" "postern/F"
    printf '|%s|%s|%s|%s|%s|%s|\n' -------------------------------------------- ----------- ----------- ----------- --------- -----------
    frow "full handshakes per CPU-second" full handshake.per_core
    frow "resumed handshakes per CPU-second" resumed resumed.per_core
    frow "MB opened per CPU-second (16 KiB records)" open bulk.per_core
    frow "MB sealed per CPU-second (16 KiB records)" seal -
    frow "AES-256-GCM alone, MB opened per CPU-second" aead_open -
    frow "AES-256-GCM alone, MB sealed per CPU-second" aead_seal -
    echo
    echo "x/F is the share of the TLS-only rate a proxy reaches (1.00: nothing but TLS). A"
    echo "session also carries SMTP, AUTH, a backend connection and the kernel's TCP work."
    echo "Bulk is set against records opened: the client's bytes are decrypted once and go"
    echo "to a plain backend. The floor's client spends ${F[client_us]} us per full handshake."
    [[ -n ${F[ceiling_full]:-} ]] || return 0
    echo
    echo "The relay floor: postern-bench-forward (copies bytes, nothing else) on core $PROXY_CPU,"
    echo "plain sessions of the same shapes. The ceiling is a proxy that spent the crypto floor"
    echo "and the relay floor and nothing more; the TLS session has more exchanges than the"
    echo "plain one, so no TLS proxy on this machine reaches it."
    echo
    printf '| %-34s | %9s | %9s | %9s | %9s | %9s | %9s | %10s |\n' measure crypto relay ceiling nginx postern "postern/C" "2.5x nginx"
    printf '|%s|%s|%s|%s|%s|%s|%s|%s|\n' ------------------------------------ ----------- ----------- ----------- ----------- ----------- ----------- ------------
    crow "full handshakes per CPU-second" full handshake ceiling_full
    crow "MB per CPU-second (bulk)" open bulk ceiling_open
}

# crow LABEL FLOOR_KEY SCENARIO CEILING_KEY: a row of the relay-floor table.
crow() {
    local c=${F[$4]} n=${R[nginx.$3.per_core]:-} p=${R[postern.$3.per_core]:-} fp=- goal=-
    [[ -n $p ]] && fp=$(calc "$p / $c" 2)
    [[ -n $n ]] && goal=$(calc "$n * 2.5" 0)
    printf '| %-34s | %9s | %9s | %9s | %9s | %9s | %9s | %10s |\n' "$1" "${F[$2]}" \
        "${R[forward.$3.per_core]}" "$c" "${n:--}" "${p:--}" "$fp" "$goal"
}

# prow LABEL KEY_PLAIN KEY_WITH: a postern-only row.
prow() { printf '| %-34s | %10s | %10s |\n' "$1" "${R[postern.$2]:--}" "${R[postern.$3]:--}"; }

# frow LABEL FLOOR_KEY RESULT_KEY: a row of the floor table.
frow() {
    local f=${F[$2]} n=${R[nginx.$3]:-} p=${R[postern.$3]:-} fn=- fp=-
    [[ -n $n ]] && fn=$(calc "$n / $f" 2)
    [[ -n $p ]] && fp=$(calc "$p / $f" 2)
    printf '| %-42s | %9s | %9s | %9s | %7s | %9s |\n' "$1" "$f" "${n:--}" "${p:--}" "$fn" "$fp"
}

# --- main ----------------------------------------------------------------------------

ulimit -n "$(ulimit -Hn)" # 2000 idle sessions need ~4000 descriptors per process
ensure_nginx
build
make_certs
log "work directory: $work"
if [[ $FLOOR == 1 ]]; then run_floor; fi
load=$(cut -d' ' -f1 /proc/loadavg)
if awk "BEGIN { exit !($load > 0.5) }"; then
    log "warning: load average $load: other processes use the CPU, numbers will be noisy"
fi
[[ $SPIN == 1 ]] && start_spinners

for proxy in $PROXIES; do
    check_bytes "$proxy"
done

start_sink
if [[ $FLOOR == 1 ]]; then run_relay_floor; fi
for proxy in $PROXIES; do
    log "measuring $proxy"
    start_proxy "$proxy"
    # One session first, so the idle baseline includes a warmed-up process.
    bench --target "127.0.0.1:$(smtp_port "$proxy")" --sessions 1 >/dev/null 2>>"$work/bench.log"
    for scenario in $SCENARIOS; do
        "scenario_$scenario" "$proxy"
    done
    stop_pid "$proxy_pid"
done
report
