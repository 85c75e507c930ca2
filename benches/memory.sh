#!/usr/bin/env bash
# Process memory per cached entry: fills corral's local cache with N distinct 1 KiB
# objects and reports RSS growth per entry, against the cache's own byte count (what
# its max_bytes bound limits).
#
#   bash benches/memory.sh            # N=100000
#   N=20000 bash benches/memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-100000}
command -v wrk >/dev/null || { export DEBIAN_FRONTEND=noninteractive; apt-get update -qq; apt-get install -y -qq wrk >/dev/null; }
cargo build --release -q -p corral -p corral-loadtest
WORK=$(mktemp -d)
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT INT TERM
# shellcheck source=benches/lib.sh
. benches/lib.sh

ORIGIN=$(free_port); PROXY=$(free_port); ADMIN=$(free_port)
target/release/corral-loadtest origin --listen "127.0.0.1:$ORIGIN" --delay 0ms --body-size 1024 --cache-control max-age=3600 >/dev/null &
PIDS+=($!)
cat >"$WORK/corral.toml" <<TOML
listen = "127.0.0.1:$PROXY"
admin_listen = "127.0.0.1:$ADMIN"
[cache]
max_bytes = "1GiB"
[[route]]
name = "mem"
upstream = "http://127.0.0.1:$ORIGIN"
TOML
RUST_LOG=warn target/release/corral --config "$WORK/corral.toml" &
CORRAL=$!
PIDS+=($CORRAL)
wait_port "$ORIGIN"; wait_port "$PROXY"; wait_port "$ADMIN"
curl -s -o /dev/null "http://127.0.0.1:$PROXY/warm"
rss() { awk '/^VmRSS:/ {print $2 * 1024}' "/proc/$CORRAL/status"; }
before=$(rss)

# N distinct keys, each requested once (wrk's Lua hands out paths in order).
cat >"$WORK/distinct.lua" <<LUA
local i = 0
request = function()
  i = i + 1
  if i > $N then return wrk.format("GET", "/warm") end
  return wrk.format("GET", "/k/" .. i)
end
LUA
while true; do
    wrk -t1 -c32 -d30s -s "$WORK/distinct.lua" "http://127.0.0.1:$PROXY" >/dev/null
    entries=$(curl -s "http://127.0.0.1:$ADMIN/metrics" | awk '/^corral_cache_entries / {print $2}')
    [ "${entries%.*}" -ge "$N" ] && break
    echo "only $entries entries after one pass; N is more than 30 s of wrk here" >&2
    exit 1
done
after=$(rss)
metrics=$(curl -s "http://127.0.0.1:$ADMIN/metrics")
bytes=$(awk '/^corral_cache_bytes / {print $2}' <<<"$metrics")
entries=$(awk '/^corral_cache_entries / {print $2}' <<<"$metrics")
awk -v n="$entries" -v b="$before" -v a="$after" -v c="$bytes" 'BEGIN {
  printf "entries: %d (1 KiB bodies)\n", n
  printf "RSS growth: %.1f MiB, %.0f bytes per entry\n", (a - b) / 1048576, (a - b) / n
  printf "cache bytes (what max_bytes bounds): %.1f MiB, %.0f bytes per entry\n", c / 1048576, c / n
  printf "RSS growth / cache bytes: %.2f\n", (a - b) / c
}'
