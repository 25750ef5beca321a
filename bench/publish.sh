#!/usr/bin/env bash
# Uploads the same raw disk images with `amictl image publish` and with `coldsnap upload`
# to a local moto server, the two tools taking turns, and prints the uploader's CPU time
# per GiB and its wall time side by side.
#
# Both tools' defaults put every block in the snapshot, zero blocks included (safe for
# encrypted volumes); --omit adds both tools' opt-in sparse uploads (--omit-zero-blocks).
#
# AWS's endpoints keep HTTP/1.1 connections open between requests and the SDK's client
# pools them; moto's server closes every connection after its response. So by default moto
# sits behind nginx, which keeps the uploaders' connections open as AWS does; --close talks
# to moto directly (a TCP connect per block, in both tools).
#
# Usage: bench/publish.sh [--rounds N] [--no-build] [--no-pin] [--omit] [--close]
#   env: ROUNDS (default 3), BENCH_MIB (image size in MiB, default 1024; or BENCH_GIB),
#        AMICTL_BIN (use this amictl, skip the build), COLDSNAP_BIN (default: coldsnap
#        on PATH), PYTHON (default python3, needs moto and boto3), RUN_TIMEOUT (s, 900).
# See bench/README.md for how to read the output.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
RUN_TIMEOUT=${RUN_TIMEOUT:-900}
PYTHON=${PYTHON:-python3}
BUILD=1
PIN=1
OMIT=0
KEEPALIVE=1
if [[ -n ${BENCH_MIB:-} ]]; then
    MIB=$BENCH_MIB
elif [[ -n ${BENCH_GIB:-} ]]; then
    MIB=$((BENCH_GIB * 1024))
else
    MIB=1024
fi

usage() { sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while (($#)); do
    case $1 in
        --rounds) ROUNDS=${2:?--rounds needs a value}; shift 2 ;;
        --rounds=*) ROUNDS=${1#*=}; shift ;;
        --no-build) BUILD=0; shift ;;
        --no-pin) PIN=0; shift ;;
        --omit | --coldsnap-omit) OMIT=1; shift ;;
        --close) KEEPALIVE=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

die() { echo "error: $*" >&2; exit 1; }
note() { echo "$*" >&2; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
is_uint "$ROUNDS" && ((ROUNDS >= 1 && ROUNDS <= 20)) || die "ROUNDS must be 1..20 (got '$ROUNDS')"
is_uint "$MIB" && ((MIB >= 2 && MIB <= 16384 && MIB % 2 == 0)) ||
    die "the image size must be an even number of MiB, 2..16384 (got '$MIB')"
is_uint "$RUN_TIMEOUT" && ((RUN_TIMEOUT >= 10)) || die "RUN_TIMEOUT must be >= 10 s"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LAUNCHER=$REPO/bench/moto_launcher.py

# ---------------------------------------------------------------- prerequisites
GNU_TIME=/usr/bin/time
if ! "$GNU_TIME" -f '%U' true >/dev/null 2>&1; then
    sudo=""
    ((EUID == 0)) || sudo="sudo "
    die "GNU time is missing at $GNU_TIME. Install it with: ${sudo}apt-get install -y time"
fi
for tool in awk dd head truncate mktemp timeout stat sort; do
    command -v "$tool" >/dev/null || die "missing the '$tool' command"
done
"$PYTHON" -c 'import moto, boto3' 2>/dev/null ||
    die "$PYTHON cannot import moto and boto3. Install them with: $PYTHON -m pip install 'moto[server]' boto3"

NGINX=""
if ((KEEPALIVE)); then
    NGINX=$(command -v nginx || true)
    [[ -z $NGINX && -x /usr/sbin/nginx ]] && NGINX=/usr/sbin/nginx
    if [[ -z $NGINX ]]; then
        sudo=""
        ((EUID == 0)) || sudo="sudo "
        die "nginx is missing (it keeps connections open in front of moto, as AWS does). Install it with: ${sudo}apt-get install -y nginx-light, or pass --close"
    fi
    NGINX_BUILD=$("$NGINX" -V 2>&1) # its modules decide which temp paths it takes
fi

COLDSNAP=${COLDSNAP_BIN:-$(command -v coldsnap || true)}
[[ -n $COLDSNAP && -x $COLDSNAP ]] || die "coldsnap not found. Build it once with
  cargo install coldsnap --root \"\$HOME/.local/coldsnap\"
and run again with COLDSNAP_BIN=\$HOME/.local/coldsnap/bin/coldsnap"
# coldsnap has no --version; its SDK app name ("coldsnap-X.Y.Z") is in the binary.
COLDSNAP_VERSION=$(grep -aom1 'coldsnap-[0-9]\+\.[0-9]\+\.[0-9]\+' "$COLDSNAP" 2>/dev/null || true)
COLDSNAP_VERSION=${COLDSNAP_VERSION:-coldsnap}
COLDSNAP_VERSION=${COLDSNAP_VERSION/-/ }

if [[ -n ${AMICTL_BIN:-} ]]; then
    AMICTL=$AMICTL_BIN
elif ((BUILD)); then
    command -v cargo >/dev/null || die "cargo not found (needed to build amictl)"
    note "building amictl (release)..."
    (cd "$REPO" && cargo build --release -p builder --quiet)
    AMICTL=${CARGO_TARGET_DIR:-$REPO/target}/release/amictl
else
    AMICTL=${CARGO_TARGET_DIR:-$REPO/target}/release/amictl
fi
[[ -x $AMICTL ]] || die "no amictl binary at $AMICTL"
AMICTL_REV=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -n $(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null) ]] && AMICTL_REV+="+changes"
[[ -n ${AMICTL_BIN:-} ]] && AMICTL_REV="prebuilt"

