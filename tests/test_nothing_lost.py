"""Nothing lost between the engine and the client (issue 19): each test drives a real server into
the failure it names (a held ledger, a download cut short, kill -9 during a cancel, a reset
ledger, a stopped engine, SIGTERM under load, a clock jump) and checks what survives."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from conftest import TOKEN, alive, metric, wait_until


class HeldLedger:
    """An operator's `sqlite3` session holding the ledger's write lock (BEGIN EXCLUSIVE)."""

    def __init__(self, db_path: str) -> None:
        self.proc = subprocess.Popen(["sqlite3", db_path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.proc.stdin.write(".timeout 10000\nBEGIN EXCLUSIVE;\nSELECT 'locked';\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line.strip() == "locked", line

    def release(self) -> None:
        self.proc.stdin.write("COMMIT;\n.quit\n")
        self.proc.stdin.close()
        assert self.proc.wait(10) == 0


def health(server) -> tuple[int, dict]:
    response = server.api("GET", "/health", token=None)
    return response.status_code, response.json()


def test_a_held_ledger_delays_the_end_of_a_job_but_loses_nothing(make_server):
    server = make_server(WHISPER_DB_BUSY_TIMEOUT_MS="300", FAKE_WHISPERX_SLOW_SECONDS="2")
    job_id = server.submit_ok(diarize="false", prompt="fake:slow")
    server.wait_status(job_id, ("Processing",))
    wait_until(lambda: server.engine_runs(), what="the engine to start")
    queued = server.submit_ok(diarize="false")

    held = HeldLedger(server.env["WHISPER_DB_PATH"])
    try:
        # The engine ends while the lock is held far longer than busy_timeout: the outcome waits.
        code, body = wait_until(lambda: (lambda h: h if "jobs" in h[1].get("checks", {})
                                         and "completion not recorded" in h[1]["checks"]["jobs"] else None)(health(server)),
                                timeout=20, what="/health to report the unrecorded completion")
        assert code == 503 and job_id in body["checks"]["jobs"]
        assert server.status(job_id).json()["status"] == "Processing"  # readers still read
        assert list((server.root / "output" / job_id).glob("*.json")), "the transcript must still be on disk"
        assert (server.root / "tmp" / job_id).is_dir()
        time.sleep(1.0)  # several retries fail while the lock is still held
    finally:
        held.release()

    # Recovered without a restart: the job is Completed with its transcript, and the queue moves.
    assert server.wait_status(job_id, ("Completed", "Failed"), timeout=20)["status"] == "Completed"
    result = server.api("GET", f"/transcription/{job_id}/result")
    assert result.status_code == 200 and "Fake transcript" in result.json()["text"]
    assert server.wait_status(queued, timeout=20)["status"] == "Completed"
    wait_until(lambda: health(server)[0] == 200, what="/health to turn green again")
    assert "could not record completion" in server.log()
    events = [r["event"] for r in server.rows("SELECT event FROM job_events WHERE job_id=? ORDER BY id", (job_id,))]
    assert "failed" not in events and events.count("completed") == 1
    assert metric(server, 'whisperd_jobs_finished_total{status="Completed"}') == 2.0
    assert metric(server, 'whisperd_jobs_finished_total{status="Failed"}') == 0.0


def test_a_held_ledger_at_the_end_of_a_failing_job_keeps_it_failed_not_stranded(make_server):
    # The engine fails 2 s after it logs its run: the hold below is in place by then.
    server = make_server(WHISPER_DB_BUSY_TIMEOUT_MS="200", FAKE_WHISPERX_FAIL_AFTER_SECONDS="2")
    held = None
    job_id = server.submit_ok(diarize="false", prompt="fake:fail")
    # Hold the ledger as soon as the engine has started, before it fails.
    wait_until(lambda: server.engine_runs(), what="the engine to start")
    held = HeldLedger(server.env["WHISPER_DB_PATH"])
    try:
        wait_until(lambda: "failure not recorded" in json.dumps(health(server)[1]), timeout=20,
                   what="/health to report the unrecorded failure")
        assert (server.root / "tmp" / job_id).is_dir(), "files go only after the failure is recorded"
    finally:
        held.release()
    status = server.wait_status(job_id, ("Failed",), timeout=20)
    assert "fake engine failure" in status["data"]
    wait_until(lambda: server.job_files() == [], what="the failed job's files to go")
    wait_until(lambda: health(server)[0] == 200, what="/health to turn green again")


def read_partially_then_reset(port: int, path: str, wait=None) -> bytes:
    """GET path, read a little of the body, then reset the connection (SO_LINGER 0 sends RST)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
    got = sock.recv(1024)
    if wait is not None:
        wait()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    return got


