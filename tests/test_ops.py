"""/health and /metrics against real servers (one and several worker processes), with the fake engine."""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import make_wav, wait_until


def scrape(server, **kwargs) -> dict[tuple[str, tuple], float]:
    response = server.api("GET", "/metrics", token=None, **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# -- health -----------------------------------------------------------------------------------


def test_health_is_open_and_small(server):
    response = server.api("GET", "/health", token=None)
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"process": "ok", "ledger": "ok", "engine": "ok", "storage": "ok",
                                                         "jobs": "ok"}}
    assert len(response.content) < 200


def test_health_fails_without_an_engine_command(make_server):
    server = make_server(WHISPER_CMD="/nonexistent/whisperx.sh")
    response = server.api("GET", "/health", token=None)
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "fail" and "WHISPER_CMD" in body["error"]
    assert body["checks"]["ledger"] == "ok" and body["checks"]["engine"] == body["error"]


def test_health_fails_while_the_ledger_cannot_be_written(server):
    # Another writer holding the lock past the probe's patience is what a stuck disk looks like.
    conn = sqlite3.connect(server.env["WHISPER_DB_PATH"], isolation_level=None, timeout=1)
    conn.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        response = server.api("GET", "/health", token=None)
        assert time.monotonic() - started < 6
    finally:
        conn.execute("ROLLBACK")
        conn.close()
    assert response.status_code == 503
    assert response.json()["checks"]["ledger"].startswith("ledger not writable")
    # The probe was left to finish, not cut off: the ledger's writer is still usable.
    wait_until(lambda: server.api("GET", "/health", token=None).status_code == 200, 10,
               "/health to be 200 again once the lock is let go")
    job_id = server.submit_ok(diarize="false")
    assert server.wait_status(job_id)["status"] == "Completed"


# -- metrics ----------------------------------------------------------------------------------


def test_metrics_count_jobs_engine_exits_uploads_and_requests(server):
    audio = make_wav(server.root / "a.wav", seconds=0.25)
    done = server.submit_ok(audio, diarize="false")
    failed = server.submit_ok(prompt="fake:fail", diarize="false")
    server.wait_status(done)
    server.wait_status(failed)
    queued_behind = server.submit_ok(prompt="fake:slow", diarize="false")
    waiting = server.submit_ok(diarize="false")
    samples = scrape(server)
    assert value(samples, "whisperd_jobs_started_total") >= 3
    assert value(samples, "whisperd_jobs_finished_total", status="Completed") == 1
    assert value(samples, "whisperd_jobs_finished_total", status="Failed") == 1
    assert value(samples, "whisperd_jobs_failed_total") == 1
    assert value(samples, "whisperd_engine_exits_total", code="0") == 1
    assert value(samples, "whisperd_engine_exits_total", code="1") == 1
    assert value(samples, "whisperd_uploads_total") == 4
    assert value(samples, "whisperd_upload_bytes_total") == audio.stat().st_size + 3 * server.default_audio.stat().st_size
    assert value(samples, "whisperd_job_duration_seconds_count") == 2
    assert value(samples, "whisperd_job_queue_wait_seconds_count") >= 3
    assert value(samples, "whisperd_http_requests_total", handler="SubmitHandler", method="POST", status="202") == 4
    assert value(samples, "whisperd_http_requests_total", handler="JobHandler", method="GET", status="200") >= 2
    assert value(samples, "whisperd_queue_depth") == 1
    assert value(samples, "whisperd_jobs", status="Queued") == 1
    assert value(samples, "whisperd_jobs", status="Processing") == 1
    assert value(samples, "whisperd_jobs", status="Failed") == 1
    server.api("DELETE", f"/transcription/{waiting}")
    server.api("DELETE", f"/transcription/{queued_behind}")

    def settled() -> bool:  # a lag sample (one per 0.5 s), the cancels counted, the queue empty
        later = scrape(server)
        return (value(later, "whisperd_ioloop_lag_seconds_count") >= 1
                and value(later, "whisperd_jobs_finished_total", status="Canceled") >= 1
                and value(later, "whisperd_queue_depth") == 0)

    wait_until(settled, 10, "a lag sample, the cancels counted and the queue empty")


def test_metrics_needs_a_token_when_configured(make_server):
    server = make_server(WHISPER_METRICS_AUTH="true")
    response = server.api("GET", "/metrics", token=None)
    assert response.status_code == 401 and "Bearer" in response.json()["error"]
    assert server.api("GET", "/metrics").status_code == 200


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="several workers need several cores")
def test_metrics_are_summed_across_worker_processes(make_server):
    server = make_server(HTTP_WORKER_NUMBER="2", ENABLE_CONCURRENCY="true", MAX_CONCURRENT_JOBS="2")
    ids = []
    threads = [threading.Thread(target=lambda: ids.append(server.submit_ok(diarize="false"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for job_id in ids:
        server.wait_status(job_id)
    assert len(server.engine_runs()) == 8
    # Each scrape lands on whichever worker accepts the connection; every one must see the total.
    for attempt in range(30):
        samples = scrape(server, headers={"Connection": "close"})
        assert value(samples, "whisperd_uploads_total") == 8
        assert value(samples, "whisperd_jobs_finished_total", status="Completed") == 8
        assert value(samples, "whisperd_jobs", status="Completed") == 8
        scrapers = set(re.findall(r"\[(\d+)\] 200 GET /metrics", server.log()))
        if len(scrapers) == 2 and attempt >= 3:
            break
    assert len(scrapers) == 2, "every scrape went to the same worker"
