#!/usr/bin/env bash
# Side by side on the hot path: direct (one sandbox, the physical limit), agent-activator
# (static backend), nginx (hash $http_x_session_id consistent) and HAProxy (stick table on
# the session header), all in front of the same demo sandboxes on 127.0.0.1, with 1 worker
# each and then 2. One `activator-loadtest hot` invocation per worker count runs all four
# targets interleaved and writes JSON + HTML.
#
# Installs nothing. Needs nginx and HAProxy (Debian: apt-get install nginx haproxy).
#
# Environment: SANDBOXES (default 4), WORKERS (default "1 2"), SCENARIO (default
# loadtest/scenarios/hot-compare.yaml), OUT (default target/loadtest-compare), BASELINE
# (optional: another agent-activator binary, e.g. main's, run as a fifth target `baseline`
# with the same config, for before/after figures in the same interleaved run), ACTIVATOR
# and LOADTEST (both set: use these binaries and build nothing).
# Extra arguments go to activator-loadtest, e.g. `compare.sh --duration 4s --rounds 2`.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
sandboxes=${SANDBOXES:-4}
workers_list=${WORKERS:-"1 2"}
scenario=${SCENARIO:-$root/loadtest/scenarios/hot-compare.yaml}
out=${OUT:-$root/target/loadtest-compare}
target_dir=${CARGO_TARGET_DIR:-$root/target}

missing=()
for bin in nginx haproxy; do
    command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done
