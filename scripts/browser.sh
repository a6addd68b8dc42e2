#!/usr/bin/env bash
# A real browser for the OHIF tests: Debian's headless-capable Chromium and its WebDriver (chromedriver),
# driven by selenium (requirements.txt) with an explicit driver path, so nothing is downloaded at run time.
#
#   bash scripts/browser.sh install     # the Debian packages chromium + chromium-driver (needs root; once)
set -euo pipefail

cmd="${1:-}"

install() {
    if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || {
        apt-get update -q >/dev/null
        apt-get install -y -q chromium chromium-driver >/dev/null
    }
}

case "$cmd" in
install)
    install
    ;;
*)
    echo "usage: browser.sh install" >&2
    exit 2
    ;;
esac
