"""Voice activity detection (WHISPER_VAD): Silero from faster-whisper's wheel, offline, in both
engines; pyannote on request. The real WhisperX (tiny.en on the CPU, no network)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import JFK, REPO
from test_e2e import jfk_through_both_engines

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("vad", ["silero", "pyannote"])
def test_both_engines_give_the_same_transcript_with_either_vad(make_server, vad):
    bodies = jfk_through_both_engines(make_server, WHISPER_VAD=vad)
    assert bodies["cli"]["segments"] == bodies["worker"]["segments"]
    assert bodies["cli"]["text"] == bodies["worker"]["text"]
    assert "ask not what your country can do for you" in bodies["worker"]["text"].lower()


def test_the_cli_entry_takes_whisperx_arguments_and_writes_its_files_offline(tmp_path):
    """whisperx.sh runs whisperd/engine_cli.py: WhisperX's own CLI, `--vad_method silero` served
    from faster-whisper's bundled model with no network (HF_HUB_OFFLINE, no torch.hub cache)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"], "HF_HUB_OFFLINE": "1",
           "TORCH_HOME": str(tmp_path / "torch")}
    env.update({k: v for k, v in os.environ.items() if k in ("XDG_DATA_HOME", "WHISPERX_VENV")})
    done = subprocess.run([str(REPO / "whisperx.sh"), str(JFK), "--model", str(REPO / "models" / "tiny.en"),
                           "--output_dir", str(tmp_path), "--output_format", "all", "--device", "cpu",
                           "--compute_type", "int8", "--no_align", "--language", "en", "--vad_method", "silero"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "jfk.json", "jfk.srt", "jfk.tsv", "jfk.txt", "jfk.vtt"]
    result = json.loads((tmp_path / "jfk.json").read_text())
    assert set(result) == {"segments", "language"} and result["language"] == "en"
    assert "ask not what your country can do for you" in result["segments"][0]["text"].lower()
    assert not (tmp_path / "torch" / "hub").exists()  # nothing fetched through torch.hub

