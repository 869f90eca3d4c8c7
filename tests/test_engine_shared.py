"""One warm engine per box, and a job's engine troubles stay its own (issue 20; issue 13's cancels).

Against the fake worker (tests/fake_whisperx.py --whisperd-worker), through real HTTP, with real
tokens where two clients matter.
"""

from __future__ import annotations

import functools
import os
import stat
from pathlib import Path

import pytest

from conftest import alive, wait_until


wait_for = functools.partial(wait_until, timeout=20.0)


def workers(server) -> list[dict]:
    return [run for run in server.engine_runs() if run.get("worker")]


def jobs_run(server, job_id: str | None = None) -> list[dict]:
    return [run for run in server.engine_runs()
            if run.get("worker_job") and (job_id is None or run["worker_job"]["id"] == job_id)]


def worker_processes(server) -> list[int]:
    """Live engine worker processes of this server, counted in /proc (not from any log)."""
    marker = f"FAKE_WHISPERX_LOG={server.engine_log}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if b"--whisperd-worker" in cmdline and marker in environ.split(b"\0") and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


@pytest.fixture
def shared_server(make_server):
    def start(**env):
        settings = dict(WHISPER_ENGINE="worker", WHISPER_KILL_GRACE_SECONDS="0.5", WHISPER_API_ALLOW_ANY_TOKEN="false",
                        FAKE_WHISPERX_SLOW_SECONDS="2")
        settings.update(env)
        return make_server(**settings)

    return start


def test_two_http_processes_share_one_engine_worker(shared_server):
    server = shared_server(HTTP_WORKER_NUMBER="2", ENABLE_CONCURRENCY="true", MAX_CONCURRENT_JOBS="2")
    token = server.create_token("alice", "--admin")  # /status shows the engine to admins
    wait_for(lambda: server.api("GET", "/status", token=token).json()["engine"]["state"] == "ready",
             what="the shared worker")
    ids: list[str] = []
    # Until both HTTP processes have claimed jobs (each accepts connections of its own).
    while len({row["worker"] for row in server.rows("SELECT worker FROM jobs WHERE worker IS NOT NULL")}) < 2:
        assert len(ids) < 40, "one HTTP process claimed every job"
        ids += [server.submit_ok(token=token, diarize="false") for _ in range(4)]
        for job_id in ids:
            assert server.wait_status(job_id, token=token)["status"] == "Completed"
    assert len(worker_processes(server)) == 1
    (worker,) = workers(server)
    assert {run["pid"] for run in jobs_run(server)} == {worker["pid"]}
    assert worker["env_jobs"] == "2"  # the box's slots, not one process's
    statuses = [server.api("GET", "/status", token=token).json()["engine"] for _ in range(6)]
    assert all(s["shared"] and s["pid"] == worker["pid"] and s["state"] == "ready" for s in statuses)
    sock = Path(server.env["WHISPER_DB_PATH"]).parent / "engine.sock"
    mode = os.stat(sock).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert server.stop() == 0
    wait_for(lambda: not alive(worker["pid"]), what="the worker to end with the server")
    assert not sock.exists()


def test_a_killed_engine_host_comes_back_and_its_jobs_run_again(shared_server):
    server = shared_server(HTTP_WORKER_NUMBER="2")
    token = server.create_token("alice")
    job_id = server.submit_ok(token=token, diarize="false", prompt="fake:slow")
    wait_for(lambda: jobs_run(server, job_id), what="the job reaching the worker")
    host = int(next(line.split("[")[1].split("]")[0] for line in server.log().splitlines()
                    if "engine host serving" in line))
    os.kill(host, 9)
    status = server.wait_status(job_id, token=token, timeout=40)
    assert status["status"] == "Completed", status
    assert server.rows("SELECT attempts FROM jobs WHERE id=?", (job_id,))[0]["attempts"] == 1
    assert len(jobs_run(server, job_id)) == 2
    wait_for(lambda: len(worker_processes(server)) == 1, what="one worker again")


