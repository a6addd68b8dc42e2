#!/usr/bin/env bash
# A local Ray head for cohort inference and its tests: Ray from PyPI (requirements.txt), every
# server bound to 127.0.0.1, its own folder, started and stopped by its own pid.
#
#   bash scripts/ray.sh start DIR [PORT] [CPUS]   # DIR/ray.pid, DIR/ray.log, DIR/ray.address (default 6380, all CPUs)
#   bash scripts/ray.sh stop DIR                  # SIGTERM to the head's process group, SIGKILL after 30 s
#
# Ray turns 127.0.0.1 into the machine's routable address on Linux unless
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; with it the GCS, raylet and workers listen on loopback only.
# Then: main.py predict ... --ray 127.0.0.1:PORT
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=.venv/bin/ray
cmd="${1:-}"

case "$cmd" in
start)
    dir="${2:?usage: ray.sh start DIR [PORT] [CPUS]}"
    port="${3:-6380}"
    cpus="${4:-$(nproc)}"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    if [ -f "$dir/ray.pid" ] && kill -0 "$(cat "$dir/ray.pid")" 2>/dev/null; then
        echo "Ray already runs in $dir (pid $(cat "$dir/ray.pid"))" >&2
        exit 1
    fi
    tmp="$(mktemp -d /tmp/ray.XXXXXX)"  # Ray's socket paths must stay short
    echo "$tmp" >"$dir/ray.tmp"
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 setsid "$RAY" start --head --block --node-ip-address 127.0.0.1 \
        --port "$port" --num-cpus "$cpus" --include-dashboard=false --disable-usage-stats \
        --temp-dir "$tmp" >"$dir/ray.log" 2>&1 &
    echo $! >"$dir/ray.pid"
    for _ in $(seq 120); do
        if grep -q "Ray runtime started" "$dir/ray.log" 2>/dev/null; then
            echo "127.0.0.1:$port" >"$dir/ray.address"
            echo "Ray head (pid $(cat "$dir/ray.pid")) at 127.0.0.1:$port with $cpus CPUs"
            exit 0
        fi
        if ! kill -0 "$(cat "$dir/ray.pid")" 2>/dev/null; then
            break
        fi
        sleep 0.5
    done
    echo "Ray did not start; its log:" >&2
    tail -30 "$dir/ray.log" >&2
    exit 1
    ;;
stop)
    dir="${2:?usage: ray.sh stop DIR}"
    [ -f "$dir/ray.pid" ] || exit 0
    pid="$(cat "$dir/ray.pid")"
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 60); do
        pgrep -g "$pid" >/dev/null 2>&1 || break
        sleep 0.5
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    for _ in $(seq 20); do  # killed processes leave the table once reaped
        pgrep -g "$pid" >/dev/null 2>&1 || break
        sleep 0.5
    done
    [ -f "$dir/ray.tmp" ] && rm -rf "$(cat "$dir/ray.tmp")" "$dir/ray.tmp"
    rm -f "$dir/ray.pid" "$dir/ray.address"
    ;;
*)
    echo "usage: ray.sh start DIR [PORT] [CPUS] | stop DIR" >&2
    exit 2
    ;;
esac
