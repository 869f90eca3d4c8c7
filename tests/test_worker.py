"""The warm engine's plumbing (WHISPER_ENGINE=worker) against the fake worker: reuse, cancel, crash, hang."""

from __future__ import annotations

import functools
import hashlib

import pytest

from conftest import alive, wait_until


@pytest.fixture
def worker_server(make_server):
    def start(start: bool = True, **env):
        settings = dict(WHISPER_ENGINE="worker", WHISPER_KILL_GRACE_SECONDS="0.5")
        settings.update(env)
        return make_server(start=start, **settings)

    return start


def workers(server) -> list[dict]:
    return [run for run in server.engine_runs() if run.get("worker")]


def jobs_run(server) -> list[dict]:
    return [run for run in server.engine_runs() if run.get("worker_job")]


def engine_status(server) -> dict:
    return server.api("GET", "/status").json()["engine"]


wait_for = functools.partial(wait_until, timeout=10.0)


def test_one_worker_serves_many_jobs_and_status_shows_it(worker_server):
    server = worker_server()
    wait_for(lambda: engine_status(server)["loaded_models"] == ["tiny.en"], what="the preloaded model")
    for _ in range(3):
        response = server.submit(sync="true", diarize="false")
        assert response.status_code == 200, response.text
        assert response.json()["text"].startswith("Fake transcript of")
    assert len(workers(server)) == 1
    assert {run["pid"] for run in jobs_run(server)} == {workers(server)[0]["pid"]}
    status = server.api("GET", "/status").json()
    assert status["engine"]["state"] == "ready" and status["engine"]["mode"] == "worker"
    assert set(status) >= {"server", "processing", "resources", "security", "queue_state", "error"}


def test_the_worker_gets_the_jobs_options_and_the_token_only_on_its_pipe(worker_server):
    server = worker_server(start=False)
    # An installed diarization pipeline (offline), so that the job really asks for diarization.
    (server.root / "models" / "models--pyannote--speaker-diarization-community-1").mkdir(parents=True)
    server.start()
    response = server.submit(sync="true", diarize="true", hf_token="hf_secret_value", prompt="Hello there",
                             language="en")
    assert response.status_code == 200, response.text
    (run,) = jobs_run(server)
    job = run["worker_job"]
    assert job["prompt"] == "Hello there" and job["language"] == "en" and job["device"] == "cpu"
    assert job["compute_type"] == "int8" and job["model"].endswith("/tiny.en")
    assert run["hf_token_sha256"] == hashlib.sha256(b"hf_secret_value").hexdigest()
    assert "hf_secret_value" not in " ".join(workers(server)[0]["argv"])
    assert "hf_secret_value" not in server.log()


def test_cancel_kills_the_worker_and_a_fresh_one_serves_the_next_job(worker_server):
    server = worker_server()
    job_id = server.submit_ok(prompt="fake:slow", diarize="false")
    wait_for(lambda: server.status(job_id).json()["status"] == "Processing", what="Processing")
    wait_for(lambda: jobs_run(server), what="the job reaching the worker")
    first = workers(server)[0]["pid"]
    assert server.api("DELETE", f"/transcription/{job_id}").status_code == 200
    assert server.status(job_id).status_code == 410
    assert not alive(first)
    assert server.files_gone()
    wait_for(lambda: len(workers(server)) == 2, what="a fresh worker")
    response = server.submit(sync="true", diarize="false")
    assert response.status_code == 200, response.text
    assert jobs_run(server)[-1]["pid"] == workers(server)[1]["pid"]


def test_a_job_time_out_kills_a_worker_that_ignores_sigterm(worker_server):
    server = worker_server(WHISPER_JOB_TIMEOUT_SECONDS="0.5", FAKE_WHISPERX_MODE="hang")
    job_id = server.submit_ok(diarize="false")
    status = server.wait_status(job_id, timeout=20)
    assert status["status"] == "Failed" and "WHISPER_JOB_TIMEOUT_SECONDS" in status["data"]
    first = workers(server)[0]["pid"]
    wait_for(lambda: not alive(first), what="the hung worker to be killed")