def test_a_download_cut_short_can_be_fetched_again(make_server):
    server = make_server(FAKE_WHISPERX_EXTRA_SEGMENTS="100000", WHISPER_RESULT_GRACE_SECONDS="3")
    job_id = server.submit_ok(diarize="false")
    server.wait_status(job_id)
    path = f"/transcription/{job_id}/result"
    # A body of megabytes, cut after its first kilobyte: not written out, so not delivered.
    head = read_partially_then_reset(server.port, path)
    assert head.startswith(b"HTTP/1.1 200")
    wait_until(lambda: "client left before the whole result was sent" in server.log(), what="the server to notice")
    (row,) = server.rows("SELECT delivered_at FROM jobs WHERE id=?", (job_id,))
    assert row["delivered_at"] is None
    full = server.api("GET", path, timeout=60)
    assert full.status_code == 200 and len(full.json()["segments"]) == 100002
    (row,) = server.rows("SELECT delivered_at, delivered_to FROM jobs WHERE id=?", (job_id,))
    assert row["delivered_at"] is not None and row["delivered_to"]


def test_a_result_is_kept_for_the_grace_window_after_delivery_for_the_same_identity(make_server):
    server = make_server(WHISPER_API_ALLOW_ANY_TOKEN="false", WHISPER_RESULT_GRACE_SECONDS="3")
    alice, root = server.create_token("alice"), server.create_token("root", "--admin")
    job_id = server.submit_ok(token=alice, diarize="false")
    server.wait_status(job_id, token=alice)
    path = f"/transcription/{job_id}/result"

    # The whole (small) body is in the kernel's buffers when the server records the delivery;
    # the client then resets before reading it: its retry must still get the result.
    def delivered():
        wait_until(lambda: server.rows("SELECT delivered_at FROM jobs WHERE id=?", (job_id,))[0]["delivered_at"],
                   what="the delivery to be recorded")

    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\n\r\n".encode())
    delivered()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()

    again = server.api("GET", path, token=alice)
    assert again.status_code == 200 and "Fake transcript" in again.json()["text"]
    other = server.api("GET", path, token=root)  # may see the job, but did not receive it
    assert other.status_code == 410 and "already delivered" in other.json()["error"]
    (row,) = server.rows("SELECT delivered_to FROM jobs WHERE id=?", (job_id,))
    assert row["delivered_to"] == "alice"
    # After the grace window the files go and the result is gone.
    wait_until(lambda: server.job_files() == [], timeout=15, what="the files to go after the grace window")
    gone = server.api("GET", path, token=alice)
    assert gone.status_code == 410 and "already delivered" in gone.json()["error"]


def test_a_cancel_asked_before_kill9_ends_canceled_after_the_restart(make_server):
    server = make_server(WHISPER_KILL_GRACE_SECONDS="30")
    job_id = server.submit_ok(diarize="false", prompt="fake:hang")
    server.wait_status(job_id, ("Processing",))
    (run,) = wait_until(lambda: server.engine_runs(), what="the engine to start")
    with ThreadPoolExecutor(1) as pool:
        # The engine ignores SIGTERM: the cancel waits out the kill grace, and the server dies first.
        pool.submit(lambda: server.api("DELETE", f"/transcription/{job_id}", timeout=60))
        wait_until(lambda: server.rows("SELECT cancel_requested FROM jobs WHERE id=?", (job_id,))[0]["cancel_requested"],
                   what="the cancel to be recorded")
        server.kill9()
    assert alive(run["pid"])
    server.start()
    assert not alive(run["pid"])
    assert server.status(job_id).status_code == 410  # canceled
    (row,) = server.rows("SELECT status, error FROM jobs WHERE id=?", (job_id,))
    assert row["status"] == "Canceled"
    assert server.job_files() == []
    assert len(server.engine_runs()) == 1  # it never ran again
    events = [r["event"] for r in server.rows("SELECT event FROM job_events WHERE job_id=? ORDER BY id", (job_id,))]
    assert events[-1] == "canceled" and "requeued" not in events
    assert metric(server, 'whisperd_jobs_finished_total{status="Canceled"}') == 1.0


