"""One warm engine per device (WHISPER_DEVICES=cpu,cpu on this CPU box), against the fake worker:
placement by model then by load, per-device slots, a crash that costs only its device's jobs, and
/status and /metrics per device."""

from __future__ import annotations

import functools

import pytest

from conftest import alive, metric, wait_until

wait_for = functools.partial(wait_until, timeout=15.0)


@pytest.fixture
def devices_server(make_server):
    def start(**env):
        settings = dict(WHISPER_ENGINE="worker", WHISPER_DEVICES="cpu,cpu", WHISPER_KILL_GRACE_SECONDS="0.5")
        settings.update(env)
        server = make_server(start=False, **settings)
        (server.root / "models" / "small.en").mkdir(parents=True, exist_ok=True)
        (server.root / "models" / "small.en" / "model.bin").write_bytes(b"fake weights")
        return server.start()

    return start


def workers(server) -> list[dict]:
    return [run for run in server.engine_runs() if run.get("worker")]


def pid_of(server, job_id: str) -> int:
    (run,) = [run for run in server.engine_runs() if (run.get("worker_job") or {}).get("id") == job_id][-1:]
    return run["pid"]


def engine(server) -> dict:
    return server.api("GET", "/status").json()["engine"]


def test_jobs_go_to_the_device_holding_their_model(devices_server):
    server = devices_server(WHISPER_PRELOAD_MODEL="false")
    wait_for(lambda: [d["state"] for d in engine(server)["devices"]] == ["ready", "ready"], what="two workers")
    assert len({run["pid"] for run in workers(server)}) == 2  # one engine process per device
    first = server.submit_ok(model="tiny.en", diarize="false")
    assert server.wait_status(first)["status"] == "Completed"
    other = server.submit_ok(model="small.en", diarize="false")
    assert server.wait_status(other)["status"] == "Completed"
    assert pid_of(server, first) != pid_of(server, other)  # the idle device took the other model
    for model, wanted in (("tiny.en", pid_of(server, first)), ("small.en", pid_of(server, other))) * 2:
        job_id = server.submit_ok(model=model, diarize="false")
        assert server.wait_status(job_id)["status"] == "Completed"
        assert pid_of(server, job_id) == wanted, model
    devices = engine(server)["devices"]
    assert sorted(name for d in devices for name in d["loaded_models"]) == ["small.en", "tiny.en"]
    assert all(d["device"] == "cpu" and d["slots"] == 1 and d["rss_mib"] > 0 for d in devices)
    assert sorted(engine(server)["loaded_models"]) == ["small.en", "tiny.en"]
    text = server.api("GET", "/metrics").text
    assert 'whisperd_engine_device_model_loaded{device="0:cpu",model=' in text
    assert metric(server, 'whisperd_engine_device_memory_bytes{device="1:cpu"}') > 0


def test_max_concurrent_jobs_is_per_device_and_the_least_busy_device_is_chosen(devices_server):
    server = devices_server(ENABLE_CONCURRENCY="true", MAX_CONCURRENT_JOBS="1", FAKE_WHISPERX_SLOW_SECONDS="2")
    wait_for(lambda: all(d["loaded_models"] == ["tiny.en"] for d in engine(server)["devices"]), what="preloads")
    ids = [server.submit_ok(prompt="fake:slow", diarize="false") for _ in range(2)]
    wait_for(lambda: [d["running_jobs"] for d in engine(server)["devices"]] == [1, 1], what="one job per device")
    assert metric(server, 'whisperd_engine_device_running_jobs{device="0:cpu"}') == 1
    for job_id in ids:
        assert server.wait_status(job_id)["status"] == "Completed"
    assert pid_of(server, ids[0]) != pid_of(server, ids[1])
    # Side by side, although each device runs one job at a time.
    first, second = (server.rows("SELECT started_at, finished_at FROM jobs WHERE id=?", (j,))[0] for j in ids)
    assert first["started_at"] < second["finished_at"] and second["started_at"] < first["finished_at"]


def test_a_crash_takes_back_only_its_own_devices_job(devices_server):
    server = devices_server(ENABLE_CONCURRENCY="true", MAX_CONCURRENT_JOBS="1", FAKE_WHISPERX_SLOW_SECONDS="3",
                            WHISPER_MAX_ATTEMPTS="2")
    wait_for(lambda: all(d["loaded_models"] == ["tiny.en"] for d in engine(server)["devices"]), what="preloads")
    slow = server.submit_ok(prompt="fake:slow", diarize="false")
    wait_for(lambda: sum(d["running_jobs"] for d in engine(server)["devices"]) == 1, what="the slow job running")
    survivor = pid_of(server, slow)
    crash = server.submit_ok(prompt="fake:crash", diarize="false")
    status = server.wait_status(crash, timeout=30)
    assert status["status"] == "Failed" and "SIGSEGV" in status["data"], status
    done = server.wait_status(slow, timeout=30)
    assert done["status"] == "Completed"
    assert pid_of(server, slow) == survivor and alive(survivor)  # its device's worker never restarted
    (row,) = server.rows("SELECT attempts FROM jobs WHERE id=?", (slow,))
    assert row["attempts"] == 1
    restarts = {d["pid"] == survivor: d["restarts"] for d in engine(server)["devices"]}
    assert restarts[True] == 0 and restarts[False] >= 1
    # Both devices serve again.
    response = server.submit(sync="true", diarize="false")
    assert response.status_code == 200, response.text


def test_without_whisper_devices_one_engine_keeps_whisper_device(make_server):
    server = make_server(WHISPER_ENGINE="worker")
    wait_for(lambda: server.api("GET", "/status").json()["engine"]["loaded_models"] == ["tiny.en"], what="preload")
    assert "devices" not in engine(server)
    assert len(workers(server)) == 1
    response = server.submit(sync="true", diarize="false")
    assert response.status_code == 200, response.text
    (job,) = [run for run in server.engine_runs() if run.get("worker_job")]
    assert (job["worker_job"]["device"], job["worker_job"]["device_index"]) == ("cpu", 0)


def test_a_bad_device_list_stops_start_up():
    from whisperd.config import ConfigError, load, parse_devices

    assert parse_devices("cuda:0, cuda:1") == [("cuda", "0"), ("cuda", "1")]
    assert parse_devices("cpu,cpu") == [("cpu", "0"), ("cpu", "0")]
    for bad in ("gpu:0", "cuda:x", "cpu:1"):
        with pytest.raises(ConfigError) as refused:
            load({"WHISPER_DEVICES": bad})
        assert "WHISPER_DEVICES" in str(refused.value)


def test_the_engine_host_serves_every_http_process_with_one_worker_per_device(devices_server):
    server = devices_server(HTTP_WORKER_NUMBER="2", ENABLE_CONCURRENCY="true", MAX_CONCURRENT_JOBS="1",
                            FAKE_WHISPERX_SLOW_SECONDS="2", WHISPER_API_ALLOW_ANY_TOKEN="false")
    token = server.create_token("alice", "--admin")  # /status shows the engine to admins

    def shown() -> dict:
        return server.api("GET", "/status", token=token).json()["engine"]

    wait_for(lambda: [d["state"] for d in shown().get("devices", [])] == ["ready", "ready"], what="two workers")
    assert shown()["shared"] is True
    ids = [server.submit_ok(token=token, prompt="fake:slow", diarize="false") for _ in range(2)]
    for job_id in ids:
        assert server.wait_status(job_id, token=token, timeout=30)["status"] == "Completed"
    assert pid_of(server, ids[0]) != pid_of(server, ids[1])
    assert len(workers(server)) == 2
