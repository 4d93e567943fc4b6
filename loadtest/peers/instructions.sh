#!/usr/bin/env bash
# User-space instructions per proxied request, counted by valgrind's callgrind: a figure the
# machine's load does not move (other processes change how long an instruction takes, not
# how many there are), so it decides comparisons on a shared machine where throughput
# cannot. Kernel work (the loopback TCP both legs pay) is not counted: compare.sh's CPU per
# request covers it.
#
# One demo sandbox; each target in turn (agent-activator, optionally BASELINE, nginx
# with `master_process off`, HAProxy with `nbthread 1`) runs under callgrind with one
# worker, gets a warm-up, has its counters zeroed, serves a fixed wrk run (keep-alive GETs,
# SESSIONS session IDs rotated over CONNECTIONS connections), and is dumped; the total
# instruction count (Ir) divided by the requests wrk completed is the figure. The
# configurations are compare.sh's (loadtest/peers/*.in).
#
# Environment: ACTIVATOR (default target/release/agent-activator), BASELINE (optional
# second activator binary), SESSIONS (64), CONNECTIONS (8), DURATION (seconds per target, 10), OUT
# (target/loadtest-instructions), SKIP_PEERS (set: activators only). Needs valgrind, wrk, nginx, haproxy; installs nothing.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
activator=${ACTIVATOR:-$root/target/release/agent-activator}
baseline=${BASELINE:-}
sessions=${SESSIONS:-64}
connections=${CONNECTIONS:-8}
seconds=${DURATION:-10}
out=${OUT:-$root/target/loadtest-instructions}
for bin in valgrind callgrind_control wrk nginx haproxy; do
    command -v "$bin" >/dev/null || { echo "instructions.sh: $bin is missing" >&2; exit 1; }
done
mkdir -p "$out"
run=$(mktemp -d "${TMPDIR:-/tmp}/activator-instr.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

"$activator" demo-sandbox --port 0 >"$run/sandbox.out" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -qs "listening on" "$run/sandbox.out" && break; sleep 0.1; done
sandbox=$(sed -n 's/^listening on //p' "$run/sandbox.out" | head -1)
[[ -n $sandbox ]] || { echo "instructions.sh: the sandbox did not start" >&2; exit 1; }

cat >"$run/sessions.lua" <<EOF
local n = 0
request = function()
    n = n + 1
    return wrk.format("GET", "/", { ["X-Session-ID"] = "instr-session-" .. (n % $sessions) })
end
EOF

port=$((30000 + ($$ % 20000)))
fill() { # template output
    awk -v port="$port" -v admin="$((port + 1))" -v dir="$run" -v servers="$3" '
        { gsub(/@PORT@/, port); gsub(/@ADMIN_PORT@/, admin); gsub(/@WORKERS@/, 1);
          gsub(/@DIR@/, dir) }
        /^@(SERVERS|ENDPOINTS)@$/ { printf "%s", servers; next }
        { print }' "$1" >"$2"
}
fill "$here/activator.yaml.in" "$run/activator.yaml" "    - $sandbox"$'\n'
fill "$here/nginx.conf.in" "$run/nginx.conf" "        server $sandbox;"$'\n'
fill "$here/haproxy.cfg.in" "$run/haproxy.cfg" "    server s0 $sandbox"$'\n'

# measure NAME COMMAND...: runs COMMAND under callgrind and prints NAME, requests, Ir/request.
measure() {
    local name=$1
    shift
    local cg="$out/callgrind.$name"
    rm -f "$cg".*
    valgrind --tool=callgrind --callgrind-out-file="$cg.%p" "$@" >"$run/$name.log" 2>&1 &
    local pid=$!
    for _ in $(seq 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    wrk -t1 -c"$connections" -d3s -s "$run/sessions.lua" "http://127.0.0.1:$port/" >/dev/null
    callgrind_control -z "$pid" >/dev/null
    wrk -t1 -c"$connections" -d"${seconds}s" -s "$run/sessions.lua" \
        "http://127.0.0.1:$port/" >"$run/$name.wrk"
    callgrind_control -d "$pid" >/dev/null
    sleep 1
    # HAProxy under valgrind may ignore SIGINT: end it harder after 5 s.
    kill -INT "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local requests ir
    requests=$(awk '/requests in/ { print $1 }' "$run/$name.wrk")
    # The dump after zeroing holds the measured run only (the final dump at exit is ignored).
    ir=$(grep -hE '^(summary|totals):' "$(ls "$cg".*.1 2>/dev/null | head -1)" | awk '{ print $2 }' | head -1)
    if grep -q "Non-2xx\|Socket errors" "$run/$name.wrk"; then
        echo "instructions.sh: $name had errors:" >&2
        cat "$run/$name.wrk" >&2
    fi
    awk -v n="$name" -v r="$requests" -v i="$ir" \
        'BEGIN { printf "%-10s %8d requests %12.0f Ir %8.0f Ir/request\n", n, r, i, i / r }'
}

TOKIO_WORKER_THREADS=1 measure activator "$activator" serve -c "$run/activator.yaml"
if [[ -n $baseline ]]; then
    TOKIO_WORKER_THREADS=1 measure baseline "$baseline" serve -c "$run/activator.yaml"
fi
[[ -n ${SKIP_PEERS:-} ]] && exit 0
measure nginx nginx -p "$run" -c "$run/nginx.conf" -e "$run/nginx-error.log" -g 'master_process off;'
measure haproxy haproxy -f "$run/haproxy.cfg" -db