def test_a_cancel_survives_the_death_of_the_worker_process_running_the_job(make_server):
    server = make_server(WHISPER_KILL_GRACE_SECONDS="30", HTTP_WORKER_NUMBER="2")
    job_id = server.submit_ok(diarize="false", prompt="fake:hang")
    server.wait_status(job_id, ("Processing",))
    (run,) = wait_until(lambda: server.engine_runs(), what="the engine to start")
    worker_pid = int(server.rows("SELECT worker FROM jobs WHERE id=?", (job_id,))[0]["worker"].rsplit(":", 1)[1])
    with ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: server.api("DELETE", f"/transcription/{job_id}", timeout=60))
        wait_until(lambda: server.rows("SELECT cancel_requested FROM jobs WHERE id=?", (job_id,))[0]["cancel_requested"],
                   what="the cancel to be recorded")
        os.kill(worker_pid, signal.SIGKILL)
        wait_until(lambda: server.rows("SELECT status FROM jobs WHERE id=?", (job_id,))[0]["status"] == "Canceled",
                   what="the dead worker's job to end Canceled")
    wait_until(lambda: not alive(run["pid"]), what="the engine to be stopped")
    wait_until(lambda: server.job_files() == [], what="the canceled job's files to go")
    assert len(server.engine_runs()) == 1


def test_unknown_job_directories_are_quarantined_not_deleted(make_server):
    # The local directories' guard (the S3 backend's start-up sweep of objects: tests/test_s3.py).
    server = make_server(start=False, WHISPER_STORAGE_URL="")
    known = server.start().submit_ok(diarize="false")
    server.wait_status(known)
    server.stop()
    lost = [str(uuid.uuid4()) for _ in range(2)]
    for job_id in lost:
        (server.root / "tmp" / job_id).mkdir(parents=True)
        (server.root / "tmp" / job_id / "audio.wav").write_bytes(b"precious")
        (server.root / "output" / job_id).mkdir(parents=True)
        (server.root / "output" / job_id / "audio.json").write_text("{}")
    server.start()
    (quarantine,) = (server.root / "tmp" / ".quarantine").iterdir()
    for job_id in lost:
        assert (quarantine / "uploads" / job_id / "audio.wav").read_bytes() == b"precious"
        assert (quarantine / "output" / job_id / "audio.json").exists()
        assert not (server.root / "tmp" / job_id).exists()
    assert "ERROR whisperd" in server.log() and "does not know" in server.log()
    assert server.api("GET", f"/transcription/{known}/result").status_code == 200  # known jobs untouched


def test_a_reset_ledger_beside_many_job_directories_refuses_to_start(make_server):
    # The local directories' guard (on S3, the cluster's mark in the bucket: tests/test_s3.py).
    server = make_server(start=False, WHISPER_STORAGE_URL="")
    orphans = [str(uuid.uuid4()) for _ in range(6)]
    for job_id in orphans:
        (server.root / "tmp" / job_id).mkdir(parents=True)
        (server.root / "tmp" / job_id / "audio.wav").write_bytes(b"x")
    server.start(wait=False)
    assert server.proc.wait(20) == 1
    assert "looks reset" in server.log() and "WHISPER_ACCEPT_LEDGER_RESET" in server.log()
    assert all((server.root / "tmp" / job_id / "audio.wav").exists() for job_id in orphans)

    server.env["WHISPER_ACCEPT_LEDGER_RESET"] = "true"
    server.start()
    (quarantine,) = (server.root / "tmp" / ".quarantine").iterdir()
    assert sorted(p.name for p in (quarantine / "uploads").iterdir()) == sorted(orphans)


def test_the_wal_is_checkpointed_and_truncated_on_a_timer(make_server):
    server = make_server(WHISPER_DB_CHECKPOINT_SECONDS="0.5")
    for _ in range(3):
        server.wait_status(server.submit_ok(diarize="false"))
    wal = Path(server.env["WHISPER_DB_PATH"] + "-wal")
    wait_until(lambda: wal.exists() and wal.stat().st_size == 0, timeout=10, what="the WAL to be truncated")
    assert server.rows("SELECT count(*) AS n FROM jobs")[0]["n"] == 3


