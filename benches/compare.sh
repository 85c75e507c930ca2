#!/usr/bin/env bash
# Cache-hit throughput and latency, corral against nginx proxy_cache and Varnish, in
# front of the same origin on this machine, measured alternately in one run.
#
#   bash benches/compare.sh            # 1 KiB and 64 KiB objects, 3 rounds of 5 s each
#   ROUNDS=5 SECONDS_PER_RUN=10 bash benches/compare.sh
#
# Installs nginx, varnish, wrk and redis-server from Debian's packages when missing.
# Everything listens on 127.0.0.1 and is stopped at the end (also on Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}
SIZES=${SIZES:-"1024 65536"}
WRK="wrk -t1 -c64 -d${SECONDS_PER_RUN}s --latency"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need varnishd || ! need wrk || ! need redis-server; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends nginx-light varnish wrk redis-server >/dev/null
fi
# The packages may start system services; ours run on their own ports.
if need systemctl; then systemctl stop nginx varnish redis-server >/dev/null 2>&1 || true; fi

cargo build --release -q -p corral -p corral-loadtest
BIN=target/release
WORK=$(mktemp -d)
chmod 755 "$WORK" # nginx's workers run as nobody and must reach their cache dir
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on $1" >&2
    exit 1
}

# One wrk run: prints "req/s p99_ms".
measure() {
    local out
    out=$($WRK "$1")
    if grep -q "Non-2xx" <<<"$out"; then
        echo "error responses from $1:" >&2
        echo "$out" >&2
        exit 1
    fi
    local rps p99
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' <<<"$out")
    echo "$rps $p99"
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
PIDS+=($!)
wait_port "$REDIS_PORT"

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(nginx -v 2>&1 | cut -d/ -f2) / varnish $(varnishd -V 2>&1 | head -1 | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -1); wrk -t1 -c64, ${SECONDS_PER_RUN}s x ${ROUNDS} rounds, medians"
echo
echo "| object | corral req/s | p99 | nginx req/s | p99 | Varnish req/s | p99 | corral shared-hit (Redis) req/s | p99 | corral fleet of 3 req/s | p99 | corral/nginx | corral/Varnish |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"

for SIZE in $SIZES; do
    ORIGIN_PORT=$(free_port)
    $BIN/corral-loadtest origin --listen "127.0.0.1:$ORIGIN_PORT" --delay 0ms --body-size "$SIZE" --cache-control "max-age=3600" >/dev/null &
    PIDS+=($!)
    wait_port "$ORIGIN_PORT"

    CORRAL_PORT=$(free_port)
    cat >"$WORK/corral.toml" <<TOML
listen = "127.0.0.1:$CORRAL_PORT"
[cache]
max_bytes = "256MiB"
[[route]]
name = "bench"
upstream = "http://127.0.0.1:$ORIGIN_PORT"
TOML
    RUST_LOG=warn $BIN/corral --config "$WORK/corral.toml" &
    PIDS+=($!)

    # A shared-tier hit every time: the local tier keeps nothing longer than 1 ms.
    SHARED_PORT=$(free_port)
    cat >"$WORK/shared.toml" <<TOML
listen = "127.0.0.1:$SHARED_PORT"
[redis]
url = "redis://127.0.0.1:$REDIS_PORT"
local_ttl = "1ms"
[[route]]
name = "bench"
upstream = "http://127.0.0.1:$ORIGIN_PORT"
TOML
    RUST_LOG=warn $BIN/corral --config "$WORK/shared.toml" &
    PIDS+=($!)

    # A fleet of three instances sharing the Redis; wrk's 64 connections split over them.
    FLEET_PORTS=()
    for i in 1 2 3; do
        port=$(free_port)
        FLEET_PORTS+=("$port")
        cat >"$WORK/fleet-$i.toml" <<TOML
listen = "127.0.0.1:$port"
[redis]
url = "redis://127.0.0.1:$REDIS_PORT"
[[route]]
name = "bench"
upstream = "http://127.0.0.1:$ORIGIN_PORT"
TOML
        RUST_LOG=warn $BIN/corral --config "$WORK/fleet-$i.toml" &
        PIDS+=($!)
    done

    NGINX_PORT=$(free_port)
    rm -rf "$WORK/nginx-cache"; mkdir -p "$WORK/nginx-cache"; chown nobody "$WORK/nginx-cache" 2>/dev/null || true
    sed -e "s#@DIR@#$WORK#g" -e "s#@PORT@#$NGINX_PORT#g" -e "s#@ORIGIN@#$ORIGIN_PORT#g" benches/nginx.conf.in >"$WORK/nginx.conf"
    nginx -c "$WORK/nginx.conf" -p "$WORK" -g 'daemon on;'

    VARNISH_PORT=$(free_port)
    varnishd -a "127.0.0.1:$VARNISH_PORT" -b "127.0.0.1:$ORIGIN_PORT" -s malloc,256m -n "$WORK/varnish" -p thread_pool_min=50 >/dev/null 2>&1
    for port in $CORRAL_PORT $SHARED_PORT $NGINX_PORT $VARNISH_PORT "${FLEET_PORTS[@]}"; do wait_port "$port"; done

    # Warm every cache with the object, then check it is served from cache.
    for port in $CORRAL_PORT $SHARED_PORT $NGINX_PORT $VARNISH_PORT "${FLEET_PORTS[@]}"; do
        for _ in 1 2 3; do curl -sf -o /dev/null "http://127.0.0.1:$port/object-$SIZE"; done
    done
    curl -sI "http://127.0.0.1:$CORRAL_PORT/object-$SIZE" | grep -qi '^cache-status: corral; hit' || { echo "corral does not hit" >&2; exit 1; }
    curl -sI "http://127.0.0.1:$SHARED_PORT/object-$SIZE" | grep -qi '^cache-status: corral; hit' || { echo "shared corral does not hit" >&2; exit 1; }
    curl -sI "http://127.0.0.1:$NGINX_PORT/object-$SIZE" | grep -qi '^x-cache-status: HIT' || { echo "nginx does not hit" >&2; exit 1; }
    curl -sI "http://127.0.0.1:$VARNISH_PORT/object-$SIZE" | grep -qi '^age: [1-9]\|^x-varnish: [0-9]* [0-9]' || { echo "varnish does not hit" >&2; exit 1; }

    : >"$WORK/results"
    for round in $(seq "$ROUNDS"); do
        # The fleet: three wrk processes, 21-22 connections each, at once; rates add up.
        fleet_out=$(for port in "${FLEET_PORTS[@]}"; do
            wrk -t1 -c21 -d"${SECONDS_PER_RUN}s" --latency "http://127.0.0.1:$port/object-$SIZE" &
        done; wait)
        if grep -q "Non-2xx" <<<"$fleet_out"; then echo "error responses from the fleet" >&2; exit 1; fi
        fleet_rps=$(awk '/^Requests\/sec:/ {sum += $2} END {print sum}' <<<"$fleet_out")
        fleet_p99=$(awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; if (v > m) m = v} END {print m}' <<<"$fleet_out")
        echo "fleet $fleet_rps $fleet_p99" >>"$WORK/results"
        for name in corral shared nginx varnish; do
            case $name in
                corral) port=$CORRAL_PORT ;; shared) port=$SHARED_PORT ;; nginx) port=$NGINX_PORT ;; varnish) port=$VARNISH_PORT ;;
            esac
            echo "$name $(measure "http://127.0.0.1:$port/object-$SIZE")" >>"$WORK/results"
        done
    done
    col() { awk -v n="$1" -v c="$2" '$1 == n {print $c}' "$WORK/results" | median; }
    c=$(col corral 2); cp=$(col corral 3)
    s=$(col shared 2); sp=$(col shared 3)
    n=$(col nginx 2); np=$(col nginx 3)
    v=$(col varnish 2); vp=$(col varnish 3)
    f=$(col fleet 2); fp=$(col fleet 3)
    label=$([ "$SIZE" -ge 1024 ] && echo "$((SIZE / 1024)) KiB" || echo "$SIZE B")
    printf "| %s | %.0f | %.2f ms | %.0f | %.2f ms | %.0f | %.2f ms | %.0f | %.2f ms | %.0f | %.2f ms | %.2f | %.2f |\n" \
        "$label" "$c" "$cp" "$n" "$np" "$v" "$vp" "$s" "$sp" "$f" "$fp" "$(awk -v a="$c" -v b="$n" 'BEGIN {print a / b}')" "$(awk -v a="$c" -v b="$v" 'BEGIN {print a / b}')"

    kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
    pkill -f "varnishd -a 127.0.0.1:$VARNISH_PORT" 2>/dev/null || true
done