def test_a_worker_crash_retries_the_job_then_fails_it_as_poison(worker_server):
    server = worker_server(WHISPER_MAX_ATTEMPTS="2")
    job_id = server.submit_ok(prompt="fake:crash", diarize="false")
    status = server.wait_status(job_id, timeout=30)
    assert status["status"] == "Failed"
    assert "gave up after 2 attempts" in status["data"] and "SIGSEGV" in status["data"], status
    assert len(jobs_run(server)) == 2
    response = server.submit(sync="true", diarize="false")
    assert response.status_code == 200, response.text
    assert engine_status(server)["restarts"] >= 2
    assert all(not alive(run["pid"]) for run in workers(server)[:-1])


def test_a_worker_that_hangs_at_start_is_killed_and_the_job_fails(worker_server):
    server = worker_server(FAKE_WHISPERX_WORKER_START="hang", WHISPER_WORKER_START_SECONDS="2")
    job_id = server.submit_ok(diarize="false")
    status = server.wait_status(job_id, timeout=20)
    assert status["status"] == "Failed" and "did not start within" in status["data"], status
    wait_for(lambda: workers(server) and not any(alive(run["pid"]) for run in workers(server)),
             what="the hung worker to be killed")
    engine = engine_status(server)
    assert engine["state"] in ("failed", "restarting", "starting") and "did not start" in engine["reason"]


def test_a_worker_that_cannot_start_fails_jobs_with_its_reason_and_health(worker_server):
    server = worker_server(FAKE_WHISPERX_WORKER_START="fail")
    job_id = server.submit_ok(diarize="false")
    status = server.wait_status(job_id, timeout=20)
    assert status["status"] == "Failed" and "No module named 'whisperx'" in status["data"], status
    health = server.api("GET", "/health", token=None)
    assert health.status_code == 503, health.text
    assert "engine worker cannot start" in health.json()["checks"]["engine"]


def test_health_is_ok_with_a_ready_worker(worker_server):
    server = worker_server()
    wait_for(lambda: engine_status(server)["state"] == "ready", what="ready")
    health = server.api("GET", "/health", token=None)
    assert health.status_code == 200 and health.json()["checks"]["engine"] == "ok", health.text


def test_engine_failures_are_the_jobs_alone(worker_server):
    server = worker_server()
    bad = server.submit_ok(prompt="fake:fail", diarize="false")
    assert server.wait_status(bad)["data"] == "RuntimeError: fake engine failure"
    response = server.submit(sync="true", diarize="false")
    assert response.status_code == 200
    assert len(workers(server)) == 1


def test_stopping_the_server_stops_the_worker(worker_server):
    server = worker_server()
    wait_for(lambda: workers(server), what="the worker")
    pid = workers(server)[0]["pid"]
    wait_for(lambda: engine_status(server)["state"] == "ready", what="ready")
    assert server.stop() == 0
    wait_for(lambda: not alive(pid), what="the worker to end with the server")


def test_a_killed_server_leaves_no_worker_behind(worker_server):
    server = worker_server()
    wait_for(lambda: engine_status(server)["state"] == "ready", what="ready")
    pid = workers(server)[0]["pid"]
    server.kill9()
    wait_for(lambda: not alive(pid), what="the worker to notice its server is gone")


def test_concurrent_jobs_share_one_worker(worker_server):
    server = worker_server(ENABLE_CONCURRENCY="true", MAX_CONCURRENT_JOBS="2", FAKE_WHISPERX_SLOW_SECONDS="1")
    ids = [server.submit_ok(prompt="fake:slow", diarize="false") for _ in range(2)]
    for job_id in ids:
        assert server.wait_status(job_id)["status"] == "Completed"
    # Side by side: each started before the other finished (the speed-up is measured by
    # bench/worker_concurrency.py, not asserted here).
    first, second = (server.rows("SELECT started_at, finished_at FROM jobs WHERE id=?", (j,))[0] for j in ids)
    assert first["started_at"] < second["finished_at"] and second["started_at"] < first["finished_at"]
    (worker,) = workers(server)
    assert worker["env_jobs"] == "2"
