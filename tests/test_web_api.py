"""The page's server side: static files, GET /models, live progress, and the SSE status stream."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid

import pytest

from conftest import REPO, wait_until


def read_events(server, job_id: str, timeout: float = 30, events: list | None = None) -> list[dict]:
    """Every `status` event of the stream, in order, read until the server ends it (appended to
    `events` as they come, for a test that acts on the first)."""
    events = [] if events is None else events
    with server.api("GET", f"/transcription/{job_id}/events", stream=True, timeout=timeout) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        block = []
        for line in response.iter_lines(decode_unicode=True):
            if line:
                block.append(line)
                continue
            fields = dict(part.split(": ", 1) for part in block if not part.startswith(":"))
            block = []
            if fields.get("event") == "status":
                events.append({"id": int(fields["id"]), **json.loads(fields["data"])})
    return events


# -- the page's files -----------------------------------------------------------------------


def test_page_is_served_without_a_token_with_a_strict_policy(server):
    response = server.api("GET", "/", token=None)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    for path in re.findall(r'(?:src|href)="(/static/[^"]+)"', response.text):
        assert server.api("GET", path, token=None).status_code == 200, path
    missing = server.api("GET", "/static/nothing.js", token=None)
    assert missing.status_code == 404 and missing.json() == {"error": "no such file"}
    assert server.api("GET", "/static/../whisperd/config.py", token=None).status_code in (403, 404)


def test_page_loads_nothing_from_elsewhere():
    for path in (REPO / "whisperd" / "static").iterdir():
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(?:src|href|url)\s*[=(]\s*[\"']?(?:https?:)?//", text), path.name


def test_models_lists_installed_models_and_defaults(server):
    assert server.api("GET", "/models", token=None).status_code == 401
    body = server.api("GET", "/models").json()
    assert body["models"] == ["tiny.en"]
    assert body["defaults"] == {"model": "tiny.en", "language": "en", "response_format": "txt", "diarize": True,
                                "task": "transcribe"}
    assert [m["name"] for m in body["model_info"]] == ["tiny.en"] and body["model_info"][0]["multilingual"] is False
    assert body["formats"] == ["txt", "srt", "vtt", "tsv", "json", "aud"]
    assert body["languages"][0] == "auto" and "fr" in body["languages"]
    assert body["can_download"] is False and body["webhooks"] is False


# -- live progress --------------------------------------------------------------------------


def test_progress_comes_from_the_engine_and_is_written_at_most_once_a_second(make_server):
    server = make_server(FAKE_WHISPERX_SLOW_SECONDS="4")
    job_id = server.submit_ok(diarize="false", prompt="fake:slow")
    changes = []  # (time, progress, stage) each time the status changed

    def completed() -> bool:  # noting each change of the status on the way
        body = server.status(job_id).json()
        if body["status"] == "Processing":
            seen = (body["progress"], body["stage"])
            if not changes or changes[-1][1:] != seen:
                changes.append((time.monotonic(), *seen))
        return body["status"] == "Completed"

    wait_until(completed, 20, "the job to complete", poll=0.02)
    assert changes[0][1:] == (0.0, "starting")
    moving = [c for c in changes if c[2] == "transcribing"]
    # The fake engine prints 10 %, 20 %, ... every 0.4 s; the ledger keeps one every second.
    assert 2 <= len(moving) <= 5, changes
    assert all(0 < c[1] <= 100 for c in moving)
    assert [c[1] for c in moving] == sorted(c[1] for c in moving)
    assert all(b[0] - a[0] >= 0.85 for a, b in zip(moving, moving[1:])), changes


# -- server-sent events ---------------------------------------------------------------------


def test_events_stream_progress_until_the_job_ends(make_server):
    server = make_server(FAKE_WHISPERX_SLOW_SECONDS="3")
    job_id = server.submit_ok(diarize="false", prompt="fake:slow")
    events = read_events(server, job_id)
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    statuses = [e["status"] for e in events]
    assert statuses[-1] == "Completed" and statuses.count("Completed") == 1
    processing = [e for e in events if e["status"] == "Processing"]
    assert any(e["progress"] and e["stage"] == "transcribing" for e in processing)
    progress = [e["progress"] for e in processing]
    assert progress == sorted(progress)
    # Each event is what GET /transcription/{id} says at that moment.
    final = dict(events[-1])
    final.pop("id")
    assert final == server.status(job_id).json()


def test_events_show_the_queue_then_a_cancel(make_server):
    server = make_server(FAKE_WHISPERX_SLOW_SECONDS="3")
    running = server.submit_ok(diarize="false", prompt="fake:slow")
    queued = server.submit_ok(diarize="false")
    events: list[dict] = []
    reader = threading.Thread(target=read_events, args=(server, queued), kwargs={"events": events})
    reader.start()
    wait_until(lambda: events, 15, "the stream's first event")  # the stream is open: the cancel will be seen
    assert server.api("DELETE", f"/transcription/{queued}").status_code == 200
    reader.join(15)
    assert not reader.is_alive()
    assert events[0] == {"id": 1, "status": "Queued", "queue_position": 1}
    assert events[-1]["status"] == "Canceled" and "canceled" in events[-1]["data"]
    server.api("DELETE", f"/transcription/{running}")


def test_events_of_a_finished_job_end_at_once_and_errors_are_json(server):
    job_id = server.submit_ok(diarize="false")
    server.wait_status(job_id)
    events = read_events(server, job_id, timeout=5)
    assert [e["status"] for e in events] == ["Completed"]
    response = server.api("GET", f"/transcription/{job_id}/events", token=None)
    assert response.status_code == 401 and "Bearer" in response.json()["error"]
    response = server.api("GET", f"/transcription/{uuid.uuid4()}/events")
    assert response.status_code == 404 and "no job" in response.json()["error"]
    assert server.api("OPTIONS", f"/transcription/{job_id}/events", token=None).headers["Allow"] == "OPTIONS, GET"


def test_a_client_leaving_the_stream_costs_nothing(make_server):
    server = make_server(FAKE_WHISPERX_SLOW_SECONDS="2")
    job_id = server.submit_ok(diarize="false", prompt="fake:slow")
    for _ in range(3):
        with server.api("GET", f"/transcription/{job_id}/events", stream=True) as response:
            next(response.iter_lines())
    assert server.wait_status(job_id)["status"] == "Completed"
    assert "Traceback" not in server.log()
