"""The engine worker's model cache (LRU, idle unload), without WhisperX: loading is stubbed."""

from __future__ import annotations

import io
import json

import pytest

from whisperd import engine_worker


@pytest.fixture
def events(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(engine_worker, "_PROTOCOL", out)
    loads = []
    monkeypatch.setattr(engine_worker, "_load_pipeline", lambda key, inter: loads.append(key.name()) or object())
    clock = [1000.0]
    monkeypatch.setattr(engine_worker.time, "monotonic", lambda: clock[0])

    def read():
        return [json.loads(line) for line in out.getvalue().splitlines()]

    return read, loads, clock


def key(name: str) -> engine_worker.ModelKey:
    return engine_worker.ModelKey.of({"model": f"/models/{name}", "device": "cpu", "compute_type": "int8"})


def test_models_are_kept_least_recently_used_first(events):
    read, loads, _ = events
    models = engine_worker.Models(limit=2, idle=0, inter_threads=1)
    for name in ("a", "b", "a", "c", "a"):
        models.acquire(key(name))
        models.release(key(name))
    assert loads == ["a", "b", "c"]  # "a" stayed loaded; "b" was the least recent when "c" came
    assert read()[-1] == {"event": "models", "loaded": ["c", "a"]}


def test_idle_models_are_unloaded_but_not_while_in_use(events):
    read, loads, clock = events
    models = engine_worker.Models(limit=2, idle=60, inter_threads=1)
    models.acquire(key("a"))
    models.acquire(key("b"))
    models.release(key("b"))
    clock[0] += 61
    models.drop_idle()
    assert read()[-1] == {"event": "models", "loaded": ["a"]}  # "a" is still in use
    models.release(key("a"))
    clock[0] += 61
    models.drop_idle()
    assert read()[-1] == {"event": "models", "loaded": []}
    models.acquire(key("a"))
    assert loads == ["a", "b", "a"]


def test_a_single_line_error_keeps_its_class_and_ffmpeg_keeps_its_last_line():
    assert engine_worker.short_reason(ValueError("Unsupported language: xx")) == "ValueError: Unsupported language: xx"
    ffmpeg = RuntimeError("Failed to load audio: ffmpeg version 5.1\n  libavformat\nOutput file #0 does not contain any stream\n")
    assert engine_worker.short_reason(ffmpeg) == "Output file #0 does not contain any stream"
