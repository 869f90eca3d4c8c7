#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs whisperd with the shipped whisper_api.conf on 127.0.0.1:8181,
# with the real WhisperX engine and Whisper tiny.en on the CPU. Ctrl-C stops it.
# The first run creates an API token named 'newcomer' and shows it (scripts/newcomer.sh: on the
# terminal or stdout, never on stderr where the server logs); the ledger keeps only its hash, so
# later runs cannot show it again (they say how to make a new one).
set -euo pipefail
repo=$(dirname "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")")
cd "$repo"
scripts/setup.sh
# The token and how to use it, never on stderr, the stream the server logs to (see newcomer.sh).
scripts/newcomer.sh
exec .venv/bin/python whisperd.py
