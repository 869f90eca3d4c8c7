"""The ledger is the truth: restarts after kill -9, retention, several worker processes, start-up checks."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO, alive, wait_until


def test_restart_after_kill9_loses_no_job(make_server):
    server = make_server(FAKE_WHISPERX_SLOW_SECONDS="30")
    done = server.submit_ok(diarize="false", prompt="fake:ok")
    server.wait_status(done)
    failed = server.submit_ok(diarize="false", prompt="fake:fail")
    server.wait_status(failed)
    delivered = server.submit_ok(diarize="false")
    server.wait_status(delivered)
    assert server.api("GET", f"/transcription/{delivered}/result").status_code == 200
    processing = server.submit_ok(diarize="false", prompt="fake:slow")
    server.wait_status(processing, ("Processing",))
    queued = [server.submit_ok(diarize="false") for _ in range(3)]
    canceled = server.submit_ok(diarize="false")
    assert server.api("DELETE", f"/transcription/{canceled}").status_code == 200
    deadline = time.monotonic() + 5
    while len(server.engine_runs()) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    orphan_engine = server.engine_runs()[-1]["pid"]
    stray = server.root / "tmp" / "not-a-job"
    stray.mkdir(parents=True)
    (stray / "junk.wav").write_bytes(b"x")

    server.kill9()
    assert alive(orphan_engine)  # the engine has its own session: it outlives the server
    server.env["FAKE_WHISPERX_SLOW_SECONDS"] = "0.2"
    server.start()

    assert not alive(orphan_engine), "the new server must stop the engine the dead one left running"
    if not server.env.get("WHISPER_STORAGE_URL"):  # local: quarantined; S3: the scratch's, left alone
        assert not stray.exists()
    for job_id in [processing] + queued:
        assert server.wait_status(job_id)["status"] == "Completed"
    order = [run["argv"][1].split("/")[-2] for run in server.engine_runs()[4:]]
    assert order == [processing] + queued  # the interrupted job first, then FIFO
    assert server.api("GET", f"/transcription/{done}/result").status_code == 200
    assert server.status(failed).json()["status"] == "Failed"
    assert server.api("GET", f"/transcription/{delivered}/result").status_code == 410
    assert server.status(canceled).status_code == 410
    events = [r["event"] for r in server.rows("SELECT event FROM job_events WHERE job_id=? ORDER BY id", (processing,))]
    assert events[:4] == ["accepted", "started", "warning", "requeued"]
    if not server.db_url:  # SQLite's own check of its file
        with server.db() as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_job_that_keeps_killing_the_server_is_failed_as_poison(make_server):
    server = make_server(WHISPER_MAX_ATTEMPTS="2", FAKE_WHISPERX_SLOW_SECONDS="30")
    job_id = server.submit_ok(diarize="false", prompt="fake:slow")
    for _ in range(2):
        server.wait_status(job_id, ("Processing",))
        server.kill9()
        server.start()
    status = server.wait_status(job_id, ("Failed",))
    assert "gave up after 2 attempts" in status["data"]
    assert server.job_files() == []


def test_graceful_stop_requeues_running_jobs_and_exits_0(make_server):
    server = make_server(FAKE_WHISPERX_SLOW_SECONDS="30", WHISPER_SHUTDOWN_GRACE_SECONDS="1")
    job_id = server.submit_ok(diarize="false", prompt="fake:slow")
    server.wait_status(job_id, ("Processing",))
    deadline = time.monotonic() + 10  # the engine logs itself a moment after the job turns Processing
    while not server.engine_runs() and time.monotonic() < deadline:
        time.sleep(0.05)
    (run,) = server.engine_runs()
    assert server.stop(signal.SIGTERM) == 0
    assert not alive(run["pid"])
    (row,) = server.rows("SELECT status FROM jobs")
    assert row["status"] == "Queued"
    server.env["FAKE_WHISPERX_SLOW_SECONDS"] = "0.1"
    server.start()
    assert server.wait_status(job_id)["status"] == "Completed"


def test_graceful_restarts_spend_no_attempt(make_server):
    """Issue 24 item 8: two SIGTERM restarts and a kill -9 under WHISPER_MAX_ATTEMPTS=2 leave the
    job running again, not Failed "gave up after 2 attempts": only the kill -9 counts."""
    server = make_server(FAKE_WHISPERX_SLOW_SECONDS="30", WHISPER_SHUTDOWN_GRACE_SECONDS="1", WHISPER_MAX_ATTEMPTS="2")
    job_id = server.submit_ok(diarize="false", prompt="fake:slow")
    for started, how in enumerate(("SIGTERM", "SIGTERM", "kill -9"), start=1):
        server.wait_status(job_id, ("Processing",))
        wait_until(lambda: len(server.engine_runs()) >= started, what="the engine's start")
        if how == "kill -9":
            server.kill9()
            server.env["FAKE_WHISPERX_SLOW_SECONDS"] = "0.1"
        else:
            assert server.stop(signal.SIGTERM) == 0
            (row,) = server.rows("SELECT status, attempts FROM jobs")
            assert (row["status"], row["attempts"]) == ("Queued", 0)
        server.start()
    assert server.wait_status(job_id)["status"] == "Completed"
    (row,) = server.rows("SELECT attempts FROM jobs")
    assert row["attempts"] == 2  # the run the kill -9 cut short, and the one that finished


def test_retention_expires_old_jobs_but_keeps_the_row(make_server):
    server = make_server(WHISPER_JOB_RETENTION_HOURS="0.0003", WHISPER_CLEANUP_INTERVAL_HOURS="0.0002")
    job_id = server.submit_ok(diarize="false")
    server.wait_status(job_id)
    deadline = time.monotonic() + 10
    while server.status(job_id).status_code != 410 and time.monotonic() < deadline:
        time.sleep(0.1)
    response = server.status(job_id)
    assert response.status_code == 410 and "expired" in response.json()["error"]
    assert "expired" in server.api("GET", f"/transcription/{job_id}/result").json()["error"]
    assert server.job_files() == []
    (row,) = server.rows("SELECT status, expired_at FROM jobs")
    assert row["status"] == "Completed" and row["expired_at"]


def test_two_worker_processes_share_the_ledger_and_run_each_job_once(make_server):
    server = make_server(HTTP_WORKER_NUMBER="2", FAKE_WHISPERX_SLOW_SECONDS="0.3")
    assert server.api("GET", "/status").json()["server"]["worker_number"] == 2

    def one(i):
        if i % 3 == 0:  # sync waiters may sit in either process
            response = server.submit(diarize="false", sync="true")
            assert response.status_code == 200, response.text
            return None
        return server.submit_ok(diarize="false", prompt="fake:slow" if i % 2 else "")

    with ThreadPoolExecutor(6) as pool:
        ids = [job for job in pool.map(one, range(18)) if job]
    for job_id in ids:
        assert server.wait_status(job_id)["status"] == "Completed"
    runs = server.engine_runs()
    assert len(runs) == 18
    assert len({run["argv"][1] for run in runs}) == 18  # no job ran twice
    serving = {line.split("[")[1].split("]")[0] for line in server.log().splitlines() if "whisperd.access" in line}
    assert len(serving) == 2, serving  # both processes answered requests
    spans = sorted((r["started_at"], r["finished_at"]) for r in server.rows("SELECT started_at, finished_at FROM jobs"))
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start, "sequential mode: never two jobs at once, across processes too"
    pids = [run["pid"] for run in runs]
    assert len(set(pids)) == len(pids)


def test_a_dead_worker_is_replaced_and_its_job_requeued(make_server):
    server = make_server(HTTP_WORKER_NUMBER="2", FAKE_WHISPERX_SLOW_SECONDS="2")
    job_id = server.submit_ok(diarize="false", prompt="fake:slow")
    server.wait_status(job_id, ("Processing",))
    (row,) = server.rows("SELECT worker FROM jobs")
    os.kill(int(row["worker"].split(":")[1]), signal.SIGKILL)
    assert server.wait_status(job_id, timeout=30)["status"] == "Completed"
    assert server.api("GET", "/status").status_code == 200
    events = [r["event"] for r in server.rows("SELECT event FROM job_events WHERE job_id=? ORDER BY id", (job_id,))]
    assert "requeued" in events


def run_startup(env_overrides: dict[str, str], tmp_path, conf: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WHISPER")}
    conf_path = tmp_path / "whisper_api.conf"
    conf_path.write_text(conf or "")
    env.update({"WHISPER_API_CONF": str(conf_path), "WHISPER_TMP_FILES": str(tmp_path / "t"),
                "WHISPER_OUTPUT_DIR": str(tmp_path / "o"), "WHISPER_API_PORT": "1"})
    env.update(env_overrides)
    return subprocess.run([sys.executable, str(REPO / "whisperd.py")], env=env, capture_output=True, text=True, timeout=30)


def test_bad_configuration_stops_startup_with_one_line(tmp_path):
    for name, value, expected in [
        ("MAX_FILE_SIZE", "lots", "expected a whole number"),
        ("ENABLE_CONCURRENCY", "sometimes", "expected true or false"),
        ("WHISPER_DEVICE", "tpu", "expected one of cuda, cpu"),
        ("RUST_LOG", "loud", "expected one of error, warn, info, debug, trace"),
    ]:
        result = run_startup({name: value}, tmp_path)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and value in lines[0] and expected in lines[0], result.stderr
    result = run_startup({}, tmp_path, conf="MAX_CONCURRENT_JOBS = [1]\n")
    assert result.returncode == 2 and "MAX_CONCURRENT_JOBS" in result.stderr
    result = run_startup({}, tmp_path, conf="this is = = not toml")
    assert result.returncode == 2 and "not valid TOML" in result.stderr


def test_unwritable_ledger_stops_startup_with_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_startup({"WHISPER_DB_PATH": str(blocker / "sub" / "x.db")}, tmp_path)
    assert result.returncode == 1
    assert "WHISPER_DB_PATH" in result.stderr.strip().splitlines()[-1]


def test_config_precedence_environment_then_file_then_default(tmp_path):
    from whisperd import config

    conf = tmp_path / "c.toml"
    conf.write_text('WHISPER_API_PORT = "9000"\nMAX_CONCURRENT_JOBS = 3\nENABLE_CONCURRENCY = true\n'
                    'WHISPER_JOB_RETENTION_HOURS = "24"\nDEFAULT_SYNC_MODE = "yes"\n')
    loaded = config.load({"WHISPER_API_CONF": str(conf), "WHISPER_API_PORT": "9100"})
    assert loaded.WHISPER_API_PORT == 9100  # environment wins
    assert loaded.MAX_CONCURRENT_JOBS == 3 and loaded.ENABLE_CONCURRENCY is True  # TOML numbers and booleans
    assert loaded.WHISPER_JOB_RETENTION_HOURS == 24 and loaded.DEFAULT_SYNC_MODE is True  # TOML strings
    assert loaded.WHISPER_OUTPUT_FORMAT == "txt" and loaded.SYNC_REQUEST_TIMEOUT_SECONDS == 1800  # defaults
    assert loaded.max_running == 3
    assert "HF_TOKEN" in repr(config.load({"WHISPER_API_CONF": str(conf), "HF_TOKEN": "hf_secret"}))
    assert "hf_secret" not in repr(config.load({"WHISPER_API_CONF": str(conf), "HF_TOKEN": "hf_secret"}))


@pytest.mark.sqlite_only  # its PostgreSQL twin (psql) is in test_cluster.py
def test_ledger_is_readable_with_the_sqlite3_cli(make_server):
    server = make_server()
    job_id = server.submit_ok(diarize="false")
    server.wait_status(job_id)
    server.stop()
    out = subprocess.run(
        ["sqlite3", server.env["WHISPER_DB_PATH"],
         f"SELECT status, created_at FROM jobs WHERE id='{job_id}'; SELECT event FROM job_events WHERE job_id='{job_id}';"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    assert out[0].startswith("Completed|20") and out[0].endswith("Z")
    assert out[1:] == ["accepted", "started", "warning", "completed"]
    tables = sqlite3.connect(server.env["WHISPER_DB_PATH"]).execute(
        "SELECT name FROM schema_migrations").fetchall()
    # Every numbered migration, in order (each issue adds its own file).
    shipped = sorted(path.stem for path in (REPO / "migrations" / "sqlite").glob("*.sql"))
    assert tables == [(name,) for name in shipped] and shipped[:3] == ["0001_jobs", "0002_tokens", "0003_webhooks"]
