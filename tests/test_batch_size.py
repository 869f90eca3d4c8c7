"""The per-job `batch_size` form field (WhisperX's --batch_size) through real HTTP: stored with the
job, passed to the CLI engine's argv and the warm worker's job line, a device's own default
(WHISPER_DEVICES' `cpu=4`) where the job names none, and every bad value refused with nothing kept."""

from __future__ import annotations

import functools

import pytest

from conftest import JFK, REPO, wait_until

wait_for = functools.partial(wait_until, timeout=15.0)


def cli_runs(server) -> list[dict]:
    return [run for run in server.engine_runs() if "argv" in run and not run.get("worker")]


def batch_flag(argv: list[str]) -> str | None:
    return argv[argv.index("--batch_size") + 1] if "--batch_size" in argv else None


def test_the_cli_engine_gets_the_jobs_batch_size(make_server):
    server = make_server()
    asked = server.submit_ok(batch_size="16", diarize="false")
    plain = server.submit_ok(diarize="false")
    for job_id in (asked, plain):
        assert server.wait_status(job_id)["status"] == "Completed"
    flags = sorted((batch_flag(run["argv"]) or "none") for run in cli_runs(server))
    assert flags == ["16", "none"]  # the job's own; WhisperX's default (8) left off the spec's command line
    stored = dict(server.rows("SELECT id, batch_size FROM jobs"))
    assert stored == {asked: 16, plain: None}


@pytest.mark.parametrize("value", ["0", "-1", "257", "abc", "1.5", "+4", "1_0", "\u00b2", "\u0663", "9" * 30])
def test_a_bad_batch_size_is_refused_and_nothing_is_kept(make_server, value):
    server = make_server()
    response = server.submit(batch_size=value, diarize="false")
    assert response.status_code == 400, response.text
    assert "'batch_size' must be a whole number from 1 to 256" in response.json()["error"]
    assert server.rows("SELECT count(*) FROM jobs")[0][0] == 0
    assert server.files_gone()
    assert cli_runs(server) == []


def test_a_device_default_serves_jobs_that_name_none(make_server):
    server = make_server(start=False, WHISPER_ENGINE="worker", WHISPER_DEVICES="cpu=4,cpu", WHISPER_BATCH_SIZE="6",
                         WHISPER_PRELOAD_MODEL="false")
    (server.root / "models" / "small.en").mkdir(parents=True, exist_ok=True)
    (server.root / "models" / "small.en" / "model.bin").write_bytes(b"fake weights")
    server.start()
    engine = lambda: server.api("GET", "/status").json()["engine"]  # noqa: E731
    wait_for(lambda: [d["state"] for d in engine()["devices"]] == ["ready", "ready"], what="two workers")
    assert [d["batch_size"] for d in engine()["devices"]] == [4, 6]
    # Both idle: tiny.en goes to the first device; small.en then to the idle one holding no model.
    ids = []
    for fields in ({"model": "tiny.en"}, {"model": "small.en"}, {"model": "small.en", "batch_size": "20"}):
        ids.append(server.submit_ok(diarize="false", **fields))
        assert server.wait_status(ids[-1])["status"] == "Completed"  # one at a time: placement by model alone
    jobs = {run["worker_job"]["id"]: run for run in server.engine_runs() if run.get("worker_job")}
    pids = [d["pid"] for d in engine()["devices"]]
    assert [pids.index(jobs[job_id]["pid"]) for job_id in ids] == [0, 1, 1]
    assert [jobs[job_id]["worker_job"]["batch_size"] for job_id in ids] == [4, 6, 20]


@pytest.mark.engine
def test_the_real_engine_runs_with_a_jobs_batch_size(make_server):
    """WhisperX's own command line takes the job's --batch_size (tiny.en on the CPU, offline)."""
    server = make_server(WHISPER_CMD=str(REPO / "whisperx.sh"), WHISPER_MODELS_DIR=str(REPO / "models"),
                         WHISPER_DEVICE="cpu", WHISPER_OFFLINE="true", SYNC_REQUEST_TIMEOUT_SECONDS="300")
    response = server.submit(JFK, sync="true", diarize="false", batch_size="2", timeout=300)
    assert response.status_code == 200, response.text
    assert "ask not what your country can do for you" in response.json()["text"].lower()
    assert server.rows("SELECT batch_size FROM jobs")[0][0] == 2


def test_through_the_engine_host_a_job_gets_its_devices_default(make_server):
    """With several HTTP processes the engine host places the job: the default is its device's there."""
    server = make_server(WHISPER_ENGINE="worker", WHISPER_DEVICES="cpu=5", HTTP_WORKER_NUMBER="2",
                         WHISPER_API_ALLOW_ANY_TOKEN="false")
    token = server.create_token("alice", "--admin")
    wait_for(lambda: server.api("GET", "/status", token=token).json()["engine"].get("shared") is True,
             what="the engine host")
    ids = [server.submit_ok(token=token, diarize="false"), server.submit_ok(token=token, diarize="false", batch_size="7")]
    for job_id in ids:
        assert server.wait_status(job_id, token=token)["status"] == "Completed"
    jobs = {run["worker_job"]["id"]: run["worker_job"] for run in server.engine_runs() if run.get("worker_job")}
    assert [jobs[job_id]["batch_size"] for job_id in ids] == [5, 7]