# Only loopback traffic: no proxy, no instance metadata lookups, no profile files.
unset http_proxy HTTP_PROXY https_proxy HTTPS_PROXY all_proxy ALL_PROXY AWS_PROFILE \
    AWS_DEFAULT_PROFILE AWS_SESSION_TOKEN AWS_ROLE_ARN AWS_WEB_IDENTITY_TOKEN_FILE
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
export AWS_EC2_METADATA_DISABLED=true AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1

# ---------------------------------------------------------------- CPUs
mapfile -t CPUS < <(awk '/^Cpus_allowed_list:/ {
    n = split($2, parts, ",")
    for (i = 1; i <= n; i++) {
        if (split(parts[i], r, "-") == 2) { for (c = r[1]; c <= r[2]; c++) print c } else print parts[i]
    }
}' /proc/self/status)
((${#CPUS[@]})) || CPUS=(0)
if ((PIN && ${#CPUS[@]} >= 2)); then
    CLIENT_PIN=(taskset -c "${CPUS[0]}")
    MOTO_PIN=(taskset -c "${CPUS[1]}")
    PIN_NOTE="uploader pinned to CPU ${CPUS[0]}, moto pinned to CPU ${CPUS[1]} (each uploader then runs 1 tokio worker thread)"
else
    CLIENT_PIN=()
    MOTO_PIN=()
    PIN_NOTE="nothing pinned: uploader and moto share ${#CPUS[@]} CPU(s)"
fi
command -v taskset >/dev/null || { CLIENT_PIN=(); MOTO_PIN=(); PIN_NOTE="nothing pinned (no taskset)"; }

# ---------------------------------------------------------------- cleanup
TMP=$(mktemp -d "${TMPDIR:-/tmp}/amictl-publish-bench.XXXXXX")
MOTO_PID=""
UPLOAD_PID=""

stop_pid() { # pid: TERM, wait up to 10 s, then KILL
    local pid=$1 i
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    set +e
    stop_pid "$UPLOAD_PID" # timeout passes the signal on to the uploader
    stop_pid "$FRONT_PID"
    stop_pid "$MOTO_PID"
    MOTO_PID=""
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- moto
MOTO_PORT=""
start_moto() {
    rm -f "$TMP/port"
    # exec: the pid is moto's own, so stopping it needs no process-group games.
    (cd "$TMP" && exec "${MOTO_PIN[@]}" "$PYTHON" "$LAUNCHER" --port 0 --port-file "$TMP/port") \
        >"$TMP/moto.log" 2>&1 &
    MOTO_PID=$!
    local i
    for ((i = 0; i < 1200; i++)); do # up to 120 s: importing moto is slow on a busy machine
        [[ -s $TMP/port ]] && break
        kill -0 "$MOTO_PID" 2>/dev/null || { cat "$TMP/moto.log" >&2; die "moto exited at start"; }
        sleep 0.1
    done
    [[ -s $TMP/port ]] || { cat "$TMP/moto.log" >&2; die "moto did not start within 120 s"; }
    MOTO_PORT=$(<"$TMP/port")
    ENDPOINT_PORT=$MOTO_PORT
    ((KEEPALIVE)) && start_front
    return 0
}

# nginx in front of moto: the uploaders' connections stay open (keepalive_requests,
# keepalive_timeout), each block is buffered in memory and passed on to moto.
FRONT_PID=""
ENDPOINT_PORT=""
EPHEMERAL_LOW=$(awk '{ print $1 }' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
((EPHEMERAL_LOW > 12000)) || EPHEMERAL_LOW=32768
start_front() {
    local dir=$TMP/front port i j nginx_user="" temp_paths m
    mkdir -p "$dir"
    ((EUID == 0)) && nginx_user="user $(id -un) $(id -gn);"
    temp_paths="client_body_temp_path $dir/body;"
    for m in proxy fastcgi uwsgi scgi; do
        [[ $NGINX_BUILD == *"--without-http_${m}_module"* ]] || temp_paths+=" ${m}_temp_path $dir/$m;"
    done
    for ((i = 0; i < 20; i++)); do
        # Below the ephemeral range, where no client connection can hold the port.
        port=$((10000 + RANDOM % (EPHEMERAL_LOW - 10000)))
        cat >"$dir/nginx.conf" <<EOF
$nginx_user
worker_processes 1;
daemon off;
master_process off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    $temp_paths
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_max_body_size 2m;
    client_body_buffer_size 1m;
    proxy_read_timeout 600s;
    server {
        listen 127.0.0.1:$port;
        location / {
            proxy_pass http://127.0.0.1:$MOTO_PORT;
            proxy_set_header Host \$http_host;
        }
    }
}
EOF
        "${MOTO_PIN[@]}" "$NGINX" -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" 2>"$dir/stderr" &
        FRONT_PID=$!
        for ((j = 0; j < 50; j++)); do
            kill -0 "$FRONT_PID" 2>/dev/null || break
            if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
                ENDPOINT_PORT=$port
                return 0
            fi
            sleep 0.1
        done
        stop_pid "$FRONT_PID"
        FRONT_PID=""
        grep -qs "Address already in use" "$dir/stderr" "$dir/error.log" ||
            { cat "$dir/stderr" "$dir/error.log" >&2 2>/dev/null; die "nginx (in front of moto) did not start"; }
    done
    die "no free loopback port for nginx in front of moto"
}
# CPU ticks (user+system) moto's process has used so far, and the seconds per tick.
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
moto_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$MOTO_PID/stat"; }
stop_moto() {
    stop_pid "$FRONT_PID"
    FRONT_PID=""
    stop_pid "$MOTO_PID"
    MOTO_PID=""
}

# ---------------------------------------------------------------- images
BLOCK=524288
BLOCKS=$((MIB * 2)) # 512 KiB blocks per image
FULL=$TMP/full.raw
HALF=$TMP/half-empty.raw
FREE_MIB=$(df -Pm "$TMP" | awk 'NR == 2 { print $4 }')
((FREE_MIB > MIB * 2 + 256)) || die "$TMP has $FREE_MIB MiB free; the images need $((MIB * 2)) MiB (set TMPDIR or BENCH_MIB)"
note "making the images ($MIB MiB each) in $TMP..."
head -c "$((MIB * 1048576))" /dev/urandom >"$FULL"
# Half-empty: 1 MiB of data, then a 1 MiB hole, and so on; the data is copied from the
# full image (random, so no block of it is all zeros).
truncate -s "${MIB}M" "$HALF"
for ((i = 0; i < MIB; i += 2)); do
    dd if="$FULL" of="$HALF" bs=1M count=1 skip="$i" seek="$i" conv=notrunc status=none
done
alloc_mib() { echo $(($(stat -c '%b * %B' "$1") / 1048576)); }
HALF_ALLOC=$(alloc_mib "$HALF")
((HALF_ALLOC <= MIB * 3 / 4)) ||
    note "warning: this filesystem did not keep the half-empty image sparse ($HALF_ALLOC MiB allocated); its holes are read as zeros"

# name file expected-blocks(default uploads) expected-blocks(--omit-zero-blocks uploads)
IMAGES=("full $FULL $BLOCKS $BLOCKS" "half-empty $HALF $BLOCKS $((BLOCKS / 2))")
TOOLS=(amictl coldsnap)
((OMIT)) && TOOLS+=(amictl-omit coldsnap-omit)

# ---------------------------------------------------------------- one upload
RESULTS=$TMP/results.tsv
: >"$RESULTS"
RUN=0

run_one() { # image-name file tool round expected-blocks
    local name=$1 file=$2 tool=$3 round=$4 expect=$5 cmd rc id line times nlines
    local snap nblocks bsize state user sys wall moto_before moto_cpu
    RUN=$((RUN + 1))
    start_moto
    export AWS_ENDPOINT_URL="http://127.0.0.1:$ENDPOINT_PORT"
    case $tool in
        amictl | amictl-omit)
            cmd=("$AMICTL" image publish --image "$file" --boot-mode uefi --arch x86_64
                --no-cache --prefix "bench-$RUN-")
            [[ $tool == amictl-omit ]] && cmd+=(--omit-zero-blocks) ;;
        coldsnap) cmd=("$COLDSNAP" --endpoint "$AWS_ENDPOINT_URL" upload --no-progress "$file") ;;
        coldsnap-omit) cmd=("$COLDSNAP" --endpoint "$AWS_ENDPOINT_URL" upload --no-progress --omit-zero-blocks "$file") ;;
    esac
    cat "$file" >/dev/null # both tools read from the page cache
    moto_before=$(moto_ticks)
    rc=0
    # In the background, so that an interrupt reaches the trap at once (bash runs traps
    # only between commands, and `wait` is one it can leave).
    timeout --kill-after=10 "$RUN_TIMEOUT" "${CLIENT_PIN[@]}" "$GNU_TIME" -f 'TIME %U %S %e' -o "$TMP/time" \
        "${cmd[@]}" >"$TMP/out" 2>"$TMP/err" </dev/null &
    UPLOAD_PID=$!
    wait "$UPLOAD_PID" || rc=$?
    UPLOAD_PID=""
    if ((rc != 0)); then
        tail -20 "$TMP/err" >&2
        ((rc == 124)) && die "$tool on the $name image (round $round) timed out after $RUN_TIMEOUT s"
        die "$tool on the $name image (round $round) failed with exit code $rc"
    fi
    case $tool in
        amictl*)
            nlines=$(grep -c . "$TMP/out" || true)
            ((nlines == 1)) || { cat "$TMP/out" >&2; die "amictl printed $nlines lines, expected only the AMI id"; }
            id=$(<"$TMP/out")
            [[ $id =~ ^ami-[0-9a-f]+$ ]] || die "amictl printed '$id', not an AMI id" ;;
        *) id=$(grep -E '^snap-[0-9a-f]+$' "$TMP/out" | tail -1 || true)
            [[ -n $id ]] || { cat "$TMP/out" "$TMP/err" >&2; die "$tool printed no snapshot id"; } ;;
    esac
    moto_cpu=$(awk -v a="$moto_before" -v b="$(moto_ticks)" -v t="$CLK_TCK" 'BEGIN { printf "%.2f", (b - a) / t }')
    times=$(grep '^TIME ' "$TMP/time" | tail -1)
    [[ -n $times ]] || die "no timing for $tool: $(cat "$TMP/time")"
    # The snapshot must hold exactly the blocks this tool was meant to send.
    line=$("$PYTHON" "$LAUNCHER" blocks --port "$MOTO_PORT" "$id") || die "cannot inspect $id"
    read -r snap nblocks bsize state <<<"$line"
    [[ $bsize == "$BLOCK" ]] || die "moto answered BlockSize $bsize, not $BLOCK: is the launcher's patch in effect?"
    [[ $nblocks == "$expect" ]] || die "$tool: $snap holds $nblocks blocks, expected $expect"
    [[ $state == completed ]] || die "$tool: $snap is $state, not completed"
    stop_moto
    read -r _ user sys wall <<<"$times"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$tool" "$round" "$user" "$sys" "$wall" "$id" "$nblocks" "$moto_cpu" >>"$RESULTS"
    note "  $(printf '%-10s %-13s round %d: user %5.2f s  sys %5.2f s  wall %6.2f s  moto %5.2f s  %s (%s blocks)' \
        "$name" "$tool" "$round" "$user" "$sys" "$wall" "$moto_cpu" "$id" "$nblocks")"
}

# ---------------------------------------------------------------- run
LOAD=$(cut -d' ' -f1 /proc/loadavg)
note "amictl: $AMICTL ($AMICTL_REV)"
note "coldsnap: $COLDSNAP ($COLDSNAP_VERSION)"
note "$PIN_NOTE"
START=$SECONDS
for img in "${IMAGES[@]}"; do
    read -r name file exp_default exp_omit <<<"$img"
    for ((r = 1; r <= ROUNDS; r++)); do
        for tool in "${TOOLS[@]}"; do
            case $tool in
                *-omit) exp=$exp_omit ;;
                *) exp=$exp_default ;;
            esac
            run_one "$name" "$file" "$tool" "$r" "$exp"
        done
    done
