#!/usr/bin/env bash
# Runs hostile clients against ami-agent and nginx serving the same site on loopback, one
# attack at a time on a fresh server, while a prober fetches /version.txt on a new
# connection every 0.5-1 s. Prints, per attack and server, the share of probes served, their
# p99 latency, and the server's RSS before, at its peak during and after the attack.
#
# Usage: bench/hostile.sh [--nonreaders N] [--idle N] [--fd-idle N] [--send-timeout SECS]
#                         [--secs SECS] [--only a,b,c,d] [--no-build]
#   env: NONREADERS (4000), IDLE (5000), FD_IDLE (1500), SEND_TIMEOUT (10),
#        SECS (length of each attack, default 2 x SEND_TIMEOUT + 5), ONLY (a,b,c,d),
#        AMI_AGENT_BIN (use this binary, skip the build).
# Attacks: a) NONREADERS clients GET the 4 MiB file and never read; b) one client reads it
# at 1 byte/s; c) IDLE connections send nothing and reconnect when closed; d) the servers
# under `ulimit -n 1024` with FD_IDLE such idle connections. See bench/README.md.
set -euo pipefail

NONREADERS=${NONREADERS:-4000}
IDLE=${IDLE:-5000}
FD_IDLE=${FD_IDLE:-1500}
SEND_TIMEOUT=${SEND_TIMEOUT:-10}
SECS=${SECS:-}
ONLY=${ONLY:-a,b,c,d}
BUILD=1
# Seconds after the attack's clients are gone before the "after" RSS is read.
SETTLE_SECS=5
# The open-file limit of attack d (both servers; `ulimit -n` sets soft and hard, so the
# agent cannot raise it as it does at start).
LOW_NOFILE=1024

usage() { sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while (($#)); do
    case $1 in
        --nonreaders) NONREADERS=${2:?--nonreaders needs a value}; shift 2 ;;
        --idle) IDLE=${2:?--idle needs a value}; shift 2 ;;
        --fd-idle) FD_IDLE=${2:?--fd-idle needs a value}; shift 2 ;;
        --send-timeout) SEND_TIMEOUT=${2:?--send-timeout needs a value}; shift 2 ;;
        --secs) SECS=${2:?--secs needs a value}; shift 2 ;;
        --only) ONLY=${2:?--only needs a value}; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

