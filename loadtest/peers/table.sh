#!/usr/bin/env bash
# The session table at scale (docs/benchmarks.md "The table"): one activator with one
# worker thread, static backend over 4 demo sandboxes, and three `hot` runs back to back:
# 64 sessions on an empty table, SESSIONS sessions (each established by its own first
# request, then all cycled through), the same 64 sessions with the big table still held.
# Prints RSS (VmRSS / VmHWM) after each run; reports land in OUT.
#
# Environment: SESSIONS (default 1000000), ACTIVATOR and LOADTEST (release binaries;
# default target/release/...), OUT (default target/loadtest-table), PORT (default 19580;
# admin = PORT+1). Everything binds 127.0.0.1; each run is bounded (20 s, 5M requests).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
sessions=${SESSIONS:-1000000}
activator=${ACTIVATOR:-$root/target/release/agent-activator}
loadtest=${LOADTEST:-$root/target/release/activator-loadtest}
out=${OUT:-$root/target/loadtest-table}
port=${PORT:-19580}
mkdir -p "$out"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT

eps=""
for i in 1 2 3 4; do
    "$activator" demo-sandbox --port 0 >"$out/sandbox-$i.out" 2>&1 &
    pids+=($!)
done
for i in 1 2 3 4; do
    for _ in $(seq 100); do
        grep -qs "listening on" "$out/sandbox-$i.out" && break
        sleep 0.1
    done
    eps+="\"$(sed -n 's/^listening on //p' "$out/sandbox-$i.out" | head -1)\","
done
per_sandbox=$((sessions / 4 + 1000))
cat >"$out/activator.yaml" <<YAML
listen: 127.0.0.1:$port
admin_listen: 127.0.0.1:$((port + 1))
log: {level: warn, access_log: false}
session:
  sources: [{header: X-Session-ID}]
  max_sessions_per_sandbox: $per_sandbox
  max_sessions: $((sessions + 100000))
idle: {timeout: 1h, policy: keep}
backend: {kind: static, endpoints: [${eps%,}]}
YAML
TOKIO_WORKER_THREADS=1 "$activator" serve -c "$out/activator.yaml" >"$out/activator.log" 2>&1 &
act=$!
pids+=($act)
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done
rss() { awk '/VmRSS|VmHWM/ {printf "%s %s kB  ", $1, $2}' "/proc/$act/status"; echo; }
common=(--target "activator=http://127.0.0.1:$port" --activator-pid "$act" --connections 32
    --duration 20s --rounds 1 --rate 10000)
echo "start: $(rss)"
"$loadtest" hot "${common[@]}" --sessions 64 --json "$out/small-empty.json" | tee "$out/small-empty.txt"
echo "after 64 sessions: $(rss)"
"$loadtest" hot "${common[@]}" --sessions "$sessions" --request-timeout 30s --max-requests 5000000 \
    --json "$out/big.json" | tee "$out/big.txt"
echo "after $sessions sessions: $(rss)"
"$loadtest" hot "${common[@]}" --sessions 64 --json "$out/small-full.json" | tee "$out/small-full.txt"
echo "after 64 sessions on the full table: $(rss)"