done
ELAPSED=$((SECONDS - START))

# ---------------------------------------------------------------- report
if ((KEEPALIVE)); then
    ENDPOINT_NOTE="moto behind nginx, which keeps the uploaders' connections open as AWS does (--close: without)"
else
    ENDPOINT_NOTE="moto's own server, which closes the connection after every response (a TCP connect per block)"
fi
"$PYTHON" - "$RESULTS" "$MIB" "$ROUNDS" "$HALF_ALLOC" "$LOAD" "$ELAPSED" "$PIN_NOTE" "$COLDSNAP_VERSION" "$(nproc)" "$AMICTL_REV" "$ENDPOINT_NOTE" <<'EOF'
import statistics
import sys

path, mib, rounds, half_alloc, load, elapsed, pin_note, coldsnap_version, ncpu, amictl_rev, endpoint_note = sys.argv[1:]
mib, rounds = int(mib), int(rounds)
gib = mib / 1024
rows = [line.rstrip("\n").split("\t") for line in open(path) if line.strip()]

runs = {}
for image, tool, rnd, user, sys_, wall, ident, blocks, moto in rows:
    cpu = float(user) + float(sys_)
    runs.setdefault((image, tool), []).append((cpu / gib, float(wall), int(blocks), float(moto)))

tools = []
for _, tool in runs:
    if tool not in tools:
        tools.append(tool)

