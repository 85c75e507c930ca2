#!/usr/bin/env bash
# Did a change move the hit path? corral built at a git revision (A) against the working
# tree (B), in front of the same origin and Redis on this machine, measured alternately
# (A then B, then B then A, ...) so that drift of the machine hits both alike. Local
# hits and shared-tier (Redis) hits, 1 KiB; prints per-round figures and the medians.
#
#   bash benches/ab.sh REV                    # e.g. bash benches/ab.sh main~5
#   ROUNDS=12 SECONDS_PER_RUN=5 bash benches/ab.sh REV
#   B_SETTINGS='access_log = "/tmp/access.log"' bash benches/ab.sh HEAD   # a setting's cost
#
# Needs wrk and redis-server (installed from Debian's packages when missing). REV is
# built in a temporary git worktree with this tree's target directory, so dependencies
# are compiled once.
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:?usage: bash benches/ab.sh REV}
ROUNDS=${ROUNDS:-8}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need redis-server; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends wrk redis-server >/dev/null
fi

WORK=$(mktemp -d)
PIDS=()
TARGET=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    git worktree remove --force "$WORK/a-tree" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

git worktree add -q --detach "$WORK/a-tree" "$REV"
(cd "$WORK/a-tree" && CARGO_TARGET_DIR=$TARGET cargo build --release -q -p corral)
cp "$TARGET/release/corral" "$WORK/corral-a"
cargo build --release -q -p corral -p corral-loadtest
cp "$TARGET/release/corral" "$WORK/corral-b"

# shellcheck source=benches/lib.sh
. benches/lib.sh

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
PIDS+=($!)
wait_port "$REDIS_PORT"
ORIGIN_PORT=$(free_port)
"$TARGET/release/corral-loadtest" origin --listen "127.0.0.1:$ORIGIN_PORT" --delay 0ms \
    --body-size 1024 --cache-control "max-age=3600" >/dev/null &
PIDS+=($!)
wait_port "$ORIGIN_PORT"

# start NAME BINARY SETTINGS: starts corral (in this shell, so cleanup stops it) and
# leaves its port in STARTED_PORT and its pid in STARTED_PID.
start() {
    STARTED_PORT=$(free_port)
    printf 'listen = "127.0.0.1:%s"\n%b\n[[route]]\nname = "bench"\nupstream = "http://127.0.0.1:%s"\n' \
        "$STARTED_PORT" "$3" "$ORIGIN_PORT" >"$WORK/$1.toml"
    RUST_LOG=warn "$2" --config "$WORK/$1.toml" >/dev/null &
    STARTED_PID=$!
    PIDS+=($!)
    wait_port "$STARTED_PORT"
}
LOCAL='[cache]\nmax_bytes = "256MiB"'
# A shared-tier hit every time: the local tier keeps nothing longer than 1 ms.
SHARED="[redis]\nurl = \"redis://127.0.0.1:$REDIS_PORT\"\nlocal_ttl = \"1ms\""
declare -A PORT PID
for side in a b; do
    for tier in local shared; do
        settings=$LOCAL
        [ "$tier" = shared ] && settings=$SHARED
        # B_SETTINGS: top-level lines for B alone (the same code with a setting on).
        [ "$side" = b ] && [ -n "${B_SETTINGS:-}" ] && settings="$B_SETTINGS\n$settings"
        start "$side-$tier" "$WORK/corral-$side" "$settings"
        PORT[$side-$tier]=$STARTED_PORT
        PID[$side-$tier]=$STARTED_PID
    done
done
for name in "${!PORT[@]}"; do
    # Until the entry is cached (and, for the shared tier, Redis is connected).
    for _ in $(seq 100); do
        curl -s -o /dev/null -D - "http://127.0.0.1:${PORT[$name]}/ab" | grep -qi '^cache-status:.*hit' && break
        sleep 0.05
    done
done

# One wrk run: prints "name req/s cpu_us_per_request".
run() {
    local before after out rps total
    before=$(cpu_ticks "${PID[$1]}")
    out=$(wrk -t1 -c64 -d"${SECONDS_PER_RUN}s" "http://127.0.0.1:${PORT[$1]}/ab")
    after=$(cpu_ticks "${PID[$1]}")
    if grep -q "Non-2xx" <<<"$out"; then echo "error responses from $1" >&2; exit 1; fi
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    total=$(awk '/^ *[0-9]+ requests in/ {print $1}' <<<"$out")
    echo "$1 $rps $(awk -v t="$((after - before))" -v us="$TICK_US" -v n="$total" 'BEGIN {printf "%.2f", t * us / n}')"
}
echo "A = $REV ($(git rev-parse --short "$REV")), B = working tree ($(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes')); wrk -t1 -c64, ${SECONDS_PER_RUN}s x $ROUNDS rounds each"
: >"$WORK/runs"
for tier in local shared; do
    for i in $(seq "$ROUNDS"); do
        if ((i % 2)); then order="a b"; else order="b a"; fi
        for side in $order; do run "$side-$tier" | tee -a "$WORK/runs"; done
    done
done
echo
echo "| hits | A req/s (median) | B req/s (median) | B/A | A CPU per hit | B CPU per hit |"
echo "|---|---|---|---|---|---|"
for tier in local shared; do
    python3 - "$WORK/runs" "$tier" <<'PY'
import statistics, sys
runs = [l.split() for l in open(sys.argv[1])]
tier = sys.argv[2]
def med(side, col):
    return statistics.median(float(r[col]) for r in runs if r[0] == f"{side}-{tier}")
a, b = med("a", 1), med("b", 1)
print(f"| {tier} 1 KiB | {a:.0f} | {b:.0f} | {b / a:.3f} | {med('a', 2):.2f} us | {med('b', 2):.2f} us |")
PY
done