def test_health_fails_while_the_engine_makes_no_progress(make_server):
    server = make_server(WHISPER_STALL_SECONDS="3", FAKE_WHISPERX_SLOW_SECONDS="60")
    job_id = server.submit_ok(diarize="false", prompt="fake:slow")
    (run,) = wait_until(lambda: server.engine_runs(), what="the engine to start")
    wait_until(lambda: (server.status(job_id).json().get("progress") or 0) > 0, what="first progress")
    assert health(server)[0] == 200
    os.kill(run["pid"], signal.SIGSTOP)
    try:
        code, body = wait_until(lambda: (lambda h: h if h[0] == 503 else None)(health(server)), timeout=20,
                                what="/health to fail on the stopped engine")
        assert "no progress" in body["checks"]["jobs"] and job_id in body["checks"]["jobs"]
    finally:
        os.kill(run["pid"], signal.SIGCONT)
    wait_until(lambda: health(server)[0] == 200, timeout=20, what="/health to recover once progress resumes")
    server.api("DELETE", f"/transcription/{job_id}")


def test_requests_in_flight_at_sigterm_get_answers_never_500(make_server):
    server = make_server(FAKE_WHISPERX_SLOW_SECONDS="30", WHISPER_SHUTDOWN_GRACE_SECONDS="2")
    running = server.submit_ok(diarize="false", prompt="fake:slow")
    server.wait_status(running, ("Processing",))
    statuses: list[int] = []
    retry_after: list[str] = []
    stop = threading.Event()

    def client(kind: int) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        audio = server.default_audio.read_bytes()
        while not stop.is_set():
            try:
                if kind == 0:
                    response = session.get(server.url(f"/transcription/{running}"), timeout=30)
                elif kind == 1:
                    response = session.get(server.url("/status"), timeout=30)
                else:
                    response = session.post(server.url("/transcription"), timeout=30, data={"diarize": "false"},
                                            files={"file": ("a.wav", audio, "audio/wav")})
            except requests.ConnectionError:
                time.sleep(0.02)  # the listener is closed: nothing answered, nothing half-done
                continue
            statuses.append(response.status_code)
            if response.status_code == 503:
                retry_after.append(response.headers.get("Retry-After", ""))

    threads = [threading.Thread(target=client, args=(i % 3,)) for i in range(6)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(statuses) > 30, what="traffic")
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    stop.set()
    for thread in threads:
        thread.join(30)
    assert statuses and set(statuses) <= {200, 202, 503}, sorted(set(statuses))
    assert 503 in statuses and set(retry_after) == {"10"}
    assert "ledger is not open" not in server.log()


def test_every_end_is_counted_in_metrics(make_server):
    server = make_server(WHISPER_MAX_ATTEMPTS="1", FAKE_WHISPERX_SLOW_SECONDS="30")
    done = server.submit_ok(diarize="false")
    server.wait_status(done)
    poisoned = server.submit_ok(diarize="false", prompt="fake:slow")
    server.wait_status(poisoned, ("Processing",))
    queued = server.submit_ok(diarize="false")
    assert server.api("DELETE", f"/transcription/{queued}").status_code == 200
    assert metric(server, 'whisperd_jobs_finished_total{status="Canceled"}') == 1.0
    server.kill9()
    server.env["FAKE_WHISPERX_SLOW_SECONDS"] = "0.1"
    server.start()
    assert server.wait_status(poisoned, ("Failed",))["status"] == "Failed"  # decided at start-up
    assert metric(server, 'whisperd_jobs_finished_total{status="Failed"}') == 1.0
    assert metric(server, "whisperd_jobs_failed_total") == 1.0
    failed = server.submit_ok(diarize="false", prompt="fake:fail")
    server.wait_status(failed, ("Failed",))
    assert metric(server, 'whisperd_jobs_finished_total{status="Failed"}') == 2.0


def test_retention_holds_back_after_a_forward_clock_jump_until_a_second_pass_confirms(make_server, tmp_path):
    offset = tmp_path / "clock-offset"
    offset.write_text("0")
    server = make_server(WHISPER_JOB_RETENTION_HOURS="1", WHISPER_CLEANUP_INTERVAL_HOURS="0.0005",
                         WHISPERD_CLOCK_OFFSET_FILE=str(offset))
    job_id = server.submit_ok(diarize="false")
    server.wait_status(job_id)
    offset.write_text(str(48 * 3600))
    wait_until(lambda: "wall clock jumped forward" in server.log(), timeout=15, what="the jump to be noticed")
    assert server.status(job_id).status_code == 200  # not expired by the jump's pass
    assert server.api("GET", f"/transcription/{job_id}/result").status_code == 200
    wait_until(lambda: "confirmed by a second pass" in server.log(), timeout=15, what="the second pass")
    wait_until(lambda: server.status(job_id).status_code == 410, timeout=10, what="the job to expire")
