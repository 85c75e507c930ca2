# Helpers the bench scripts share (sourced, not run): free ports, waiting for a
# listener, and the CPU time a process has used.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_port() {
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on $1" >&2
    exit 1
}

# CPU time (clock ticks) used so far by the given processes.
cpu_ticks() {
    local sum=0 pid stat fields
    for pid in "$@"; do
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        read -r -a fields <<<"${stat##*) }" # after "pid (comm) ": state is field 0
        sum=$((sum + fields[11] + fields[12]))
    done
    echo "$sum"
}
TICK_US=$((1000000 / $(getconf CLK_TCK)))
