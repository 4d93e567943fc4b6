#!/usr/bin/env bash
# Hot-path throughput through the activator to one session's sandbox, isolation none vs
# namespaces, interleaved rounds, each with a fresh activator (ports 18480/18481) and one
# session pinned to one sandbox, wrk -t1 -c8 on GET /healthz (issue 20; docs/benchmarks.md).
# Usage: loadtest/peers/isolation_throughput.sh BIN [ROUNDS] [SECONDS]
set -euo pipefail
BIN=$1; ROUNDS=${2:-3}; SECS=${3:-10}
W=/tmp/iso-bench/work; mkdir -p $W
for round in $(seq 1 "$ROUNDS"); do
  for iso in none namespaces; do
    cfg=$W/$iso.yaml
    cat > "$cfg" <<YAML
listen: 127.0.0.1:18480
admin_listen: 127.0.0.1:18481
log: {access_log: false}
idle: {timeout: 1h, policy: pause}
autoscaler: {enabled: false}
backend:
  kind: process
  command: ["{self}", "demo-sandbox", "--port", "{port}"]
  workdir_root: "$W/sbx-$iso"
  stop_grace: 1s
  isolation: $iso
YAML
    "$BIN" serve --config "$cfg" 2>"$W/$iso.log" & pid=$!
    for i in $(seq 1 100); do curl -s -o /dev/null -H 'X-Session-ID: tp' http://127.0.0.1:18480/healthz && break; sleep 0.1; done
    curl -s -o /dev/null -H 'X-Session-ID: tp' http://127.0.0.1:18480/healthz
    printf '%s round %s load %s: ' "$iso" "$round" "$(cut -d' ' -f1 /proc/loadavg)"
    wrk -t1 -c8 -d"${SECS}s" -H 'X-Session-ID: tp' http://127.0.0.1:18480/healthz | grep -E 'Requests/sec' | tr -s ' '
    kill -TERM $pid; wait $pid || true
  done
done
