#!/usr/bin/env bash
# Cache-hit throughput and latency, corral against nginx proxy_cache and Varnish, in
# front of the same origin on this machine, measured alternately in one run. Besides
# requests per second it reports each server's CPU time per hit (from /proc, over the
# same runs) and the load generator's own CPU use: when wrk saturates its core, the
# throughput ratio is capped by wrk, and CPU per hit still tells the servers apart.
# nginx runs twice, with sendfile off and on; its better median counts.
#
#   bash benches/compare.sh            # 1 KiB and 64 KiB objects, 3 rounds of 5 s each
#   ROUNDS=5 SECONDS_PER_RUN=10 bash benches/compare.sh
#   CORRAL_WORKERS=1 bash benches/compare.sh   # corral's `workers` (default: one per core)
#   CORRAL_SETTINGS='access_log = "/tmp/access.log"' bash benches/compare.sh
#                                        # top-level lines for every corral (a setting's cost;
#                                        # nginx and Varnish keep their logs off)
#
# Installs nginx, varnish, wrk and redis-server from Debian's packages when missing.
# Everything listens on 127.0.0.1 and is stopped at the end (also on Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}
SIZES=${SIZES:-"1024 65536"}
WRK="wrk -t1 -c64 -d${SECONDS_PER_RUN}s --latency"
WORKERS_LINE=${CORRAL_WORKERS:+workers = $CORRAL_WORKERS}

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
    for pidfile in "$WORK"/nginx-*/nginx.pid; do [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

# shellcheck source=benches/lib.sh
. benches/lib.sh

# One wrk run against $1 (URL) while the processes $2.. serve it:
# prints "req/s p99_ms server_cpu_us_per_request wrk_cpu_percent".
measure() {
    local url=$1 out before after total rps p99 wrk_cpu
    shift
    before=$(cpu_ticks "$@")
    out=$( { TIMEFORMAT='wrk-cpu %U %S'; time $WRK "$url"; } 2>&1 )
    after=$(cpu_ticks "$@")
    if grep -q "Non-2xx" <<<"$out"; then
        echo "error responses from $url:" >&2
        echo "$out" >&2
        exit 1
    fi
    rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
    total=$(awk '/^ *[0-9]+ requests in/ {print $1}' <<<"$out")
    p99=$(awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' <<<"$out")
    wrk_cpu=$(awk -v d="$SECONDS_PER_RUN" '$1 == "wrk-cpu" {print ($2 + $3) * 100 / d}' <<<"$out")
    echo "$rps $p99 $(awk -v t="$((after - before))" -v us="$TICK_US" -v n="$total" 'BEGIN {print t * us / n}') $wrk_cpu"
}
# p50 latency in microseconds of one connection's requests (no queueing): what a single
# hit costs end to end.
latency_p50_us() {
    wrk -t1 -c1 -d2s --latency "$1" | awk '$1 == "50%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v)} else if (v ~ /ms$/) {sub(/ms/,"",v); v=v*1000}; print v}'
}
# start_corral NAME PORT SETTINGS: writes $WORK/NAME.toml (listen on PORT, SETTINGS, the
# bench route to this size's origin), starts corral on it, leaves its pid in STARTED.
start_corral() {
    cat >"$WORK/$1.toml" <<TOML
listen = "127.0.0.1:$2"
${CORRAL_SETTINGS:-}
$3
[[route]]
name = "bench"
upstream = "http://127.0.0.1:$ORIGIN_PORT"
TOML
    RUST_LOG=warn $BIN/corral --config "$WORK/$1.toml" &
    STARTED=$!
    PIDS+=($!)
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
PIDS+=($!)
wait_port "$REDIS_PORT"

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(nginx -v 2>&1 | cut -d/ -f2) / varnish $(varnishd -V 2>&1 | head -1 | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -1); wrk -t1 -c64, ${SECONDS_PER_RUN}s x ${ROUNDS} rounds, medians; corral workers: ${CORRAL_WORKERS:-one per core}"
: >"$WORK/table1"
: >"$WORK/table2"
for SIZE in $SIZES; do
    ORIGIN_PORT=$(free_port)
    $BIN/corral-loadtest origin --listen "127.0.0.1:$ORIGIN_PORT" --delay 0ms --body-size "$SIZE" --cache-control "max-age=3600" >/dev/null &
    PIDS+=($!)
    wait_port "$ORIGIN_PORT"

    CORRAL_PORT=$(free_port)
    start_corral corral "$CORRAL_PORT" "$WORKERS_LINE
[cache]
max_bytes = \"256MiB\""
    CORRAL_PID=$STARTED

    # A shared-tier hit every time: the local tier keeps nothing longer than 1 ms.
    SHARED_PORT=$(free_port)
    start_corral shared "$SHARED_PORT" "[redis]
url = \"redis://127.0.0.1:$REDIS_PORT\"
local_ttl = \"1ms\""
    SHARED_PID=$STARTED

    # A fleet of three instances sharing the Redis; wrk's 64 connections split over them.
    FLEET_PORTS=()
    for i in 1 2 3; do
        port=$(free_port)
        FLEET_PORTS+=("$port")
        start_corral "fleet-$i" "$port" "[redis]
url = \"redis://127.0.0.1:$REDIS_PORT\""
    done

    # nginx twice: sendfile on (Debian's default) and off (better for small objects).
    NGINX_PORT=$(free_port)
    NGINX_COPY_PORT=$(free_port)
    for mode in sendfile copy; do
        dir="$WORK/nginx-$mode"
        rm -rf "$dir"; mkdir -p "$dir/nginx-cache"; chmod 755 "$dir"; chown nobody "$dir/nginx-cache" 2>/dev/null || true
        port=$([ $mode = sendfile ] && echo "$NGINX_PORT" || echo "$NGINX_COPY_PORT")
        sed -e "s#@DIR@#$dir#g" -e "s#@PORT@#$port#g" -e "s#@ORIGIN@#$ORIGIN_PORT#g" benches/nginx.conf.in >"$dir/nginx.conf"
        [ $mode = copy ] && sed -i 's/sendfile on;/sendfile off;/' "$dir/nginx.conf"
        nginx -c "$dir/nginx.conf" -p "$dir" -g 'daemon on;'
    done

    VARNISH_PORT=$(free_port)
    varnishd -a "127.0.0.1:$VARNISH_PORT" -b "127.0.0.1:$ORIGIN_PORT" -s malloc,256m -n "$WORK/varnish" -p thread_pool_min=50 >/dev/null 2>&1
    for port in $CORRAL_PORT $SHARED_PORT $NGINX_PORT $NGINX_COPY_PORT $VARNISH_PORT "${FLEET_PORTS[@]}"; do wait_port "$port"; done

    # Warm every cache with the object, then check it is served from cache.
    for port in $CORRAL_PORT $SHARED_PORT $NGINX_PORT $NGINX_COPY_PORT $VARNISH_PORT "${FLEET_PORTS[@]}"; do
        for _ in 1 2 3; do curl -sf -o /dev/null "http://127.0.0.1:$port/object-$SIZE"; done
    done
    curl -sI "http://127.0.0.1:$CORRAL_PORT/object-$SIZE" | grep -qi '^cache-status: corral; hit' || { echo "corral does not hit" >&2; exit 1; }
    curl -sI "http://127.0.0.1:$SHARED_PORT/object-$SIZE" | grep -qi '^cache-status: corral; hit' || { echo "shared corral does not hit" >&2; exit 1; }
    for port in $NGINX_PORT $NGINX_COPY_PORT; do
        curl -sI "http://127.0.0.1:$port/object-$SIZE" | grep -qi '^x-cache-status: HIT' || { echo "nginx does not hit" >&2; exit 1; }
    done
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
        for name in corral shared nginx nginx-copy varnish; do
            case $name in
                corral) port=$CORRAL_PORT; pids=$CORRAL_PID ;;
                shared) port=$SHARED_PORT; pids=$SHARED_PID ;;
                nginx) port=$NGINX_PORT; pids=$(pgrep -P "$(cat "$WORK/nginx-sendfile/nginx.pid")" | xargs) ;;
                nginx-copy) port=$NGINX_COPY_PORT; pids=$(pgrep -P "$(cat "$WORK/nginx-copy/nginx.pid")" | xargs) ;;
                varnish) port=$VARNISH_PORT; pids=$(pgrep -f "varnishd -a 127.0.0.1:$VARNISH_PORT" | while read -r p; do echo "$p"; pgrep -P "$p" || true; done | sort -u | xargs) ;;
            esac
            # shellcheck disable=SC2086 # one argument per pid
            echo "$name $(measure "http://127.0.0.1:$port/object-$SIZE" $pids)" >>"$WORK/results"
        done
    done
    # One connection, no queueing: what the shared tier adds to a hit, next to what a
    # Redis GET of the same object costs (redis-benchmark, one connection).
    local_p50=$(latency_p50_us "http://127.0.0.1:$CORRAL_PORT/object-$SIZE")
    shared_p50=$(latency_p50_us "http://127.0.0.1:$SHARED_PORT/object-$SIZE")
    redis_get_us=$(redis-benchmark -p "$REDIS_PORT" -c 1 -n 20000 -d "$SIZE" -t set,get --csv 2>/dev/null | awk -F'","' '/^"GET"/ {print $3 * 1000}')

    col() { awk -v n="$1" -v c="$2" '$1 == n {print $c}' "$WORK/results" | median; }
    c=$(col corral 2); cp=$(col corral 3); cc=$(col corral 4); cw=$(col corral 5)
    s=$(col shared 2); sp=$(col shared 3)
    v=$(col varnish 2); vp=$(col varnish 3); vc=$(col varnish 4)
    f=$(col fleet 2); fp=$(col fleet 3)
    # nginx's better configuration for this object size.
    if awk -v a="$(col nginx 2)" -v b="$(col nginx-copy 2)" 'BEGIN {exit !(a >= b)}'; then
        nmode=on; n=$(col nginx 2); np=$(col nginx 3); nc=$(col nginx 4)
    else
        nmode=off; n=$(col nginx-copy 2); np=$(col nginx-copy 3); nc=$(col nginx-copy 4)
    fi
    label=$([ "$SIZE" -ge 1024 ] && echo "$((SIZE / 1024)) KiB" || echo "$SIZE B")
    printf "| %s | %.0f | %.2f ms | %.1f us | %.0f%% | %.0f (sendfile %s) | %.2f ms | %.1f us | %.0f | %.2f ms | %.1f us | %.2f | %.2f |\n" \
        "$label" "$c" "$cp" "$cc" "$cw" "$n" "$nmode" "$np" "$nc" "$v" "$vp" "$vc" \
        "$(awk -v a="$c" -v b="$n" 'BEGIN {print a / b}')" "$(awk -v a="$c" -v b="$v" 'BEGIN {print a / b}')" >>"$WORK/table1"
    printf "| %s | %.0f / %.0f | %.0f | %.2f ms | %.0f | %.2f ms | %.0f us | %.0f us | %.0f us |\n" \
        "$label" "$(col nginx 2)" "$(col nginx-copy 2)" "$s" "$sp" "$f" "$fp" "$local_p50" "$shared_p50" "$redis_get_us" >>"$WORK/table2"

    for mode in sendfile copy; do kill "$(cat "$WORK/nginx-$mode/nginx.pid")" 2>/dev/null || true; done
    pkill -f "varnishd -a 127.0.0.1:$VARNISH_PORT" 2>/dev/null || true
done

echo
echo "Hits on one instance (CPU per hit: the server's CPU time over the runs / requests; wrk CPU: the load generator's use of its core in corral's runs):"
echo
echo "| object | corral req/s | p99 | CPU per hit | wrk CPU | nginx req/s | p99 | CPU per hit | Varnish req/s | p99 | CPU per hit | corral/nginx | corral/Varnish |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
cat "$WORK/table1"
echo
echo "nginx both ways, corral's shared tier and fleet (one-connection p50: a single hit end to end; Redis GET: redis-benchmark, one connection, same size):"
echo
echo "| object | nginx sendfile on / off req/s | corral shared-hit (Redis) req/s | p99 | corral fleet of 3 req/s | p99 | local hit p50, 1 conn | shared hit p50, 1 conn | Redis GET, 1 conn |"
echo "|---|---|---|---|---|---|---|---|---|"
cat "$WORK/table2"
