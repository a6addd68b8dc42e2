#!/usr/bin/env bash
# Sourced by the scripts that install Debian packages (orthanc.sh, browser.sh).

# apt_install PKG...: install Debian packages quietly, refreshing the package lists once if the first try fails
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "$@" >/dev/null 2>&1 || {
        apt-get update -q >/dev/null
        apt-get install -y -q "$@" >/dev/null
    }
}
