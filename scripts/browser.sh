#!/usr/bin/env bash
# A real browser for the OHIF tests: Debian's headless-capable Chromium and its WebDriver (chromedriver),
# driven by selenium (requirements.txt) with an explicit driver path, so nothing is downloaded at run time.
#
#   bash scripts/browser.sh install     # the Debian packages chromium + chromium-driver (needs root; once)
set -euo pipefail
# shellcheck source=scripts/apt.sh
. "$(dirname "$0")/apt.sh"

cmd="${1:-}"

install() {
    if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
        return 0
    fi
    apt_install chromium chromium-driver
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
