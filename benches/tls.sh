#!/usr/bin/env bash
# What TLS costs a hit, and what the HTTP/1 fast path saves with and without TLS. One
# corral in plain HTTP, one with [tls] (a self-signed certificate made here, ECDSA
# P-256), in front of the same origin; local hits of 1 KiB, measured alternately:
#   plain-fast   plain HTTP/1.1, the fast path's hits (what compare.sh measures)
#   plain-hyper  plain HTTP/1.1 through hyper (`Connection: x-bench` makes the fast path
#                decline; the hit is the same entry)
#   tls-fast     HTTP/1.1 over TLS 1.3, the fast path's hits (keep-alive: handshakes
#                are not measured)
#   tls-hyper    the same through hyper (`Connection: x-bench` again: the first request
#                hands the connection to hyper)
#
#   bash benches/tls.sh
#   ROUNDS=6 SECONDS_PER_RUN=5 bash benches/tls.sh
#
# Needs wrk (built with OpenSSL, as Debian's is) and openssl; installed from Debian's
# packages when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-4}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need openssl; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends wrk openssl >/dev/null
fi

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

TARGET=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
cargo build --release -q -p corral -p corral-loadtest
# shellcheck source=benches/lib.sh
. benches/lib.sh

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null

ORIGIN_PORT=$(free_port)
"$TARGET/release/corral-loadtest" origin --listen "127.0.0.1:$ORIGIN_PORT" --delay 0ms \
    --body-size 1024 --cache-control "max-age=3600" >/dev/null &
PIDS+=($!)
wait_port "$ORIGIN_PORT"

declare -A PORT PID URL HEADER
# start NAME SETTINGS
start() {
    PORT[$1]=$(free_port)
    printf 'listen = "127.0.0.1:%s"\n%b\n[[route]]\nname = "bench"\nupstream = "http://127.0.0.1:%s"\n' \
        "${PORT[$1]}" "$2" "$ORIGIN_PORT" >"$WORK/$1.toml"
    RUST_LOG=warn "$TARGET/release/corral" --config "$WORK/$1.toml" >/dev/null &
    PID[$1]=$!
    PIDS+=($!)
    wait_port "${PORT[$1]}"
}
start plain ''
start tls "[tls]\ncert = \"$WORK/cert.pem\"\nkey = \"$WORK/key.pem\""
URL[plain-fast]="http://127.0.0.1:${PORT[plain]}/tls-bench"
URL[plain-hyper]="http://127.0.0.1:${PORT[plain]}/tls-bench"
URL[tls-fast]="https://localhost:${PORT[tls]}/tls-bench"
URL[tls-hyper]="https://localhost:${PORT[tls]}/tls-bench"
HEADER[plain-fast]="x-bench: 1"
HEADER[plain-hyper]="connection: x-bench"
HEADER[tls-fast]="x-bench: 1"
HEADER[tls-hyper]="connection: x-bench"
PID[plain-fast]=${PID[plain]}
PID[plain-hyper]=${PID[plain]}
PID[tls-fast]=${PID[tls]}
PID[tls-hyper]=${PID[tls]}
for name in plain-fast tls-fast; do
    for _ in $(seq 100); do
        curl -sk -o /dev/null -D - "${URL[$name]}" | grep -qi '^cache-status:.*hit' && break
        sleep 0.05
    done
done
# Each way must really be a hit.
for name in plain-fast plain-hyper tls-fast tls-hyper; do
    curl -sk -o /dev/null -D - -H "${HEADER[$name]}" "${URL[$name]}" | grep -qi '^cache-status: corral; hit' ||
        { echo "$name is not a hit" >&2; exit 1; }
done

# One wrk run: prints "name req/s cpu_us_per_request".
run() {
    local before after out rps total
    before=$(cpu_ticks "${PID[$1]}")
    out=$(wrk -t1 -c64 -d"${SECONDS_PER_RUN}s" -H "${HEADER[$1]}" "${URL[$1]}")
    after=$(cpu_ticks "${PID[$1]}")
    if grep -q "Non-2xx" <<<"$out"; then echo "error responses from $1" >&2; exit 1; fi
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    total=$(awk '/^ *[0-9]+ requests in/ {print $1}' <<<"$out")
    echo "$1 $rps $(awk -v t="$((after - before))" -v us="$TICK_US" -v n="$total" 'BEGIN {printf "%.2f", t * us / n}')"
}
echo "local hits, 1 KiB, wrk -t1 -c64, ${SECONDS_PER_RUN}s x $ROUNDS rounds each, alternating"
: >"$WORK/runs"
for i in $(seq "$ROUNDS"); do
    if ((i % 2)); then order="plain-fast plain-hyper tls-fast tls-hyper"; else order="tls-hyper tls-fast plain-hyper plain-fast"; fi
    for name in $order; do run "$name" | tee -a "$WORK/runs"; done
done
echo
echo "| hits over | req/s (median) | CPU per hit (median) |"
echo "|---|---|---|"
python3 - "$WORK/runs" <<'PY'
import statistics, sys
runs = [l.split() for l in open(sys.argv[1])]
for name in ["plain-fast", "plain-hyper", "tls-fast", "tls-hyper"]:
    rps = statistics.median(float(r[1]) for r in runs if r[0] == name)
    cpu = statistics.median(float(r[2]) for r in runs if r[0] == name)
    print(f"| {name} | {rps:.0f} | {cpu:.2f} us |")
PY
