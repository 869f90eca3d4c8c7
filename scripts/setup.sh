#!/usr/bin/env bash
# Sets up everything whisperd needs on a new Debian machine, idempotently:
#   1. Debian packages (ffmpeg, espeak-ng, sox, sqlite3, postgresql), only when one is missing;
#   2. the server's venv .venv (requirements.txt, and requirements-dev.txt with --dev);
#   3. the WhisperX engine venv and the tiny.en model (scripts/setup-engine.sh).
# A second run takes a few seconds.
set -euo pipefail
repo=$(dirname "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")")
cd "$repo"
say() { printf 'setup: %s\n' "$*" >&2; }

dev=0
[ "${1:-}" = "--dev" ] && dev=1

# postgresql: the cluster's ledger; the tests start a throwaway server with its initdb and pg_ctl.
packages=(ffmpeg espeak-ng sox sqlite3 postgresql)
# chromium: the browser tests of the web page (tests/test_web.py) drive it through Playwright.
# systemd: systemd-analyze checks deploy/whisperd.service (tests/test_deploy.py).
[ $dev = 1 ] && packages+=(chromium systemd)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    say "installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
stamp=.venv/.requirements-$(cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-12)-$dev
if [ ! -f "$stamp" ]; then
    say "creating the server venv .venv"
    [ -x .venv/bin/python ] || "$python" -m venv .venv
    .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
    if [ $dev = 1 ]; then
        .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
    fi
    rm -f .venv/.requirements-*
    touch "$stamp"
fi

scripts/setup-engine.sh >/dev/null
