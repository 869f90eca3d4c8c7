#!/usr/bin/env bash
# Sets up (scripts/setup.sh --dev) and runs the whole test suite, the real-engine tests included.
# Extra arguments go to pytest (e.g. -k cancel, or -m "not engine" for the fast tests only).
set -euo pipefail
repo=$(dirname "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")")
cd "$repo"
scripts/setup.sh --dev
exec .venv/bin/python -m pytest "$@"