def test_a_crash_beside_other_jobs_charges_only_the_culprit(shared_server):
    server = shared_server(ENABLE_CONCURRENCY="true", MAX_CONCURRENT_JOBS="3", WHISPER_MAX_ATTEMPTS="2")
    alice, bob = server.create_token("alice"), server.create_token("bob")
    innocent = [server.submit_ok(token=alice, diarize="false", prompt="fake:slow") for _ in range(2)]
    wait_for(lambda: len(jobs_run(server)) == 2, what="alice's jobs reaching the worker")
    culprit = server.submit_ok(token=bob, diarize="false", prompt="fake:oom")
    failed = server.wait_status(culprit, token=bob, timeout=60)
    assert failed["status"] == "Failed"
    assert "gave up after 2 attempts" in failed["data"], failed
    assert "the engine was killed (signal 9, out of memory?)" in failed["data"], failed
    assert "Lightning" not in failed["data"]  # not the last unrelated log line
    for job_id in innocent:
        assert server.wait_status(job_id, token=alice, timeout=60)["status"] == "Completed"
        assert server.rows("SELECT attempts FROM jobs WHERE id=?", (job_id,))[0]["attempts"] == 1
    # After the death beside others, each suspect ran again with nothing beside it.
    retried = jobs_run(server)[3:]
    assert {run["worker_job"]["id"] for run in retried} == {*innocent, culprit}
    alone = [line for line in server.log().splitlines() if "run alone" in line]
    assert {job_id for job_id in (*innocent, culprit) if any(job_id in line for line in alone)} == {*innocent, culprit}


def test_cancels_while_the_worker_starts_kill_nothing(shared_server, tmp_path):
    gate = tmp_path / "worker-may-start"
    server = shared_server(FAKE_WHISPERX_WORKER_GATE=str(gate), ENABLE_CONCURRENCY="true", MAX_CONCURRENT_JOBS="2",
                           WHISPER_WORKER_START_SECONDS="300")
    alice, bob = server.create_token("alice"), server.create_token("bob", "--admin")
    for _ in range(8):  # right as they start: the worker is still starting
        job_id = server.submit_ok(token=alice, diarize="false", prompt="fake:slow")
        assert server.api("DELETE", f"/transcription/{job_id}", token=alice).status_code == 200
    assert server.api("GET", "/status", token=bob).json()["engine"]["state"] == "starting"
    gate.touch()
    response = server.submit(token=bob, sync="true", diarize="false")
    assert response.status_code == 200, response.text
    assert len(workers(server)) == 1  # never killed, never restarted
    engine = server.api("GET", "/status", token=bob).json()["engine"]
    assert engine["state"] == "ready" and engine["restarts"] == 0 and engine["reason"] is None
    assert server.api("GET", "/health", token=None).status_code == 200


def test_a_cancel_costs_its_own_job_only(shared_server):
    server = shared_server(ENABLE_CONCURRENCY="true", MAX_CONCURRENT_JOBS="2", FAKE_WHISPERX_SLOW_SECONDS="3")
    alice, bob = server.create_token("alice"), server.create_token("bob", "--admin")
    theirs = server.submit_ok(token=bob, diarize="false", prompt="fake:slow")
    mine = server.submit_ok(token=alice, diarize="false", prompt="fake:slow")
    wait_for(lambda: jobs_run(server, theirs) and jobs_run(server, mine), what="both jobs in the worker")
    assert server.api("DELETE", f"/transcription/{mine}", token=alice).status_code == 200
    assert server.status(mine, token=alice).status_code == 410
    done = server.wait_status(theirs, token=bob, timeout=40)
    assert done["status"] == "Completed", done
    # bob's job ran again on the fresh worker, at no cost: no attempt, no back-off, healthy throughout.
    assert server.rows("SELECT attempts FROM jobs WHERE id=?", (theirs,))[0]["attempts"] == 1
    assert len(jobs_run(server, theirs)) == 2
    engine = server.api("GET", "/status", token=bob).json()["engine"]
    assert engine["restarts"] == 0 and engine["state"] == "ready"
    assert server.api("GET", "/health", token=None).status_code == 200