if ((${#missing[@]})); then
    echo "compare.sh: missing ${missing[*]}; install them with: apt-get install nginx haproxy" >&2
    exit 1
fi

if [[ -n ${ACTIVATOR:-} && -n ${LOADTEST:-} ]]; then
    # Prebuilt binaries (e.g. copies kept while another build runs): no cargo here.
    activator=$ACTIVATOR
    loadtest=$LOADTEST
else
    echo "building release binaries..." >&2
    (cd "$root" && cargo build --release -p agent-activator -p loadtest --bins) >&2
    activator=$target_dir/release/agent-activator
    loadtest=$target_dir/release/activator-loadtest
fi
baseline=${BASELINE:-}
if [[ -n $baseline && ! -x $baseline ]]; then
    echo "compare.sh: BASELINE=$baseline is not an executable" >&2
    exit 1
fi

run=$(mktemp -d "${TMPDIR:-/tmp}/activator-compare.XXXXXX")
mkdir -p "$out"
pids=()
cleanup() {
    for p in "${pids[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT

# Sets the variable named $1 to a free loopback port, probing upwards from a per-run base
# (no command substitution: the counter must survive between calls).
next_port=$((20000 + ($$ % 20000)))
alloc_port() {
    while (exec 3<>"/dev/tcp/127.0.0.1/$next_port") 2>/dev/null; do
        next_port=$((next_port + 1))
    done
    printf -v "$1" '%s' "$next_port"
    next_port=$((next_port + 1))
}

# Waits up to 10 s for process $2 to listen on 127.0.0.1:$1; fails if it exited.
wait_port() {
    for _ in $(seq 100); do
        kill -0 "$2" 2>/dev/null || break
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "compare.sh: $3 is not listening on 127.0.0.1:$1" >&2
    exit 1
}

# Demo sandboxes on ports the kernel picks; their `listening on` line gives the address.
addrs=()
for i in $(seq "$sandboxes"); do
    "$activator" demo-sandbox --port 0 >"$run/sandbox-$i.out" 2>&1 &
    pids+=($!)
    sandbox_pids+=($!)
    for _ in $(seq 100); do
        grep -qs "listening on" "$run/sandbox-$i.out" && break
        sleep 0.1
    done
    addr=$(sed -n 's/^listening on //p' "$run/sandbox-$i.out" | head -1)
    [[ -n $addr ]] || { echo "compare.sh: sandbox $i did not start" >&2; exit 1; }
    addrs+=("$addr")
done
echo "sandboxes: ${addrs[*]}" >&2

for workers in $workers_list; do
    dir=$run/w$workers
    mkdir -p "$dir"
    alloc_port act_port
    alloc_port admin_port
    alloc_port nginx_port
    alloc_port haproxy_port
    alloc_port base_port
    alloc_port base_admin_port

    endpoints=""
    nginx_servers=""
    haproxy_servers=""
    for i in "${!addrs[@]}"; do
        endpoints+="    - ${addrs[$i]}"$'\n'
        nginx_servers+="        server ${addrs[$i]};"$'\n'
        haproxy_servers+="    server s$i ${addrs[$i]}"$'\n'
    done
    fill() { # template output port extra-placeholder value
        awk -v port="$3" -v admin="$admin_port" -v workers="$workers" -v dir="$dir" \
            -v servers="$4" '
            { gsub(/@PORT@/, port); gsub(/@ADMIN_PORT@/, admin); gsub(/@WORKERS@/, workers);
              gsub(/@DIR@/, dir) }
            /^@(SERVERS|ENDPOINTS)@$/ { printf "%s", servers; next }
            { print }' "$1" >"$2"
    }
    fill "$here/activator.yaml.in" "$dir/activator.yaml" "$act_port" "$endpoints"
    admin_port_main=$admin_port
    admin_port=$base_admin_port
    fill "$here/activator.yaml.in" "$dir/baseline.yaml" "$base_port" "$endpoints"
    admin_port=$admin_port_main
    fill "$here/nginx.conf.in" "$dir/nginx.conf" "$nginx_port" "$nginx_servers"
    fill "$here/haproxy.cfg.in" "$dir/haproxy.cfg" "$haproxy_port" "$haproxy_servers"

    TOKIO_WORKER_THREADS=$workers "$activator" serve -c "$dir/activator.yaml" \
        >"$dir/activator.log" 2>&1 &
    act_pid=$!
    pids+=($act_pid)
    nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/nginx-error.log" >"$dir/nginx.log" 2>&1 &
    nginx_pid=$!
    pids+=($nginx_pid)
    haproxy -f "$dir/haproxy.cfg" -db >"$dir/haproxy.log" 2>&1 &
    haproxy_pid=$!
    pids+=($haproxy_pid)
    base_targets=()
    base_pid=""
    if [[ -n $baseline ]]; then
        TOKIO_WORKER_THREADS=$workers "$baseline" serve -c "$dir/baseline.yaml" \
            >"$dir/baseline.log" 2>&1 &
        base_pid=$!
        pids+=($base_pid)
        wait_port "$base_port" "$base_pid" "baseline agent-activator (see $dir/baseline.log)"
        base_targets=(--target "baseline=http://127.0.0.1:$base_port" --pid "baseline=$base_pid")
    fi
    wait_port "$act_port" "$act_pid" "agent-activator (see $dir/activator.log)"
    wait_port "$nginx_port" "$nginx_pid" "nginx (see $dir/nginx-error.log)"
    wait_port "$haproxy_port" "$haproxy_pid" "haproxy (see $dir/haproxy.log)"
    nginx_workers=$(pgrep -P "$nginx_pid" | paste -sd, -)

    echo "== $workers worker(s): direct, activator, nginx, haproxy ==" >&2
    status=0
    timeout 1800 "$loadtest" hot --scenario "$scenario" \
        --target "direct=http://${addrs[0]}" \
        --target "activator=http://127.0.0.1:$act_port" \
        --target "nginx=http://127.0.0.1:$nginx_port" \
        --target "haproxy=http://127.0.0.1:$haproxy_port" \
        --admin "http://127.0.0.1:$admin_port" \
        --activator-pid "$act_pid" \
        --pid "direct=${sandbox_pids[0]}" \
        --pid "nginx=$nginx_pid${nginx_workers:+,$nginx_workers}" \
        --pid "haproxy=$haproxy_pid" \
        "${base_targets[@]}" \
        --json "$out/compare-w$workers.json" --html "$out/compare-w$workers.html" \
        "$@" || status=$?
    echo "wrote $out/compare-w$workers.json and .html (exit $status)" >&2

    kill "$act_pid" "$nginx_pid" "$haproxy_pid" $base_pid 2>/dev/null || true
    wait "$act_pid" "$nginx_pid" "$haproxy_pid" $base_pid 2>/dev/null || true
    [[ $status -eq 0 ]] || exit "$status"
done