print(f"amictl ({amictl_rev}) vs {coldsnap_version}: image upload to moto on 127.0.0.1 (EBS direct APIs, 64 in flight each)")
print(f"images: {mib} MiB raw ({gib:g} GiB); 'full' is random data; 'half-empty' alternates 1 MiB of random data")
print(f"        and a 1 MiB hole ({half_alloc} MiB allocated on disk)")
print(f"endpoint: {endpoint_note}")
print(f"rounds: {rounds} per tool and image, tools alternating, a fresh moto for every upload")
print(f"cpu: {pin_note}; {ncpu} CPUs, load average {load} at start")
print("CPU = user+sys of the uploader process only, per GiB of image size; moto's CPU is not in it (its")
print("      median per upload is in the last column, for reading the wall times)")
print()

w = max(12, 9 * rounds)
head = f"{'image':<11}{'tool':<14}{'blocks':>7}  {'CPU s/GiB per round':<{w}}{'median':>8}   {'wall s per round':<{w}}{'median':>8}  {'moto CPU s':>10}"
print(head)
print("-" * len(head))
med = {}
for (image, tool), rs in runs.items():
    cpus = [r[0] for r in rs]
    walls = [r[1] for r in rs]
    moto = statistics.median(r[3] for r in rs)
    med[(image, tool)] = (statistics.median(cpus), statistics.median(walls))
    cpu_s = " ".join(f"{c:8.3f}" for c in cpus)
    wall_s = " ".join(f"{x:8.2f}" for x in walls)
    print(f"{image:<11}{tool:<14}{rs[0][2]:>7}  {cpu_s:<{w}}{med[(image, tool)][0]:>8.3f}   {wall_s:<{w}}{med[(image, tool)][1]:>8.2f}  {moto:>10.2f}")
