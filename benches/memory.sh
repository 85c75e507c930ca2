#!/usr/bin/env bash
# Process memory per cached entry, and what `max_bytes` bounds:
#  1. fills corral's local cache (room for all) with N distinct 1 KiB objects and
#     reports RSS growth per entry, against the cache's own byte count;
#  2. fills a corral whose max_bytes is FULL_MAX with the same N objects (several times
#     what fits) and reports RSS growth against max_bytes;
#  3. fills Varnish (`-s malloc`, Debian's package) in front of the same origin with the
#     same N objects, its processes' RSS growth per object.
#
#   bash benches/memory.sh                 # N=100000, FULL_MAX=64MiB
#   N=1000000 bash benches/memory.sh       # a million entries (a few minutes, ~5 GB)
#   VARNISH=0 FULL=0 bash benches/memory.sh  # corral's first row only
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-100000}
VARNISH=${VARNISH:-1}
FULL=${FULL:-1}
FULL_MAX=${FULL_MAX:-64MiB}
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

ORIGIN=$(free_port)
target/release/corral-loadtest origin --listen "127.0.0.1:$ORIGIN" --delay 0ms --body-size 1024 --cache-control max-age=3600 >/dev/null &
PIDS+=($!)
wait_port "$ORIGIN"
rss() { awk '/^VmRSS:/ {print $2 * 1024}' "/proc/$1/status"; }

# N distinct keys, each requested once (wrk's Lua hands out paths in order; 32
# connections), in runs of 10 s, each starting where the last one stopped; past N it
# asks for /warm (a hit) until its run ends.
cat >"$WORK/distinct.lua" <<LUA
local i = 0
init = function(args) i = tonumber(args[1]) end
request = function()
  i = i + 1
  if i > $N then return wrk.format("GET", "/warm") end
  return wrk.format("GET", "/k/" .. i)
end
LUA
fill() {
    local sent=0 done
    while [ "$sent" -lt "$N" ]; do
        done=$(wrk -t1 -c32 -d10s -s "$WORK/distinct.lua" "http://127.0.0.1:$1" -- "$sent" | awk '/requests in/ {print $1}')
        sent=$((sent + done))
    done
}

# A corral with `max_bytes = $1`; sets PROXY, ADMIN and CORRAL.
start_corral() {
    PROXY=$(free_port); ADMIN=$(free_port)
    cat >"$WORK/corral.toml" <<TOML
listen = "127.0.0.1:$PROXY"
admin_listen = "127.0.0.1:$ADMIN"
[cache]
max_bytes = "$1"
[[route]]
name = "mem"
upstream = "http://127.0.0.1:$ORIGIN"
TOML
    RUST_LOG=warn target/release/corral --config "$WORK/corral.toml" &
    CORRAL=$!
    PIDS+=($CORRAL)
    wait_port "$PROXY"; wait_port "$ADMIN"
    curl -s -o /dev/null "http://127.0.0.1:$PROXY/warm"
}
metric() { curl -s "http://127.0.0.1:$ADMIN/metrics" | awk -v m="$1" '$1 == m {print $2}'; }

# 1. Room for every entry (about 2 KB each, with a margin).
start_corral "$(( (N * 4096 >> 20) + 64 ))MiB"
before=$(rss "$CORRAL")
fill "$PROXY"
after=$(rss "$CORRAL")
bytes=$(metric corral_cache_bytes)
entries=$(metric corral_cache_entries)
[ "${entries%.*}" -ge "$N" ] || { echo "corral holds only $entries entries after the fill" >&2; exit 1; }
awk -v n="$entries" -v b="$before" -v a="$after" -v c="$bytes" 'BEGIN {
  printf "entries: %d (1 KiB bodies)\n", n
  printf "RSS growth: %.1f MiB, %.0f bytes per entry\n", (a - b) / 1048576, (a - b) / n
  printf "cache bytes (what max_bytes bounds): %.1f MiB, %.0f bytes per entry\n", c / 1048576, c / n
  printf "RSS growth / cache bytes: %.2f\n", (a - b) / c
}'
corral_per_entry=$(awk -v n="$entries" -v b="$before" -v a="$after" 'BEGIN {print (a - b) / n}')
kill "$CORRAL"; wait "$CORRAL" 2>/dev/null || true

# 2. A full cache: the same N objects into FULL_MAX.
if [ "$FULL" != 0 ]; then
    start_corral "$FULL_MAX"
    before=$(rss "$CORRAL")
    fill "$PROXY"
    after=$(rss "$CORRAL")
    max=$(python3 -c "import sys; u={'KiB':1<<10,'MiB':1<<20,'GiB':1<<30}; s=sys.argv[1]; print(int(s[:-3]) * u[s[-3:]])" "$FULL_MAX")
    awk -v held="$(metric corral_cache_entries)" -v n="$N" -v b="$before" -v a="$after" -v m="$max" -v c="$(metric corral_cache_bytes)" 'BEGIN {
      printf "full cache (max_bytes %.0f MiB, %d objects filled): %d entries held, cache bytes %.1f MiB\n", m / 1048576, n, held, c / 1048576
      printf "full cache RSS growth: %.1f MiB, %.2fx max_bytes\n", (a - b) / 1048576, (a - b) / m
    }'
    kill "$CORRAL"; wait "$CORRAL" 2>/dev/null || true
fi

[ "$VARNISH" = 0 ] && exit 0
# 3. Varnish: the same N objects from the same origin, its manager and cache processes'
# RSS growth (-s malloc sized like corral's first run: nothing is evicted).
VARNISH_PORT=$(free_port)
varnishd -a "127.0.0.1:$VARNISH_PORT" -b "127.0.0.1:$ORIGIN" -s "malloc,$(( (N * 8192 >> 20) + 64 ))M" -n "$WORK/varnish" >/dev/null 2>&1
wait_port "$VARNISH_PORT"
varnish_pids() { pgrep -f "varnishd -a 127.0.0.1:$VARNISH_PORT" | while read -r p; do echo "$p"; pgrep -P "$p" || true; done | sort -u; }
varnish_rss() { for p in $(varnish_pids); do rss "$p"; done | awk '{s += $1} END {print s}'; }
curl -s -o /dev/null "http://127.0.0.1:$VARNISH_PORT/warm"
vbefore=$(varnish_rss)
fill "$VARNISH_PORT"
objects=$(varnishstat -n "$WORK/varnish" -1 -f MAIN.n_object 2>/dev/null | awk '{print $2}')
[ "${objects:-0}" -ge "$N" ] || { echo "varnish holds only ${objects:-0} objects after the fill" >&2; exit 1; }
vafter=$(varnish_rss)
awk -v n="$objects" -v b="$vbefore" -v a="$vafter" -v c="$corral_per_entry" 'BEGIN {
  printf "varnish objects: %d (1 KiB bodies, -s malloc)\n", n
  printf "varnish RSS growth: %.1f MiB, %.0f bytes per object\n", (a - b) / 1048576, (a - b) / n
  printf "corral / varnish bytes per entry: %.2f\n", c / ((a - b) / n)
}'
