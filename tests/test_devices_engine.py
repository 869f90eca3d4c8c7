"""WHISPER_DEVICES with the real WhisperX (tiny.en on the CPU, offline): one warm worker per device."""

from __future__ import annotations

import pytest

from conftest import JFK, REPO

pytestmark = pytest.mark.engine


def test_two_cpu_devices_run_the_real_engine(make_server):
    """WHISPER_DEVICES=cpu,cpu with the real WhisperX: two warm workers, each job on one of them."""
    server = make_server(WHISPER_ENGINE="worker", WHISPER_CMD=str(REPO / "whisperx.sh"), WHISPER_DEVICES="cpu,cpu",
                         WHISPER_MODELS_DIR=str(REPO / "models"), WHISPER_DEVICE="cpu", WHISPER_OFFLINE="true",
                         SYNC_REQUEST_TIMEOUT_SECONDS="300", ENABLE_CONCURRENCY="true", MAX_CONCURRENT_JOBS="1")
    responses = [server.submit(JFK, sync="true", diarize="false", timeout=300) for _ in range(2)]
    for response in responses:
        assert response.status_code == 200, response.text
        assert "ask not what your country can do for you" in response.json()["text"].lower()
    devices = server.api("GET", "/status").json()["engine"]["devices"]
    assert len({d["pid"] for d in devices}) == 2 and all(d["state"] == "ready" for d in devices)
    assert all(d["loaded_models"] == ["tiny.en"] for d in devices)  # both preloaded the default model
