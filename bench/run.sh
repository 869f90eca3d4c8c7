#!/usr/bin/env bash
# Runs every benchmark (docs/performance.md says what each measures) and regenerates docs/performance.md: ./bench/run.sh [--quick] [--only NAME ...]
# Sets up what it needs first, idempotently: wrk (Debian) and bench/.venv with the server's
# requirements.txt plus bench/requirements.txt (FastAPI, uvicorn, pyinstrument). The engine
# benchmark uses the WhisperX venv that scripts/setup-engine.sh made, when it is there.
set -euo pipefail
repo=$(dirname "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")")
cd "$repo"
say() { printf 'bench: %s\n' "$*" >&2; }

if ! command -v wrk >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    say "installing wrk (the HTTP load generator)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq wrk >/dev/null
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
venv=bench/.venv
stamp=$venv/.requirements-$(cat requirements.txt bench/requirements.txt | sha256sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
    say "creating $venv"
    [ -x $venv/bin/python ] || "$python" -m venv $venv
    $venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt -r bench/requirements.txt
    rm -f $venv/.requirements-*
    touch "$stamp"
fi
$venv/bin/python -m bench "$@"
exec $venv/bin/python bench/report.py  # docs/performance.md from the results just written
