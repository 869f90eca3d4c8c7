#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs whisperd with the shipped whisper_api.conf on 127.0.0.1:8181,
# with the real WhisperX engine and Whisper tiny.en on the CPU. Ctrl-C stops it.
# The first run creates an API token named 'newcomer' and prints it; the ledger keeps only its
# hash, so later runs cannot show it again (they say how to make a new one).
set -euo pipefail
repo=$(dirname "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")")
cd "$repo"
scripts/setup.sh
port=${WHISPER_API_PORT:-8181}
audio=$(readlink -f ../shared/fixtures/jfk.flac 2>/dev/null || echo /path/to/audio.wav)

if created=$(.venv/bin/python whisperd.py token create --name newcomer 2>/tmp/whisperd-token.$$); then
    rm -f /tmp/whisperd-token.$$
    token=$(printf '%s\n' "$created" | tail -n 1)
    note="Your API token (shown only now; keep it somewhere safe):

  $token
"
elif ! grep -q "already exists" /tmp/whisperd-token.$$; then
    cat /tmp/whisperd-token.$$ >&2
    rm -f /tmp/whisperd-token.$$
    exit 1
else
    rm -f /tmp/whisperd-token.$$
    token='YOUR_TOKEN'
    note="The token 'newcomer' was created by an earlier run and cannot be shown again. For a new one:

  .venv/bin/python whisperd.py token revoke newcomer
  .venv/bin/python whisperd.py token create --name newcomer
"
fi

cat >&2 <<MSG

whisperd is starting on http://127.0.0.1:$port. $note
In another terminal, transcribe a file:

  curl -H "Authorization: Bearer $token" -F file=@$audio -F sync=true http://127.0.0.1:$port/transcription

MSG
exec .venv/bin/python whisperd.py
