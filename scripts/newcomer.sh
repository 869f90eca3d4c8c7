#!/usr/bin/env bash
# Creates the API token 'newcomer' on the first run and shows it, with a curl line to try it
# (scripts/serve.sh runs this before starting the server). Later runs say how to make a new one.
#
# The note never goes to stderr: the server logs to stderr, and a log file must not hold a live
# token. It goes to stdout when that is a terminal or a different file from stderr; when both
# are one stream (2>&1 into a log), to the terminal (/dev/tty); with no terminal either, into a
# file only the owner can read, whose path (not the token) is printed.
set -euo pipefail
repo=$(dirname "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")")
cd "$repo"
port=${WHISPER_API_PORT:-8181}
audio=$(readlink -f ../shared/fixtures/jfk.flac 2>/dev/null || echo /path/to/audio.wav)
python=${WHISPERD_PYTHON:-.venv/bin/python}

errors=$(mktemp)
trap 'rm -f "$errors"' EXIT
if created=$("$python" whisperd.py token create --name newcomer 2>"$errors"); then
    token=$(printf '%s\n' "$created" | tail -n 1)
    note="Your API token (shown only now; keep it somewhere safe):

  $token
"
elif ! grep -q "already exists" "$errors"; then
    cat "$errors" >&2
    exit 1
else
    token='YOUR_TOKEN'
    note="The token 'newcomer' was created by an earlier run and cannot be shown again. For a new one:

  .venv/bin/python whisperd.py token revoke newcomer
  .venv/bin/python whisperd.py token create --name newcomer
"
fi

message="
whisperd is starting on http://127.0.0.1:$port. $note
In another terminal, transcribe a file:

  curl -H \"Authorization: Bearer $token\" -F file=@$audio -F sync=true http://127.0.0.1:$port/transcription
"

same_file() { [ "$(stat -L -c %d:%i "/proc/$$/fd/$1" 2>/dev/null)" = "$(stat -L -c %d:%i "/proc/$$/fd/$2" 2>/dev/null)" ]; }

if [ -t 1 ] || ! same_file 1 2; then
    printf '%s\n' "$message"
elif { : >/dev/tty; } 2>/dev/null; then
    printf '%s\n' "$message" >/dev/tty
elif [ "$token" != YOUR_TOKEN ]; then
    saved=${XDG_CONFIG_HOME:-$HOME/.config}/whisperd/newcomer-token
    mkdir -p "$(dirname "$saved")"
    (umask 077 && printf '%s\n' "$token" >"$saved")
    printf 'whisperd: the new API token newcomer is in %s (readable by you only); stdout and stderr are one stream, so it is not printed\n' "$saved"
fi
