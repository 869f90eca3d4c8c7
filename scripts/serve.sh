#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs whisperd with the shipped whisper_api.conf on 127.0.0.1:8181,
# with the real WhisperX engine and Whisper tiny.en on the CPU. Ctrl-C stops it.
set -euo pipefail
repo=$(dirname "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")")
cd "$repo"
scripts/setup.sh
port=${WHISPER_API_PORT:-8181}
cat >&2 <<MSG

whisperd is starting on http://127.0.0.1:$port. In another terminal, transcribe a file:

  curl -H "Authorization: Bearer any-token" -F file=@$(readlink -f ../shared/fixtures/jfk.flac 2>/dev/null || echo /path/to/audio.wav) -F sync=true http://127.0.0.1:$port/transcription

MSG
exec .venv/bin/python whisperd.py
