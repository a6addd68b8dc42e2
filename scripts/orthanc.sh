#!/usr/bin/env bash
# A real PACS for tests and the sample: Orthanc (Debian packages orthanc + orthanc-dicomweb) with its
# DICOMweb plugin, bound to 127.0.0.1, storing in its own folder, started and stopped by its own pid.
#
#   bash scripts/orthanc.sh install                 # the Debian packages (needs root; once)
#   bash scripts/orthanc.sh start DIR [PORT]        # DIR/orthanc.json, DIR/db, DIR/orthanc.pid, DIR/orthanc.log
#   bash scripts/orthanc.sh stop DIR                # kills the pid in DIR/orthanc.pid
#
# Environment: ORTHANC_USER / ORTHANC_PASSWORD turn on HTTP basic auth (both or neither).
# DICOMweb is then at http://127.0.0.1:PORT/dicom-web (default PORT 8042).
set -euo pipefail
# shellcheck source=scripts/apt.sh
. "$(dirname "$0")/apt.sh"

cmd="${1:-}"
plugin=/usr/share/orthanc/plugins/libOrthancDicomWeb.so

install() {
    if command -v Orthanc >/dev/null && [ -f "$plugin" ]; then
        return 0
    fi
    apt_install orthanc orthanc-dicomweb
    # the package tries to start a system service; this script runs its own instance instead
}

case "$cmd" in
install)
    install
    ;;
start)
    dir="${2:?usage: orthanc.sh start DIR [PORT]}"
    port="${3:-8042}"
    install
    mkdir -p "$dir/db"
    dir="$(cd "$dir" && pwd)"
    if [ -f "$dir/orthanc.pid" ] && kill -0 "$(cat "$dir/orthanc.pid")" 2>/dev/null; then
        echo "Orthanc already runs in $dir (pid $(cat "$dir/orthanc.pid"))" >&2
        exit 1
    fi
    auth=false
    users="{}"
    if [ -n "${ORTHANC_USER:-}" ] || [ -n "${ORTHANC_PASSWORD:-}" ]; then
        : "${ORTHANC_USER:?ORTHANC_USER and ORTHANC_PASSWORD go together}" "${ORTHANC_PASSWORD:?ORTHANC_USER and ORTHANC_PASSWORD go together}"
        auth=true
        users="{\"$ORTHANC_USER\": \"$ORTHANC_PASSWORD\"}"
    fi
    cat >"$dir/orthanc.json" <<EOF
{
  "Name": "unet_seg-pacs",
  "StorageDirectory": "$dir/db",
  "IndexDirectory": "$dir/db",
  "HttpPort": $port,
  "RemoteAccessAllowed": false,
  "HttpBindAddress": "127.0.0.1",
  "DicomServerEnabled": false,
  "AuthenticationEnabled": $auth,
  "RegisteredUsers": $users,
  "Plugins": ["$plugin"],
  "DicomWeb": {"Enable": true, "Root": "/dicom-web/", "EnableWado": true, "StudiesMetadata": "Full", "SeriesMetadata": "Full"}
}
EOF
    chmod 600 "$dir/orthanc.json"
    Orthanc "$dir/orthanc.json" >"$dir/orthanc.log" 2>&1 &
    echo $! >"$dir/orthanc.pid"
    for _ in $(seq 1 100); do
        code=$(curl -s -o /dev/null -w "%{http_code}" "http://127.0.0.1:$port/dicom-web/studies" || true)
        if [ "$code" = "200" ] || [ "$code" = "401" ]; then
            echo "Orthanc (pid $(cat "$dir/orthanc.pid")) serves DICOMweb at http://127.0.0.1:$port/dicom-web"
            exit 0
        fi
        if ! kill -0 "$(cat "$dir/orthanc.pid")" 2>/dev/null; then
            echo "Orthanc stopped at start-up; see $dir/orthanc.log" >&2
            tail -n 20 "$dir/orthanc.log" >&2
            exit 1
        fi
        sleep 0.2
    done
    echo "Orthanc did not answer on port $port within 20 s; see $dir/orthanc.log" >&2
    exit 1
    ;;
stop)
    dir="${2:?usage: orthanc.sh stop DIR}"
    if [ -f "$dir/orthanc.pid" ]; then
        pid="$(cat "$dir/orthanc.pid")"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$dir/orthanc.pid"
    fi
    ;;
*)
    echo "usage: orthanc.sh install | start DIR [PORT] | stop DIR" >&2
    exit 2
    ;;
esac
