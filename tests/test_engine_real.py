"""End-to-end checks of the real WhisperX engine through whisperx.sh, and of formats.render against it.

These need the engine venv and models/tiny.en from scripts/setup-engine.sh. When either is
missing the tests fail rather than skip: an engine test that quietly skips proves nothing.
Each engine run takes about 10 s on two CPU cores.
"""

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from whisperd.formats import render

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parent.parent
WRAPPER = REPO / "whisperx.sh"
MODEL = REPO / "models" / "tiny.en"
# CI keeps shared/ beside the clone, as in the development checkout.
JFK = REPO.parent / "shared" / "fixtures" / "jfk.flac"
JFK_SAYS = (
    "And so my fellow Americans, ask not what your country can do for you, "
    "ask what you can do for your country."
)
SETUP_HINT = "run scripts/setup-engine.sh"
RUN_TIMEOUT = 300


def engine_venv():
    """The venv whisperx.sh will use, found by the same rule as the wrapper."""
    override = os.environ.get("WHISPERX_VENV")
    if override:
        return Path(override)
    digest = hashlib.sha256((REPO / "engine-requirements.txt").read_bytes()).hexdigest()[:12]
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data_home) / "whisperd" / f"engine-{digest}"


def words(text):
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def run_engine(output_dir, *extra):
    assert JFK.is_file(), f"fixture missing: {JFK}"
    assert (MODEL / "model.bin").is_file(), f"model missing: {MODEL}; {SETUP_HINT}"
    command = [
        str(WRAPPER),
        str(JFK),
        "--model", str(MODEL),
        "--device", "cpu",
        "--compute_type", "int8",
        "--language", "en",
        "--no_align",
        "--output_dir", str(output_dir),
        *extra,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert done.returncode == 0, (
        f"whisperx.sh exited {done.returncode} ({SETUP_HINT} if the engine is missing)\n"
        f"stderr tail:\n{done.stderr[-2000:]}"
    )
    return done


@pytest.fixture(scope="module")
def jfk_outputs(tmp_path_factory):
    """Run the engine twice on jfk.flac: `all` formats, then `aud` alone (it is not in `all`)."""
    all_dir = tmp_path_factory.mktemp("all")
    run_engine(all_dir, "--output_format", "all")
    aud_dir = tmp_path_factory.mktemp("aud")
    aud_run = run_engine(aud_dir, "--output_format", "aud", "--print_progress", "True", "--verbose", "False")
    return all_dir, aud_dir, aud_run


def test_engine_writes_the_documented_files(jfk_outputs):
    all_dir, aud_dir, aud_run = jfk_outputs
    assert sorted(p.name for p in all_dir.iterdir()) == ["jfk.json", "jfk.srt", "jfk.tsv", "jfk.txt", "jfk.vtt"]
    assert sorted(p.name for p in aud_dir.iterdir()) == ["jfk.aud"]
    # With --verbose False only the progress lines remain on stdout.
    assert aud_run.stdout.splitlines()[-1] == "Progress: 100.00%..."


def test_transcript_is_the_jfk_sentence(jfk_outputs):
    all_dir, _, _ = jfk_outputs
    result = json.loads((all_dir / "jfk.json").read_text(encoding="utf-8"))
    assert result["language"] == "en"
    spoken = " ".join(segment["text"] for segment in result["segments"])
    assert words(spoken) == words(JFK_SAYS)
    assert words((all_dir / "jfk.txt").read_text(encoding="utf-8")) == words(JFK_SAYS)


@pytest.mark.parametrize("fmt", ["txt", "srt", "vtt", "tsv", "json", "aud"])
def test_render_matches_the_engine_byte_for_byte(jfk_outputs, fmt):
    all_dir, aud_dir, _ = jfk_outputs
    result = json.loads((all_dir / "jfk.json").read_text(encoding="utf-8"))
    engine_file = (aud_dir if fmt == "aud" else all_dir) / f"jfk.{fmt}"
    assert render(result, fmt).encode("utf-8") == engine_file.read_bytes()


# Results the engine will not produce from jfk.flac offline (speakers, word timings, edge
# times), rendered by WhisperX's own writers in the engine venv and by render().
WRITER_CASES = [
    {"segments": [], "language": "en"},
    {
        "segments": [
            {"text": " Ça va -> bien --> oui.\t", "start": 59.9996, "end": 3599.9995, "speaker": "SPEAKER_00"},
            {"text": "  tab\there ", "start": 0.0005, "end": 0.0015},
            {"text": " 日本語 \U0001f600", "start": 3723.4567, "end": 36000.25, "speaker": "SPEAKER_01"},
        ],
        "language": "fr",
    },
    {
        "segments": [
            {
                "text": " Hello big world.",
                "start": 0.1,
                "end": 1.9,
                "speaker": "SPEAKER_00",
                "words": [
                    {"word": "Hello", "start": 0.2, "end": 0.5, "score": 0.9},
                    {"word": "big", "start": 0.6, "end": 0.8, "score": 0.8},
                    {"word": "world.", "start": 5.0, "end": 5.5, "score": 0.7},
                ],
            },
            {"text": " 42 times.", "start": 6.0, "end": 7.0, "words": [{"word": "42"}, {"word": "times.", "start": 6.5, "end": 6.9}]},
            {"text": " 7", "start": 7.5, "end": 8.0, "words": [{"word": "7"}]},
        ],
        "word_segments": [{"word": "Hello", "start": 0.2, "end": 0.5}],
        "language": "en",
    },
    {
        "segments": [
            {"text": "日本語です", "start": 0.0, "end": 1.0, "words": [{"word": "日本語", "start": 0.0, "end": 0.6}, {"word": "です", "start": 0.6, "end": 1.0}]},
        ],
        "language": "ja",
    },
]
WRITER_OPTIONS = [
    {"max_line_width": None, "max_line_count": None, "highlight_words": False},
    {"max_line_width": 8, "max_line_count": None, "highlight_words": False},
    {"max_line_width": 10, "max_line_count": 1, "highlight_words": True},
]
WRITER_SCRIPT = r"""
import json, os, sys, tempfile
from whisperx.utils import get_writer
cases, options = json.load(sys.stdin)
out = []
for result in cases:
    for opts in options:
        with tempfile.TemporaryDirectory() as d:
            files = {}
            for fmt in ("txt", "vtt", "srt", "tsv", "json", "aud"):
                get_writer(fmt, d)(result, "case.wav", opts)
                with open(os.path.join(d, "case." + fmt), encoding="utf-8") as f:
                    files[fmt] = f.read()
            out.append(files)
json.dump(out, sys.stdout)
"""


def test_render_matches_whisperx_writers_on_edge_cases():
    python = engine_venv() / "bin" / "python"
    assert python.is_file(), f"engine venv missing at {python.parent.parent}; {SETUP_HINT}"
    done = subprocess.run(
        [str(python), "-c", WRITER_SCRIPT],
        input=json.dumps([WRITER_CASES, WRITER_OPTIONS]),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    expected = iter(json.loads(done.stdout))
    for result in WRITER_CASES:
        for opts in WRITER_OPTIONS:
            want = next(expected)
            for fmt, text in want.items():
                assert render(result, fmt, **opts) == text, (fmt, opts, result)


def test_wrapper_reports_a_missing_engine(tmp_path):
    env = dict(os.environ, WHISPERX_VENV=str(tmp_path / "absent"))
    done = subprocess.run([str(WRAPPER), str(JFK)], capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 127
    assert done.stderr.strip().splitlines()[-1] == "whisperx.sh: engine not installed: run scripts/setup-engine.sh"
