"""Fault injection: crashes at chosen points, a locked ledger, shutdown, zombies, many clients on many workers."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from conftest import alive, wait_until


def crashed(server) -> None:
    """Wait for a server that was told to kill itself, and check that it did."""
    assert server.proc.wait(15) == -signal.SIGKILL
    server._log_handle.close()


def restart_clean(server) -> None:
    server.env.pop("WHISPERD_CRASH_AT", None)
    server.start()


def invariants(server) -> None:
    """No file without a live job; the ledger is sound."""
    live = {r["id"] for r in server.rows(
        "SELECT id FROM jobs WHERE status IN ('Queued','Processing','Completed')"
        " AND delivered_at IS NULL AND expired_at IS NULL")}
    for path in server.job_files():
        assert any(job_id in path for job_id in live), f"{path} belongs to no live job"
    with server.db() as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_crash_after_upload_committed_leaves_no_job_and_no_file(make_server):
    server = make_server(WHISPERD_CRASH_AT="upload-committed")
    with pytest.raises(requests.ConnectionError):
        server.submit(diarize="false")
    crashed(server)
    restart_clean(server)
    assert server.rows("SELECT id FROM jobs") == []
    assert server.files_gone()
    invariants(server)


def test_crash_after_job_accepted_runs_the_job_after_restart(make_server):
    server = make_server(WHISPERD_CRASH_AT="job-accepted")
    with pytest.raises(requests.ConnectionError):
        server.submit(diarize="false")
    crashed(server)
    restart_clean(server)
    (row,) = server.rows("SELECT id FROM jobs")
    assert server.wait_status(row["id"])["status"] == "Completed"
    invariants(server)


def test_crash_while_engine_runs_requeues_and_stops_the_orphan(make_server):
    server = make_server(WHISPERD_CRASH_AT="engine-started", FAKE_WHISPERX_SLOW_SECONDS="30")
    try:
        server.submit(diarize="false", prompt="fake:slow")
    except requests.ConnectionError:
        pass  # the woken scheduler may start the engine (and so crash) before the 202 is written
    crashed(server)
    (row,) = server.rows("SELECT id FROM jobs")
    job_id = row["id"]
    orphan = wait_until(server.engine_runs, 5, "the engine to start")[0]["pid"]
    server.env["FAKE_WHISPERX_SLOW_SECONDS"] = "0.1"
    restart_clean(server)
    assert not alive(orphan)
    assert server.wait_status(job_id)["status"] == "Completed"
    assert len(server.engine_runs()) == 2
    invariants(server)


def test_crash_after_result_sent_keeps_the_result_for_another_fetch(make_server):
    server = make_server(WHISPERD_CRASH_AT="result-sent")
    job_id = server.submit_ok(diarize="false")
    server.wait_status(job_id)
    try:
        server.api("GET", f"/transcription/{job_id}/result")
    except requests.RequestException:
        pass  # the body may or may not have arrived whole before the crash
    crashed(server)
    restart_clean(server)
    assert server.api("GET", f"/transcription/{job_id}/result").status_code == 200  # at least once
    assert server.files_gone()  # the delivery is recorded just after the last byte went out
    assert server.api("GET", f"/transcription/{job_id}/result").status_code == 410
    invariants(server)


def test_crash_after_delivery_recorded_removes_the_files_at_restart(make_server):
    server = make_server(WHISPERD_CRASH_AT="delivery-recorded")
    job_id = server.submit_ok(diarize="false")
    server.wait_status(job_id)
    try:
        server.api("GET", f"/transcription/{job_id}/result")
    except requests.RequestException:
        pass
    crashed(server)
    assert any(job_id in p for p in server.job_files())
    restart_clean(server)
    assert server.files_gone()
    assert server.api("GET", f"/transcription/{job_id}/result").status_code == 410
    invariants(server)


def test_crash_during_retention_finishes_the_cleanup_at_restart(make_server):
    server = make_server(WHISPERD_CRASH_AT="retention-marked", WHISPER_JOB_RETENTION_HOURS="0.0002",
                         WHISPER_CLEANUP_INTERVAL_HOURS="0.0002")
    job_id = server.submit_ok(diarize="false")
    crashed(server)
    restart_clean(server)
    response = server.status(job_id)
    assert response.status_code == 410 and "expired" in response.json()["error"]
    assert server.files_gone()
    invariants(server)


def test_requests_wait_for_a_ledger_locked_from_outside(server):
    holder = sqlite3.connect(server.env["WHISPER_DB_PATH"], isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(2.0, lambda: holder.execute("COMMIT"))
    release.start()
    started = time.monotonic()
    response = server.submit(diarize="false")
    waited = time.monotonic() - started
    release.join()
    holder.close()
    assert response.status_code == 202, response.text
    assert waited >= 1.5
    assert server.wait_status(response.json()["job_id"])["status"] == "Completed"


def test_shutdown_refuses_new_work_and_answers_sync_waiters(make_server):
    server = make_server(FAKE_WHISPERX_SLOW_SECONDS="30", WHISPER_SHUTDOWN_GRACE_SECONDS="3")
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(server.submit, None, sync="true", diarize="false", prompt="fake:slow")
        wait_until(lambda: server.rows("SELECT 1 FROM jobs WHERE status='Processing'"), what="the sync job to run")
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopping: no new jobs" in server.log(), what="the server to begin its stop")
        refused = server.submit(diarize="false")
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "10" and "shutting down" in refused.json()["error"]
        answer = waiting.result(20)
    assert answer.status_code == 202 and "job_id" in answer.json()
    assert server.proc.wait(20) == 0
    (row,) = server.rows("SELECT status FROM jobs")
    assert row["status"] == "Queued"  # it runs again at the next start


def zombies_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] == "Z" and int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_engine_faults_leave_no_zombie_and_no_process(make_server):
    server = make_server(WHISPER_JOB_TIMEOUT_SECONDS="2", FAKE_WHISPERX_SLOW_SECONDS="1")
    ids = [server.submit_ok(diarize="false", prompt=f"fake:{mode}")
           for mode in ("fail", "crash", "noout", "garbage", "hang", "grandchild", "ok")]
    for job_id in ids:
        server.wait_status(job_id, timeout=30)
    # A job's end is recorded as its engine is reaped: wait for that, not for a fixed while.
    wait_until(lambda: zombies_of(server.proc.pid) == [], 5, "no zombie left")
    for run in server.engine_runs():
        for pid in (run["pid"], run.get("grandchild_pid")):
            if pid:
                wait_until(lambda: not alive(pid), 5, f"{run['mode']}'s process {pid} to be gone")


def test_many_clients_on_many_workers_every_job_runs_once_in_order(make_server):
    # Twenty clients, all on loopback: one address, so it may hold every upload slot here.
    server = make_server(HTTP_WORKER_NUMBER="4", WHISPER_UPLOAD_SHARE_PER_ADDRESS="1")
    rng = random.Random(7)
    plan = [rng.choice(["async", "async", "sync", "cancel"]) for _ in range(200)]
    counts_seen = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            queue = server.api("GET", "/status").json()["queue_state"]
            counts_seen.append(queue)
            time.sleep(0.05)  # the watcher's sampling pace, not a wait

    def client(kind):
        if kind == "sync":
            response = server.submit(diarize="false", sync="true")
            assert response.status_code in (200, 202), response.text
            return None
        job_id = server.submit_ok(diarize="false")
        if kind == "cancel":
            response = server.api("DELETE", f"/transcription/{job_id}")
            assert response.status_code in (200, 409), response.text
        return job_id

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(20) as pool:
            list(pool.map(client, plan))
        server.wait_drained(120)
    finally:
        stop.set()
        watcher.join()
    rows = server.rows("SELECT id, seq, status FROM jobs ORDER BY seq")
    assert len(rows) == 200
    assert {r["status"] for r in rows} <= {"Completed", "Canceled"}
    ran = [run["argv"][1].split("/")[-2] for run in sorted(server.engine_runs(), key=lambda r: r["t_start"])]
    assert len(ran) == len(set(ran)), "a job ran twice"
    completed = [r["id"] for r in rows if r["status"] == "Completed"]
    assert sorted(ran) == sorted(completed)
    assert ran == completed, "sequential mode runs jobs in acceptance order"
    # One job at a time, never more jobs counted than were sent, and twenty clients against one
    # engine did build a queue that /status showed.
    assert all(c["processing_jobs"] <= 1 and 0 <= c["queued_jobs"] <= len(plan) for c in counts_seen)
    assert max(c["queued_jobs"] for c in counts_seen) > 0
    assert len(counts_seen) > 10


def test_full_upload_disk_is_507_and_leaves_nothing(make_server):
    # No free-space floor: this is about the disk filling up during the write itself
    # (the floor's own 507 is tested in test_hostile.py).
    server = make_server(start=False, WHISPER_MIN_FREE_DISK_MB="0")
    tmp_root = Path(server.env["WHISPER_TMP_FILES"])
    tmp_root.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tmp_root)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"this test needs root to mount a small tmpfs: {mounted.stderr}"
    try:
        server.start()
        big = server.root / "big.wav"
        big.write_bytes(b"\1" * (3 * 1024 * 1024))
        response = server.submit(big)
        assert response.status_code == 507, response.text
        assert "disk is full" in response.json()["error"]
        assert server.rows("SELECT id FROM jobs") == []
        assert server.files_gone()
        assert server.wait_status(server.submit_ok(diarize="false"))["status"] == "Completed"  # still serving
        server.stop()
    finally:
        subprocess.run(["umount", "-l", str(tmp_root)], check=False)


def test_unwritable_upload_directory_stops_startup_with_one_line(make_server):
    server = make_server(start=False)
    blocker = server.root / "a-file"
    blocker.write_text("")
    server.env["WHISPER_TMP_FILES"] = str(blocker / "tmp")
    server.start(wait=False)
    assert server.proc.wait(20) == 1
    last = server.log().strip().splitlines()[-1]
    assert last.startswith("whisperd: WHISPER_TMP_FILES/WHISPER_OUTPUT_DIR not writable")
