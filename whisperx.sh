#!/usr/bin/env bash
# Runs the WhisperX command line from the engine venv that scripts/setup-engine.sh installs.
#
# The venv is $WHISPERX_VENV when set, else the one named after the hash of the
# engine-requirements.txt beside this script (the same rule as setup-engine.sh).
# All arguments go to WhisperX unchanged (except --whisperd-worker, below).

if [ -n "${WHISPERX_VENV:-}" ]; then
    venv=${WHISPERX_VENV%/}
else
    # readlink -f: WHISPER_CMD may point at a symlink placed somewhere else.
    here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
    req_hash=$(sha256sum "$here/engine-requirements.txt" 2>/dev/null | cut -c1-12)
    venv=${XDG_DATA_HOME:-$HOME/.local/share}/whisperd/engine-${req_hash:-missing}
fi

if [ ! -x "$venv/bin/python" ]; then
    # One line, and the last on stderr: the server reports the last line as the job's reason.
    echo "whisperx.sh: engine not installed: run scripts/setup-engine.sh" >&2
    exit 127
fi

# --whisperd-worker (first argument): the server's long-lived engine (whisperd/engine_worker.py)
# from the same venv instead of the one-shot CLI.
if [ "${1:-}" = "--whisperd-worker" ]; then
    shift
    here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
    exec "$venv/bin/python" "$here/whisperd/engine_worker.py" "$@"
fi

# --whisperd-diarize RESULT.json (first argument): the CLI path's speaker step
# (whisperd/engine_diarize.py), run after WhisperX wrote RESULT.json; its options come on stdin.
if [ "${1:-}" = "--whisperd-diarize" ]; then
    shift
    here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
    exec "$venv/bin/python" "$here/whisperd/engine_diarize.py" "$@"
fi

# exec, not a child: the server's TERM/KILL to the process group and the exit status then
# belong to WhisperX itself. whisperd/engine_cli.py is WhisperX's own CLI (same arguments, same
# output files) whose `--vad_method silero` uses the Silero model in faster-whisper's wheel
# instead of a torch.hub download; rather than bin/whisperx, whose shebang still names the
# temporary directory the venv was built in.
here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
exec "$venv/bin/python" "$here/whisperd/engine_cli.py" "$@"
