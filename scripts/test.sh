#!/usr/bin/env bash
# Sets up (scripts/setup.sh --dev) and runs the whole test suite, the real-engine tests included.
# Extra arguments go to pytest: -m "not slow" is the inner loop (in-process and unit tests),
# -m engine the real-WhisperX tests only, -k cancel a selection.
set -euo pipefail
repo=$(dirname "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")")
cd "$repo"
scripts/setup.sh --dev
exec .venv/bin/python -m pytest "$@"
