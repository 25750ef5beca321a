#!/usr/bin/env bash
# Serves the same small site with ami-agent and with nginx on loopback, loads each with
# wrk in alternation, and prints throughput, p99 latency and peak memory side by side.
#
# Usage: bench/serve.sh [--rounds N] [--duration SECS] [--cores 1|2] [--no-build]
#   env: ROUNDS (default 3), DURATION (default 10), CORES (default 1),
#        CONNECTIONS (default 64), AMI_AGENT_BIN (use this binary, skip the build).
# See bench/README.md for how to read the output.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CORES=${CORES:-1}
CONNECTIONS=${CONNECTIONS:-64}
WARMUP_SECS=2
BUILD=1

usage() { sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while (($#)); do
    case $1 in
        --rounds) ROUNDS=${2:?--rounds needs a value}; shift 2 ;;
        --rounds=*) ROUNDS=${1#*=}; shift ;;
        --duration) DURATION=${2:?--duration needs a value}; shift 2 ;;
        --duration=*) DURATION=${1#*=}; shift ;;
        --cores) CORES=${2:?--cores needs a value}; shift 2 ;;
        --cores=*) CORES=${1#*=}; shift ;;
        --no-build) BUILD=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

die() { echo "error: $*" >&2; exit 1; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
is_uint "$ROUNDS" && ((ROUNDS >= 1 && ROUNDS <= 20)) || die "ROUNDS must be 1..20 (got '$ROUNDS')"
is_uint "$DURATION" && ((DURATION >= 1 && DURATION <= 120)) || die "DURATION must be 1..120 s (got '$DURATION')"
is_uint "$CONNECTIONS" && ((CONNECTIONS >= 1 && CONNECTIONS <= 1000)) || die "CONNECTIONS must be 1..1000"
[[ $CORES == 1 || $CORES == 2 ]] || die "--cores must be 1 or 2 (got '$CORES')"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# ---------------------------------------------------------------- prerequisites
NGINX=$(command -v nginx || true)
[[ -z $NGINX && -x /usr/sbin/nginx ]] && NGINX=/usr/sbin/nginx
missing=()
[[ -n $NGINX ]] || missing+=(nginx-light)
command -v wrk >/dev/null || missing+=(wrk)
command -v curl >/dev/null || missing+=(curl)
command -v taskset >/dev/null || missing+=(util-linux)
if ((${#missing[@]})); then
    sudo=""
    ((EUID == 0)) || sudo="sudo "
    die "missing: ${missing[*]}. Install with: ${sudo}apt-get install -y ${missing[*]}"
fi
for tool in awk cmp sort mktemp timeout; do
    command -v "$tool" >/dev/null || die "missing the '$tool' command"
done

# Only loopback traffic: make sure no proxy setting can send a request elsewhere (curl
# here, and the agent's own health and drift probes).
unset http_proxy HTTP_PROXY https_proxy HTTPS_PROXY all_proxy ALL_PROXY
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
CURL=(curl -sS --noproxy '*' --max-time 5)

# ---------------------------------------------------------------- CPUs
# The CPUs this script may use (normally 0..N-1; a cpuset can make them others).
mapfile -t CPUS < <(awk '/^Cpus_allowed_list:/ {
    n = split($2, parts, ",")
    for (i = 1; i <= n; i++) {
        if (split(parts[i], r, "-") == 2) { for (c = r[1]; c <= r[2]; c++) print c } else print parts[i]
    }
}' /proc/self/status)
((${#CPUS[@]})) || CPUS=(0)
NCPU=${#CPUS[@]}
S_CPU=${CPUS[0]}
C_CPU=""
if ((NCPU < 2)); then
    CORES=1
    SERVER_PIN=()
    WRK_PIN=()
    WORKERS=1
    PIN_NOTE="only 1 CPU: servers and wrk run unpinned and compete for it; figures are indicative only"
elif ((CORES == 1)); then
    C_CPU=${CPUS[1]}
    SERVER_PIN=(taskset -c "$S_CPU")
    WRK_PIN=(taskset -c "$C_CPU")
    WORKERS=1
    PIN_NOTE="servers pinned to CPU $S_CPU (nginx: 1 worker, agent: 1 tokio worker), wrk pinned to CPU $C_CPU"
else
    SERVER_PIN=(taskset -c "${CPUS[0]},${CPUS[1]}")
    WRK_PIN=()
    WORKERS=2
    PIN_NOTE="servers on CPUs ${CPUS[0]},${CPUS[1]} (nginx: 2 workers, agent: 2 tokio workers), wrk unpinned (shares them)"
fi
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
NBENCH_CPUS=$((NCPU >= 2 ? 2 : 1))

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
TMP=$(mktemp -d "${TMPDIR:-/tmp}/ami-bench.XXXXXX")
AGENT_PID=""
NGINX_PID=""

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

cleanup() {
    set +e
    stop_pid "$AGENT_PID" TERM
    stop_pid "$NGINX_PID" TERM # nginx master: fast shutdown, takes its workers along
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- the site
SITE=$TMP/site
mkdir -p "$SITE/assets"
{
    printf '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    printf '<title>amictl benchmark</title>\n<link rel="stylesheet" href="/assets/site.css">\n</head>\n<body>\n'
    for i in $(seq 1 14); do
        printf '<p>Paragraph %02d of the benchmark page, a typical small static document.</p>\n' "$i"
    done
    printf '</body>\n</html>\n'
} >"$SITE/index.html"
echo "bench-1" >"$SITE/version.txt"
# Exactly 4 KiB of CSS (no `| head -c`: that would SIGPIPE the writer under pipefail).
css=""
for i in $(seq 1 80); do
    css+=$(printf '.rule-%03d { margin: 0 auto; padding: 1px; color: #123; }' "$i")$'\n'
done
printf '%s' "${css:0:4096}" >"$SITE/assets/site.css"
# Exactly 64 KiB of deterministic printable bytes, and 4 MiB (the size class of the
# site's source.zip) made of 64 copies of it.
awk 'BEGIN { srand(42); for (i = 0; i < 65536; i++) printf "%c", 33 + int(rand() * 90) }' >"$SITE/assets/big.bin"
for i in $(seq 1 64); do cat "$SITE/assets/big.bin"; done >"$SITE/assets/huge.bin"

size_of() { wc -c <"$1" | tr -d ' '; }
"$AGENT" manifest "$SITE" --version bench-1 >"$TMP/manifest.json"

# ---------------------------------------------------------------- ports
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Below the ephemeral range, as in hostile.sh: a client connection (wrk's, or one left from
# an earlier run) can hold an ephemeral port that a listener would want, and connecting to
# it does not show that.
EPHEMERAL_LOW=$(awk '{ print $1 }' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
((EPHEMERAL_LOW > 12000)) || die "the ephemeral port range starts at $EPHEMERAL_LOW: no room for the servers below it"
pick_port() {
    local p i
    for ((i = 0; i < 50; i++)); do
        p=$((10000 + RANDOM % (EPHEMERAL_LOW - 10000)))
        [[ $p == "${1:-}" ]] && continue
        port_in_use "$p" || { echo "$p"; return 0; }
    done
    die "no free loopback port found"
}
AGENT_PORT=$(pick_port)
NGINX_PORT=$(pick_port "$AGENT_PORT")

wait_ready() { # name port pid
    local i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$3" 2>/dev/null || return 1
        "${CURL[@]}" -o /dev/null "http://127.0.0.1:$2/version.txt" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# ---------------------------------------------------------------- start ami-agent
AMI_AGENT_LOG=warn "${SERVER_PIN[@]}" "$AGENT" serve \
    --root "$SITE" --manifest "$TMP/manifest.json" \
    --listen "127.0.0.1:$AGENT_PORT" --max-connections 4096 \
    --drift-source "http://127.0.0.1:$AGENT_PORT/" --drift-interval 3600 \
    2>"$TMP/agent.log" &
AGENT_PID=$!
wait_ready agent "$AGENT_PORT" "$AGENT_PID" || { cat "$TMP/agent.log" >&2; die "ami-agent did not start"; }

vm_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
sleep 1 # let the first self-check and drift probe finish
AGENT_IDLE_HWM=$(vm_kib "$AGENT_PID" VmHWM)
AGENT_IDLE_RSS=$(vm_kib "$AGENT_PID" VmRSS)
AGENT_THREADS=$(vm_kib "$AGENT_PID" Threads)

# ---------------------------------------------------------------- start nginx
mkdir -p "$TMP/nginx"
nginx_user=""
if ((EUID == 0)); then
    # Run the workers as the invoking user, not nginx's compiled-in default.
    nginx_user="user $(id -un) $(id -gn);"
fi
nginx_v=$("$NGINX" -V 2>&1)
temp_paths="client_body_temp_path $TMP/nginx/body;"
for m in proxy fastcgi uwsgi scgi; do
    [[ $nginx_v == *"--without-http_${m}_module"* ]] || temp_paths+=" ${m}_temp_path $TMP/nginx/$m;"
done
cat >"$TMP/nginx/nginx.conf" <<EOF
$nginx_user
worker_processes $WORKERS;
daemon off;
master_process on;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 4096; }
http {
    types {
        text/html html;
        text/css css;
        text/plain txt;
        application/octet-stream bin;
    }
    default_type application/octet-stream;
    charset utf-8;
    charset_types text/html text/css text/plain;
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 10000000;
    keepalive_timeout 65s;
    open_file_cache max=64 inactive=60s;
    $temp_paths
    server {
        listen 127.0.0.1:$NGINX_PORT;
        root $SITE;
        index index.html;
        location / { }
    }
}
EOF
"${SERVER_PIN[@]}" "$NGINX" -p "$TMP/nginx" -e "$TMP/nginx/error.log" -c "$TMP/nginx/nginx.conf" \
    2>"$TMP/nginx/stderr.log" &
NGINX_PID=$!
wait_ready nginx "$NGINX_PORT" "$NGINX_PID" || {
    cat "$TMP/nginx/stderr.log" "$TMP/nginx/error.log" >&2 2>/dev/null
    die "nginx did not start"
}

nginx_pids() { # master and its workers
    local kids
    kids=$(cat "/proc/$NGINX_PID/task/$NGINX_PID/children" 2>/dev/null || pgrep -P "$NGINX_PID" || true)
    echo "$NGINX_PID" $kids
}

# ---------------------------------------------------------------- verify
BENCH_PATHS=(/index.html /assets/big.bin /assets/huge.bin)
CHECK_PATHS=(/ /index.html /version.txt /assets/site.css /assets/big.bin /assets/huge.bin)
declare -A HDR_BYTES
for path in "${CHECK_PATHS[@]}"; do
    file=${path#/}
    [[ -z $file ]] && file=index.html
    for srv in agent nginx; do
        port=$AGENT_PORT
        [[ $srv == nginx ]] && port=$NGINX_PORT
        out=$TMP/check.$srv
        code=$("${CURL[@]}" -o "$out" -D "$out.h" -w '%{http_code}' "http://127.0.0.1:$port$path") \
            || die "$srv: GET $path failed"
        [[ $code == 200 ]] || die "$srv: GET $path returned $code, expected 200"
        HDR_BYTES[$srv$path]=$(size_of "$out.h")
    done
    cmp -s "$TMP/check.agent" "$TMP/check.nginx" || die "GET $path: agent and nginx bodies differ"
    cmp -s "$TMP/check.agent" "$SITE/$file" || die "GET $path: body differs from the file on disk"
done

# ---------------------------------------------------------------- load
# CPU ticks (user + system) used so far by the given processes, all their threads.
proc_ticks() {
    local pid total=0
    for pid; do
        total=$((total + $(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$pid/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}
# "busy total" ticks of one CPU since boot (idle and iowait are not busy).
cpu_ticks() {
    awk -v c="cpu$1" '$1 == c { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat
}
# Busy % of the benchmark CPUs over a 1 s sample: what else runs on this machine.
background_busy() {
    local cpus=("${CPUS[@]:0:2}") a=() b=() i busy=0 total=0
    for i in "${cpus[@]}"; do a+=("$(cpu_ticks "$i")"); done
    sleep 1
    for i in "${!cpus[@]}"; do
        b=($(cpu_ticks "${cpus[$i]}"))
        read -r -a x <<<"${a[$i]}"
        busy=$((busy + b[0] - x[0]))
        total=$((total + b[1] - x[1]))
    done
    awk -v b="$busy" -v t="$total" 'BEGIN { printf "%.0f", (t > 0) ? 100 * b / t : 0 }'
}
# user + nice + system ticks of the benchmark CPUs: all the process time spent on them.
proc_time_on_cpus() {
    local total=0 i
    for i in "${CPUS[@]:0:2}"; do
        total=$((total + $(awk -v c="cpu$i" '$1 == c { print $2 + $3 + $4 }' /proc/stat)))
    done
    echo "$total"
}
# CPU ticks used by this shell's finished children (wrk, once it has been waited for).
children_ticks() {
    times | awk -v hz="$CLK_TCK" 'NR == 2 {
        t = 0
        for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] }
        printf "%.0f", t * hz
    }'
}
server_pids() { if [[ $1 == agent ]]; then echo "$AGENT_PID"; else nginx_pids; fi; }

# run_wrk server path secs -> "req_per_sec p99_ms errors server_cpu% client_cpu% other_cpu%"
# server_cpu% is the server processes' CPU time over wall time (100 = one CPU busy);
# client_cpu% is how busy wrk's CPU was (softirq included), "-" when wrk is not pinned;
# other_cpu% is process time on the benchmark CPUs used by anything else (another build, say),
# as a share of those CPUs: above a few percent, that round is not trustworthy.
run_wrk() {
    local srv=$1 path=$2 secs=$3 port=$AGENT_PORT out pids t0 t1 p0 p1 c0 c1 k0 k1 a0 a1 srv_pct other_pct cli_pct="-"
    [[ $srv == nginx ]] && port=$NGINX_PORT
    out=$TMP/wrk.out
    pids=$(server_pids "$srv")
    # shellcheck disable=SC2086
    p0=$(proc_ticks $pids)
    [[ -n $C_CPU ]] && c0=$(cpu_ticks "$C_CPU")
    k0=$(children_ticks)
    a0=$(proc_time_on_cpus)
    t0=$EPOCHREALTIME
    timeout $((secs + 30)) "${WRK_PIN[@]}" wrk -t1 "-c$CONNECTIONS" "-d${secs}s" --latency \
        "http://127.0.0.1:$port$path" >"$out" 2>&1 || { cat "$out" >&2; die "wrk failed against $srv $path"; }
    t1=$EPOCHREALTIME
    a1=$(proc_time_on_cpus)
    k1=$(children_ticks)
    # shellcheck disable=SC2086
    p1=$(proc_ticks $pids)
    # Process time on the benchmark CPUs that was neither the server's nor wrk's.
    other_pct=$(awk -v all=$((a1 - a0)) -v mine=$((p1 - p0 + k1 - k0)) -v hz="$CLK_TCK" \
        -v n="$NBENCH_CPUS" -v a="$t0" -v b="$t1" \
        'BEGIN { o = 100 * (all - mine) / hz / (b - a) / n; printf "%.0f", (o < 0) ? 0 : o }')
    srv_pct=$(awk -v d=$((p1 - p0)) -v hz="$CLK_TCK" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", 100 * d / hz / (b - a) }')
    if [[ -n $C_CPU ]]; then
        c1=$(cpu_ticks "$C_CPU")
        cli_pct=$(awk -v x="$c0" -v y="$c1" 'BEGIN { split(x, a, " "); split(y, b, " ");
            printf "%.0f", (b[2] > a[2]) ? 100 * (b[1] - a[1]) / (b[2] - a[2]) : 0 }')
    fi
    awk -v sp="$srv_pct" -v cp="$cli_pct" -v op="$other_pct" '
        /Requests\/sec:/ { rps = $2 }
        /^[ \t]+99%/ {
            v = $2; unit = v; sub(/^[0-9.]+/, "", unit); sub(/[a-z]+$/, "", v)
            f = (unit == "us") ? 0.001 : (unit == "ms") ? 1 : (unit == "s") ? 1000 : (unit == "m") ? 60000 : 1
            p99 = v * f
        }
        /Non-2xx or 3xx responses:/ { err += $NF }
        /Socket errors:/ { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) { x = $i; sub(",", "", x); err += x } }
        END { if (rps == "") exit 1; printf "%s %.3f %d %s %s %s\n", rps, p99, err, sp, cp, op }
    ' "$out" || { cat "$out" >&2; die "cannot parse wrk output ($srv $path)"; }
}

median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

total=$((${#BENCH_PATHS[@]} * (2 * WARMUP_SECS + 2 * ROUNDS * DURATION)))
echo "ami-agent vs nginx: ${#BENCH_PATHS[@]} paths x $ROUNDS rounds x ${DURATION}s each, wrk -t1 -c$CONNECTIONS (about ${total}s of load)" >&2
echo "cpus: $PIN_NOTE" >&2

BG_BEFORE=$(background_busy)
declare -A RPS P99 ERRS SCPU CCPU EFF
MAX_OTHER=0
for path in "${BENCH_PATHS[@]}"; do
    for srv in agent nginx; do
        echo "  warm-up  $srv $path (${WARMUP_SECS}s)" >&2
        run_wrk "$srv" "$path" "$WARMUP_SECS" >/dev/null
    done
    for ((r = 1; r <= ROUNDS; r++)); do
        for srv in agent nginx; do
            res=$(run_wrk "$srv" "$path" "$DURATION")
            read -r rps p99 err scpu ccpu other <<<"$res"
            echo "  round $r  $srv $path: $rps req/s, p99 ${p99} ms, server cpu ${scpu}%, wrk cpu ${ccpu}%, other ${other}%" >&2
            ((other > MAX_OTHER)) && MAX_OTHER=$other
            RPS[$srv$path]+="$rps "
            P99[$srv$path]+="$p99 "
            SCPU[$srv$path]+="$scpu "
            EFF[$srv$path]+="$(awk -v r="$rps" -v c="$scpu" 'BEGIN { printf "%.0f", (c > 0) ? r * 100 / c : 0 }') "
            CCPU[$srv$path]+="$ccpu "
            ERRS[$srv$path]=$((${ERRS[$srv$path]:-0} + err))
        done
    done
done

BG_AFTER=$(background_busy)

# ---------------------------------------------------------------- memory, after all load
aff() { awk '/^Cpus_allowed_list:/ { print $2 }' "/proc/$1/status" 2>/dev/null; }
kib_to_mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
AGENT_HWM=$(vm_kib "$AGENT_PID" VmHWM)
NGINX_HWM=0
nginx_procs=0
for pid in $(nginx_pids); do
    NGINX_HWM=$((NGINX_HWM + $(vm_kib "$pid" VmHWM)))
    nginx_procs=$((nginx_procs + 1))
done

# ---------------------------------------------------------------- report
echo
echo "== ami-agent vs nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///'), loopback, $(date -u +%Y-%m-%dT%H:%MZ)"
echo "cpus:     $NCPU usable; $PIN_NOTE"
echo "affinity: agent $(aff "$AGENT_PID") ($AGENT_THREADS threads at start), nginx $(for p in $(nginx_pids); do printf '%s ' "$(aff "$p")"; done)(master, workers)"
echo "load:     wrk -t1 -c$CONNECTIONS -d${DURATION}s --latency, $ROUNDS rounds alternating agent/nginx, ${WARMUP_SECS}s warm-up each"
echo "site:     index.html $(size_of "$SITE/index.html") B, version.txt $(size_of "$SITE/version.txt") B," \
    "assets/site.css $(size_of "$SITE/assets/site.css") B, assets/big.bin $(size_of "$SITE/assets/big.bin") B," \
    "assets/huge.bin $(size_of "$SITE/assets/huge.bin") B"
echo "idle:     benchmark CPUs ${BG_BEFORE}% busy before the load, ${BG_AFTER}% after (1 s samples, servers idle);" \
    "other processes used at most ${MAX_OTHER}% of them during a round"
if ((BG_BEFORE > 10 || BG_AFTER > 10 || MAX_OTHER > 5)); then
    echo "WARNING:  something else is using the CPUs: these figures are unreliable; rerun on a quiet machine"
fi
for path in "${BENCH_PATHS[@]}"; do
    echo "headers:  $path response head: agent ${HDR_BYTES[agent$path]} B, nginx ${HDR_BYTES[nginx$path]} B"
done
echo

rounds_hdr=""
for ((r = 1; r <= ROUNDS; r++)); do rounds_hdr+=$(printf '%9s' "round$r"); done
printf '%-16s %-6s%s %10s %8s %9s %8s %8s %10s\n' path server "$rounds_hdr" "median" "p99 ms" "agent/ngx" "srv cpu" "wrk cpu" "req/cpu-s"
declare -A MED MEFF
for path in "${BENCH_PATHS[@]}"; do
    for srv in agent nginx; do
        # shellcheck disable=SC2086
        MED[$srv$path]=$(median ${RPS[$srv$path]})
        # shellcheck disable=SC2086
        MEFF[$srv$path]=$(median ${EFF[$srv$path]})
    done
    ratio=$(awk -v a="${MED[agent$path]}" -v n="${MED[nginx$path]}" 'BEGIN { printf "%.2f", (n > 0) ? a / n : 0 }')
    for srv in agent nginx; do
        cols=""
        for v in ${RPS[$srv$path]}; do cols+=$(printf '%9.0f' "$v"); done
        # shellcheck disable=SC2086
        p99=$(median ${P99[$srv$path]})
        r=""
        [[ $srv == agent ]] && r=$ratio
        # shellcheck disable=SC2086
        scpu=$(printf '%.0f%%' "$(median ${SCPU[$srv$path]})")
        ccpu=-
        # shellcheck disable=SC2086
        [[ -n $C_CPU ]] && ccpu=$(printf '%.0f%%' "$(median ${CCPU[$srv$path]})")
        printf '%-16s %-6s%s %10.0f %8.2f %9s %8s %8s %10.0f\n' "$path" "$srv" "$cols" "${MED[$srv$path]}" "$p99" "$r" "$scpu" "$ccpu" "${MEFF[$srv$path]}"
        if ((${ERRS[$srv$path]} > 0)); then
            echo "  warning: $srv $path had ${ERRS[$srv$path]} socket errors or non-2xx responses"
        fi
    done
done
echo "(req/s per round and their median; p99 ms, srv cpu, wrk cpu and req/cpu-s are medians over the rounds;"
echo " srv cpu = server processes' CPU time / wall time, 100% = one CPU; wrk cpu = load of wrk's CPU;"
echo " req/cpu-s = requests per second of server CPU time: the cost per request, which background load disturbs least)"
small=${BENCH_PATHS[0]}
awk -v a="${MEFF[agent$small]}" -v n="${MEFF[nginx$small]}" 'BEGIN {
    printf "efficiency small files: agent %.0f vs nginx %.0f requests per CPU-second (ratio %.2f)\n", a, n, (n > 0) ? a / n : 0
}'
echo

echo "memory:   agent idle, 1 s after start, before any load: VmHWM $(kib_to_mib "$AGENT_IDLE_HWM") MiB, VmRSS $(kib_to_mib "$AGENT_IDLE_RSS") MiB"
echo "memory:   peak RSS after all load (VmHWM): agent $(kib_to_mib "$AGENT_HWM") MiB," \
    "nginx $(kib_to_mib "$NGINX_HWM") MiB (master + $((nginx_procs - 1)) worker(s), summed)"
echo

if [[ -s $TMP/agent.log ]]; then
    echo "agent log (warnings and errors, last 5 lines):"
    tail -n 5 "$TMP/agent.log" | sed 's/^/  /'
    echo
fi

a=${MED[agent$small]}
n=${MED[nginx$small]}
# The goal is 1.2x nginx (issue #13). Near it, wrk's own core saturates too (see `wrk cpu`):
# then both this ratio and the one per CPU-second above are floors of what the agent can do.
awk -v a="$a" -v n="$n" 'BEGIN {
    r = (n > 0) ? a / n : 0
    printf "throughput small files: agent %.0f req/s vs nginx %.0f req/s (ratio %.2f) — goal >= 1.2: %s\n",
        a, n, r, (r >= 1.2) ? "met" : "not met"
}'
# Large files: on loopback wrk usually saturates its own CPU first (see `wrk cpu`), so the
# req/s ratio says whether the agent keeps up; req/cpu-s says what each response costs.
for path in "${BENCH_PATHS[@]:1}"; do
    awk -v p="$path" -v a="${MED[agent$path]}" -v n="${MED[nginx$path]}" \
        -v ea="${MEFF[agent$path]}" -v en="${MEFF[nginx$path]}" 'BEGIN {
        r = (n > 0) ? a / n : 0
        printf "throughput %s: agent %.0f req/s vs nginx %.0f req/s (ratio %.2f), requests per CPU-second ratio %.2f — goal >= 1.0 (within 5%%: a tie): %s\n",
            p, a, n, r, (en > 0) ? ea / en : 0, (r >= 1.0) ? "met" : (r >= 0.95) ? "tie" : "not met"
    }'
done
awk -v k="$AGENT_HWM" 'BEGIN {
    m = k / 1024
    printf "agent peak RSS %.1f MiB — goal < 20 MiB: %s\n", m, (m < 20) ? "met" : "not met"
}'