print()

def ratio(image, other="coldsnap", ours="amictl"):
    a, c = med.get((image, ours)), med.get((image, other))
    if not a or not c or c[0] <= 0:
        return None, a, c
    return a[0] / c[0], a, c

for image in dict.fromkeys(i for i, _ in runs):
    for ours, other in (("amictl", "coldsnap"), ("amictl-omit", "coldsnap-omit")):
        r, a, c = ratio(image, other, ours)
        if r is not None:
            print(f"ratio {ours}/{other} of median CPU per GiB, {image}: {r:.3f}   (wall: {a[1] / c[1]:.2f})")
print()

# Goal: the defaults (every block uploaded) at most 0.7x coldsnap's CPU per GiB.
for image, label, goal, ok in (
    ("full", "full image", "<= 0.7", lambda r: r <= 0.7),
    ("half-empty", "half-empty image", "<= 0.7", lambda r: r <= 0.7),
):
    r, a, c = ratio(image)
    if r is None:
        print(f"{label}: no figures")
        continue
    verdict = "met" if ok(r) else "not met"
    print(f"{label}: amictl {a[0]:.3f} CPU-s/GiB vs coldsnap {c[0]:.3f} (ratio {r:.2f}) — goal {goal}: {verdict}")
print()
print(f"total benchmark time: {elapsed} s")
EOF