die() { echo "error: $*" >&2; exit 1; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
is_uint "$NONREADERS" && ((NONREADERS >= 1 && NONREADERS <= 20000)) || die "NONREADERS must be 1..20000 (got '$NONREADERS')"
is_uint "$IDLE" && ((IDLE >= 1 && IDLE <= 20000)) || die "IDLE must be 1..20000 (got '$IDLE')"
is_uint "$FD_IDLE" && ((FD_IDLE >= 1 && FD_IDLE <= 20000)) || die "FD_IDLE must be 1..20000 (got '$FD_IDLE')"
is_uint "$SEND_TIMEOUT" && ((SEND_TIMEOUT >= 1 && SEND_TIMEOUT <= 120)) || die "SEND_TIMEOUT must be 1..120 s (got '$SEND_TIMEOUT')"
[[ -z $SECS ]] && SECS=$((2 * SEND_TIMEOUT + 5))
is_uint "$SECS" && ((SECS >= 5 && SECS <= 600)) || die "SECS must be 5..600 (got '$SECS')"
[[ $ONLY =~ ^[abcd](,[abcd])*$ ]] || die "--only takes a comma-separated list of a, b, c, d (got '$ONLY')"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CLIENTS=$REPO/bench/hostile_clients.py

# ---------------------------------------------------------------- prerequisites
NGINX=$(command -v nginx || true)
[[ -z $NGINX && -x /usr/sbin/nginx ]] && NGINX=/usr/sbin/nginx
missing=()
[[ -n $NGINX ]] || missing+=(nginx-light)
command -v python3 >/dev/null || missing+=(python3)
command -v curl >/dev/null || missing+=(curl)
if ((${#missing[@]})); then
    sudo=""
    ((EUID == 0)) || sudo="sudo "
    die "missing: ${missing[*]}. Install with: ${sudo}apt-get install -y ${missing[*]}"
fi
for tool in awk mktemp timeout; do
    command -v "$tool" >/dev/null || die "missing the '$tool' command"
done
[[ -f $CLIENTS ]] || die "missing $CLIENTS"

# Every attack connection is a descriptor in the client process: raise this script's soft
# open-file limit (its children inherit it) to what the largest attack needs.
FDS_NEEDED=$(((NONREADERS > IDLE ? NONREADERS : IDLE) + 256))
FD_SOFT_WAS=$(ulimit -Sn)
FD_HARD=$(ulimit -Hn)
if [[ $FD_HARD != unlimited ]] && ((FD_HARD < FDS_NEEDED)); then
    die "the attacks need $FDS_NEEDED open files but the hard limit is $FD_HARD: raise it (e.g. as root: ulimit -Hn $FDS_NEEDED) or use fewer clients"
fi
if [[ $FD_SOFT_WAS != unlimited ]] && ((FD_SOFT_WAS < FDS_NEEDED)); then
    ulimit -Sn "$FDS_NEEDED"
fi
FD_NOTE="open-file limit of this script and its clients: soft $FD_SOFT_WAS -> $(ulimit -Sn) (hard $FD_HARD), for up to $FDS_NEEDED connections"

unset http_proxy HTTP_PROXY https_proxy HTTPS_PROXY all_proxy ALL_PROXY
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
CURL=(curl -sS --noproxy '*' --max-time 5)

# ---------------------------------------------------------------- build
if [[ -n ${AMI_AGENT_BIN:-} ]]; then
    AGENT=$AMI_AGENT_BIN
elif ((BUILD)); then
    command -v cargo >/dev/null || die "cargo not found (needed to build the agent)"
    echo "building ami-agent (release)..." >&2
    (cd "$REPO" && cargo build --release -p agent --quiet)
    AGENT=${CARGO_TARGET_DIR:-$REPO/target}/release/ami-agent
else
    AGENT=${CARGO_TARGET_DIR:-$REPO/target}/release/ami-agent
fi
[[ -x $AGENT ]] || die "no agent binary at $AGENT"

# ---------------------------------------------------------------- cleanup
TMP=$(mktemp -d "${TMPDIR:-/tmp}/ami-hostile.XXXXXX")
SERVER_PID=""
CLIENT_PIDS=()

stop_pid() { # pid signal: signal, wait up to 5 s, then SIGKILL
    local pid=$1 sig=$2 i
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill "-$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

stop_clients() {
    local pid
    for pid in "${CLIENT_PIDS[@]}"; do stop_pid "$pid" TERM; done
    CLIENT_PIDS=()
}

cleanup() {
    set +e
    stop_clients
    stop_pid "$SERVER_PID" TERM
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- the site
SITE=$TMP/site
mkdir -p "$SITE/assets"
printf '<!doctype html>\n<html lang="en"><title>amictl hostile benchmark</title><p>Hello.</p></html>\n' >"$SITE/index.html"
VERSION=bench-hostile-1
echo "$VERSION" >"$SITE/version.txt"
# Exactly 4 MiB of deterministic printable bytes (64 copies of a 64 KiB block).
awk 'BEGIN { srand(42); for (i = 0; i < 65536; i++) printf "%c", 33 + int(rand() * 90) }' >"$TMP/block"
for i in $(seq 1 64); do cat "$TMP/block"; done >"$SITE/assets/huge.bin"
"$AGENT" manifest "$SITE" --version "$VERSION" >"$TMP/manifest.json"

# ---------------------------------------------------------------- servers
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Below the ephemeral range: thousands of client connections use ports from it, and one of
# them can hold a port that a listener would want.
EPHEMERAL_LOW=$(awk '{ print $1 }' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
((EPHEMERAL_LOW > 12000)) || die "the ephemeral port range starts at $EPHEMERAL_LOW: no room for the servers below it"
pick_port() {
    local p i
    for ((i = 0; i < 50; i++)); do
        p=$((10000 + RANDOM % (EPHEMERAL_LOW - 10000)))
        port_in_use "$p" || { echo "$p"; return 0; }
    done
    die "no free loopback port found"
}

wait_ready() { # port pid
    local i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$2" 2>/dev/null || return 1
        "${CURL[@]}" -o /dev/null "http://127.0.0.1:$1/version.txt" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# start_server agent|nginx port nofile ("" = inherit): sets SERVER_PID
start_server() {
    local srv=$1 port=$2 nofile=$3 limit=":"
    [[ -n $nofile ]] && limit="ulimit -n $nofile"
    if [[ $srv == agent ]]; then
        # exec keeps the subshell's pid, so SERVER_PID is the agent itself.
        (eval "$limit" && AMI_AGENT_LOG=warn exec "$AGENT" serve \
            --root "$SITE" --manifest "$TMP/manifest.json" --listen "127.0.0.1:$port" \
            --send-timeout "$SEND_TIMEOUT" \
            --drift-source "http://127.0.0.1:$port/" --drift-interval 3600) \
            2>>"$TMP/agent.log" &
    else
        mkdir -p "$TMP/nginx"
        local user="" temp_paths="client_body_temp_path $TMP/nginx/body;" m v
        ((EUID == 0)) && user="user $(id -un) $(id -gn);"
        v=$("$NGINX" -V 2>&1)
        for m in proxy fastcgi uwsgi scgi; do
            [[ $v == *"--without-http_${m}_module"* ]] || temp_paths+=" ${m}_temp_path $TMP/nginx/$m;"
        done
        # The agent's limits, in nginx's words: 4096 connections, 10 s for a request
        # head, 75 s of keep-alive, the same send timeout.
        cat >"$TMP/nginx/nginx.conf" <<EOF
$user
worker_processes 1;
daemon off;
master_process on;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 4096; }
http {
    types { text/plain txt; text/html html; application/octet-stream bin; }
    default_type application/octet-stream;
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_header_timeout 10s;
    keepalive_timeout 75s;
    send_timeout ${SEND_TIMEOUT}s;
    $temp_paths
    server {
        listen 127.0.0.1:$port;
        root $SITE;
        location / { }
    }
}
EOF
        (eval "$limit" && exec "$NGINX" -p "$TMP/nginx" -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf") \
            2>>"$TMP/nginx/stderr.log" &
    fi
    SERVER_PID=$!
    wait_ready "$port" "$SERVER_PID" || {
        tail -n 20 "$TMP/agent.log" "$TMP/nginx/stderr.log" "$TMP/nginx/error.log" >&2 2>/dev/null
        die "$srv did not start"
    }
}

server_pids() { # the server and its children (nginx's worker)
    echo "$SERVER_PID" $(cat "/proc/$SERVER_PID/task/$SERVER_PID/children" 2>/dev/null || true)
}
rss_kib() {
    local pid total=0
    for pid in $(server_pids); do
        total=$((total + $(awk '$1 == "VmRSS:" { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)))
    done
    echo "$total"
}
sockets() { # the server's open sockets, listener included
    local pid n=0
    for pid in $(server_pids); do
        n=$((n + $(find "/proc/$pid/fd" -lname 'socket:*' 2>/dev/null | wc -l)))
    done
    echo "$n"
}
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
json() { python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); v = d.get(sys.argv[2]); print("-" if v is None else (round(v, 1) if isinstance(v, float) else v))' "$1" "$2"; }
metric() { awk -v m="$2" '$1 == m { print $2; found = 1 } END { if (!found) print "-" }' "$1"; }

# ---------------------------------------------------------------- one attack
# run_attack letter server: appends one report line to $TMP/report
run_attack() {
    local letter=$1 srv=$2 port nofile="" name args before peak=0 peak_socks=0 after socks_after rss socks t0 detail=""
    port=$(pick_port)
    case $letter in
        a) name="$NONREADERS non-readers, 4 MiB"; args=(nonreaders "$port" "$SECS" "$NONREADERS" /assets/huge.bin) ;;
        b) name="1 reader at 1 byte/s"; args=(slowreader "$port" "$SECS" /assets/huge.bin) ;;
        c) name="$IDLE idle, reconnecting"; args=(idle "$port" "$SECS" "$IDLE") ;;
        d) name="$FD_IDLE idle, ulimit -n $LOW_NOFILE"; args=(idle "$port" "$SECS" "$FD_IDLE"); nofile=$LOW_NOFILE ;;
    esac
    echo "  $letter) $name: $srv on port $port for ${SECS}s" >&2
    start_server "$srv" "$port" "$nofile"
    sleep 2 # the agent's first self-check
    before=$(rss_kib)
    python3 "$CLIENTS" prober "$port" "$SECS" "$VERSION" >"$TMP/probe.json" &
    CLIENT_PIDS+=($!)
    python3 "$CLIENTS" "${args[@]}" >"$TMP/attack.json" &
    CLIENT_PIDS+=($!)
    t0=$SECONDS
    while kill -0 "${CLIENT_PIDS[0]}" 2>/dev/null || kill -0 "${CLIENT_PIDS[1]}" 2>/dev/null; do
        rss=$(rss_kib)
        socks=$(sockets)
        ((rss > peak)) && peak=$rss
        ((socks > peak_socks)) && peak_socks=$socks
        ((SECONDS - t0 > SECS + 60)) && die "the $letter) clients did not finish"
        sleep 0.5
    done
    wait "${CLIENT_PIDS[@]}" || die "an attack client failed ($letter, $srv)"
    CLIENT_PIDS=()
    sleep "$SETTLE_SECS"
    after=$(rss_kib)
    socks_after=$(sockets)
    case $letter in
        a) detail="$(json "$TMP/attack.json" connected) connected" ;;
        b) detail="held $(json "$TMP/attack.json" held_s) s" ;;
        c | d) detail="$(json "$TMP/attack.json" connections_opened) opened, $(json "$TMP/attack.json" closed_by_server) closed by server" ;;
    esac
    if [[ $srv == agent ]]; then
        "${CURL[@]}" "http://127.0.0.1:$port/metrics" >"$TMP/metrics" || die "agent: /metrics failed after attack $letter"
        "${CURL[@]}" "http://127.0.0.1:$port/healthz" >"$TMP/healthz" || die "agent: /healthz failed after attack $letter"
        local status
        status=$(python3 -c 'import json, sys; h = json.load(open(sys.argv[1])); c = h.get("last_self_check") or {}; print(h["status"], "ok" if c.get("ok") else "FAILED")' "$TMP/healthz")
        detail+="; rebinds $(metric "$TMP/metrics" ami_agent_listener_rebinds_total), self-check failures $(metric "$TMP/metrics" ami_agent_self_check_failures_total), health ${status% *}, last self-check ${status#* }"
        case $letter in
            a | b) detail+=", send timeouts $(metric "$TMP/metrics" 'ami_agent_connection_timeouts_total{limit="send"}')" ;;
            c) detail+=", evictions $(metric "$TMP/metrics" ami_agent_connection_evictions_total), header timeouts $(metric "$TMP/metrics" 'ami_agent_connection_timeouts_total{limit="header"}')" ;;
            d) detail+=", accept errors $(metric "$TMP/metrics" ami_agent_accept_errors_total), evictions $(metric "$TMP/metrics" ami_agent_connection_evictions_total)" ;;
        esac
    fi
    stop_pid "$SERVER_PID" TERM
    SERVER_PID=""
    local probes served p99
    probes=$(json "$TMP/probe.json" probes)
    served=$(json "$TMP/probe.json" served)
    p99=$(json "$TMP/probe.json" p99_ms)
    printf '%-30s %-6s %5s/%-4s %4s%% %9s %7s %7s %7s %6sx %6s %6s  %s\n' "$letter) $name" "$srv" \
        "$served" "$probes" "$(awk -v s="$served" -v p="$probes" 'BEGIN { printf "%.0f", (p > 0) ? 100 * s / p : 0 }')" \
        "$p99" "$(mib "$before")" "$(mib "$peak")" "$(mib "$after")" \
        "$(awk -v a="$after" -v b="$before" 'BEGIN { printf "%.1f", (b > 0) ? a / b : 0 }')" \
        "$peak_socks" "$socks_after" "$detail" >>"$TMP/report"
}

# ---------------------------------------------------------------- run
echo "ami-agent vs nginx under hostile clients: attacks $ONLY, ${SECS}s each, send timeout ${SEND_TIMEOUT}s" >&2
echo "$FD_NOTE" >&2
: >"$TMP/report"
for letter in ${ONLY//,/ }; do
    for srv in agent nginx; do
        run_attack "$letter" "$srv"
    done
done

echo
echo "== ami-agent vs nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///') under hostile clients, loopback, $(date -u +%Y-%m-%dT%H:%MZ)"
echo "machine:  $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg); servers and clients unpinned"
echo "limits:   send timeout ${SEND_TIMEOUT}s (agent --send-timeout, nginx send_timeout); head 10 s; 4096 connections (agent --max-connections default, nginx 1 worker x worker_connections 4096)"
echo "fds:      $FD_NOTE"
echo "attacks:  ${SECS}s each on a fresh server; prober: new connection every 0.5-1 s, GET /version.txt, 5 s timeout"
echo
printf '%-30s %-6s %10s %5s %9s %7s %7s %7s %7s %6s %6s  %s\n' attack server "probes" "" "p99 ms" "RSS MiB" "peak" "after" "after/" "socks" "socks" "notes"
printf '%-30s %-6s %10s %5s %9s %7s %7s %7s %7s %6s %6s\n' "" "" "served" "" "(served)" "before" "during" "+${SETTLE_SECS}s" "before" "peak" "after"
cat "$TMP/report"
echo
echo "(RSS: VmRSS, nginx master + worker summed; peak sampled every 0.5 s; socks: the server's open sockets, listener included)"
if grep -qE 'WARN|ERROR|panic' "$TMP/agent.log" 2>/dev/null; then
    echo "agent log (warnings and errors of all attacks, last 5):"
    grep -E 'WARN|ERROR|panic' "$TMP/agent.log" | tail -n 5 | sed 's/^/  /'
fi
