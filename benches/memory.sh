#!/usr/bin/env bash
# Process memory per cached entry: fills corral's local cache with N distinct 1 KiB
# objects and reports RSS growth per entry, against the cache's own byte count (what
# its max_bytes bound limits); then the same N objects through Varnish (`-s malloc`,
# Debian's package) in front of the same origin, its processes' RSS growth per object.
#
#   bash benches/memory.sh            # N=100000
#   N=20000 bash benches/memory.sh
#   VARNISH=0 bash benches/memory.sh  # corral only
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-100000}
VARNISH=${VARNISH:-1}
missing=()
command -v wrk >/dev/null || missing+=(wrk)
[ "$VARNISH" = 0 ] || command -v varnishd >/dev/null || missing+=(varnish)
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if command -v systemctl >/dev/null; then systemctl stop varnish >/dev/null 2>&1 || true; fi
fi
cargo build --release -q -p corral -p corral-loadtest
WORK=$(mktemp -d)
PIDS=()
VARNISH_PORT=""
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    [ -z "$VARNISH_PORT" ] || pkill -f "varnishd -a 127.0.0.1:$VARNISH_PORT" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
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

[ "$VARNISH" = 0 ] && exit 0
# Varnish: the same N objects from the same origin, its manager and cache processes'
# RSS growth (-s malloc sized like corral's max_bytes: nothing is evicted).
VARNISH_PORT=$(free_port)
varnishd -a "127.0.0.1:$VARNISH_PORT" -b "127.0.0.1:$ORIGIN" -s malloc,1G -n "$WORK/varnish" >/dev/null 2>&1
wait_port "$VARNISH_PORT"
varnish_pids() { pgrep -f "varnishd -a 127.0.0.1:$VARNISH_PORT" | while read -r p; do echo "$p"; pgrep -P "$p" || true; done | sort -u; }
varnish_rss() { for p in $(varnish_pids); do awk '/^VmRSS:/ {print $2 * 1024}' "/proc/$p/status"; done | awk '{s += $1} END {print s}'; }
curl -s -o /dev/null "http://127.0.0.1:$VARNISH_PORT/warm"
vbefore=$(varnish_rss)
wrk -t1 -c32 -d30s -s "$WORK/distinct.lua" "http://127.0.0.1:$VARNISH_PORT" >/dev/null
objects=$(varnishstat -n "$WORK/varnish" -1 -f MAIN.n_object 2>/dev/null | awk '{print $2}')
[ "${objects:-0}" -ge "$N" ] || { echo "varnish holds only ${objects:-0} objects after one pass" >&2; exit 1; }
vafter=$(varnish_rss)
awk -v n="$objects" -v b="$vbefore" -v a="$vafter" -v c="$after" -v cb="$before" -v ce="$entries" 'BEGIN {
  printf "varnish objects: %d (1 KiB bodies, -s malloc)\n", n
  printf "varnish RSS growth: %.1f MiB, %.0f bytes per object\n", (a - b) / 1048576, (a - b) / n
  printf "corral / varnish bytes per entry: %.2f\n", ((c - cb) / ce) / ((a - b) / n)
}'
