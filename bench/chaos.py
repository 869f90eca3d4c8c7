#!/usr/bin/env python3
"""Chaos run (issue 19): kill -9 in a stream of submissions and cancels, a ledger held by an
operator's sqlite3 session, a full disk under the ledger; then counts what was lost.

    .venv/bin/python bench/chaos.py [--seconds 150] [--out bench/results/chaos.txt]

Each scenario runs a real whisperd (tests/conftest.py's Server, fake engine) and is bounded in
time; the whole run stays under --seconds (default 150). The full-disk scenario mounts a 4 MiB
tmpfs for the ledger (needs root; skipped with a note otherwise) and unmounts it at the end.
Goals: every accepted job ends (none lost, none stuck), no finished transcript recorded Failed,
every cancel honoured, no 5xx but 503, no file left behind once results are fetched.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import Server  # noqa: E402  (the test harness: a real whisperd on a free port)

ENDED = ("Completed", "Failed", "Canceled")


def wait(predicate, timeout: float, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    return None


def statuses(server: Server, ids: list[str]) -> dict[str, str]:
    rows = server.rows("SELECT id, status FROM jobs")
    found = {row["id"]: row["status"] for row in rows}
    return {job_id: found.get(job_id, "missing") for job_id in ids}


def fetch_all(server: Server, ids: list[str]) -> tuple[int, int]:
    """Fetch every Completed result once: (200s, other answers)."""
    ok = other = 0
    for job_id, status in statuses(server, ids).items():
        if status == "Completed":
            response = server.api("GET", f"/transcription/{job_id}/result")
            ok, other = (ok + 1, other) if response.status_code == 200 else (ok, other + 1)
    return ok, other


# -- kill -9 in a stream of submissions and cancels -----------------------------------------


def kill9_soak(root: Path, budget: float, max_jobs: int = 40) -> dict:
    server = Server(root / "kill9", {"ENABLE_CONCURRENCY": "true", "MAX_CONCURRENT_JOBS": "3", "RUST_LOG": "warn",
                                     "FAKE_WHISPERX_SLOW_SECONDS": "0.5", "WHISPER_KILL_GRACE_SECONDS": "5",
                                     "WHISPER_RESULT_GRACE_SECONDS": "0"})
    server.root.mkdir(parents=True, exist_ok=True)
    server.start()
    accepted: list[str] = []
    cancels: list[str] = []  # a cancel was recorded for these before a kill
    fivexx = 0
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        nonlocal fivexx
        while not stop.is_set():
            if len(accepted) >= max_jobs:  # a stream the queue can drain within the budget
                time.sleep(0.1)
                continue
            try:
                response = server.submit(diarize="false", prompt="fake:slow" if len(accepted) % 4 == 0 else "",
                                         timeout=30)
            except requests.RequestException:
                time.sleep(0.05)
                continue
            if response.status_code >= 500 and response.status_code != 503:
                with lock:
                    fivexx += 1
            if response.status_code == 202:
                with lock:
                    accepted.append(response.json()["job_id"])

    threads = [threading.Thread(target=client) for _ in range(3)]
    for thread in threads:
        thread.start()
    kills = 0
    deadline = time.monotonic() + budget * 0.6
    while time.monotonic() < deadline:
        time.sleep(1.5)
        # A job whose engine ignores SIGTERM, canceled, and the server killed while it stops.
        try:
            hang = server.submit_ok(diarize="false", prompt="fake:hang")
        except (AssertionError, requests.RequestException):
            continue
        with lock:
            accepted.append(hang)
        if wait(lambda: server.rows("SELECT status FROM jobs WHERE id=?", (hang,))[0]["status"] == "Processing", 20):
            threading.Thread(target=lambda: _quiet(server.api, "DELETE", f"/transcription/{hang}", timeout=60),
                             daemon=True).start()
            if wait(lambda: server.rows("SELECT cancel_requested FROM jobs WHERE id=?", (hang,))[0]["cancel_requested"], 10):
                cancels.append(hang)
        server.kill9()
        kills += 1
        server.start()
    stop.set()
    for thread in threads:
        thread.join(30)
    drained = server.wait_drained(max(30.0, budget * 0.4))
    ended = statuses(server, accepted)
    ok, other = fetch_all(server, accepted)
    left = wait(lambda: server.job_files() == [], 10) is not None
    quarantined = len(list((server.root / "tmp" / ".quarantine").glob("*/*/*")))
    reasons = sorted({(row["error"] or "")[:60] for row in server.rows("SELECT error FROM jobs WHERE status='Failed'")})
    server.stop(timeout=60)
    return {
        "kills": kills, "accepted": len(accepted), "drained": drained,
        "lost": sum(1 for s in ended.values() if s == "missing"),
        "not_ended": sum(1 for s in ended.values() if s not in ENDED and s != "missing"),
        "completed": sum(1 for s in ended.values() if s == "Completed"),
        "failed": sum(1 for s in ended.values() if s == "Failed"), "failed_because": reasons,
        "cancels_before_kill": len(cancels),
        "cancels_lost": sum(1 for job_id in cancels if ended[job_id] != "Canceled"),
        "results_fetched": ok, "results_refused": other, "5xx_not_503": fivexx, "files_left": not left,
        # Uploads a kill caught between their rename and their row: no client got a 202 for them,
        # but start-up cannot tell them from jobs a damaged ledger lost, so it keeps them.
        "quarantined_at_restarts": quarantined,
    }


def _quiet(call, *args, **kwargs) -> None:
    try:
        call(*args, **kwargs)
    except requests.RequestException:
        pass


# -- a ledger held by an operator ----------------------------------------------------------


def held_ledger(root: Path, rounds: int) -> dict:
    server = Server(root / "held", {"RUST_LOG": "warn", "WHISPER_DB_BUSY_TIMEOUT_MS": "300",
                                    "FAKE_WHISPERX_SLOW_SECONDS": "1", "WHISPER_RESULT_GRACE_SECONDS": "0"})
    server.root.mkdir(parents=True, exist_ok=True)
    server.start()
    results = {"rounds": rounds, "completed": 0, "recorded_failed": 0, "health_red_while_held": 0,
               "health_green_after": 0, "queue_moved_after": 0}
    for _ in range(rounds):
        job_id = server.submit_ok(diarize="false", prompt="fake:slow")
        wait(lambda: server.rows("SELECT status FROM jobs WHERE id=?", (job_id,))[0]["status"] == "Processing", 10)
        held = subprocess.Popen(["sqlite3", server.env["WHISPER_DB_PATH"]], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        held.stdin.write(".timeout 10000\nBEGIN EXCLUSIVE;\nSELECT 'locked';\n")
        held.stdin.flush()
        held.stdout.readline()
        red = wait(lambda: "not recorded" in server.api("GET", "/health", token=None).text, 15)
        results["health_red_while_held"] += bool(red)
        time.sleep(1.0)
        held.stdin.write("COMMIT;\n.quit\n")
        held.stdin.close()
        held.wait(10)
        status = wait(lambda: (lambda s: s if s in ENDED else None)(statuses(server, [job_id])[job_id]), 20)
        results["completed"] += status == "Completed"
        results["recorded_failed"] += status == "Failed"
        results["health_green_after"] += bool(wait(
            lambda: server.api("GET", "/health", token=None).status_code == 200, 15))
        after = server.submit_ok(diarize="false")
        results["queue_moved_after"] += bool(wait(lambda: statuses(server, [after])[after] == "Completed", 15))
    server.stop(timeout=60)
    return results


# -- a full disk under the ledger ----------------------------------------------------------


def full_disk(root: Path, rounds: int) -> dict:
    mount = root / "ledger-disk"
    mount.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True,
                       capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        return {"skipped": f"cannot mount a tmpfs ({exc}); run as root"}
    results = {"rounds": rounds, "completed": 0, "recorded_failed": 0, "health_red_while_full": 0,
               "recovered_without_restart": 0}
    server = None
    try:
        server = Server(root / "full", {"RUST_LOG": "warn", "WHISPER_DB_PATH": str(mount / "whisperd.db"),
                                        "WHISPER_DB_CHECKPOINT_SECONDS": "0.2", "FAKE_WHISPERX_SLOW_SECONDS": "1",
                                        "WHISPER_RESULT_GRACE_SECONDS": "0"})
        server.root.mkdir(parents=True, exist_ok=True)
        server.start()
        for _ in range(rounds):
            job_id = server.submit_ok(diarize="false", prompt="fake:slow")
            wait(lambda: statuses(server, [job_id])[job_id] == "Processing", 10)
            time.sleep(0.5)  # a checkpoint truncates the WAL: the next write needs new space
            filler = mount / "filler"
            with open(filler, "wb") as handle:
                try:
                    while True:
                        handle.write(b"\0" * 65536)
                        handle.flush()
                except OSError:
                    pass
            red = wait(lambda: "not recorded" in server.api("GET", "/health", token=None).text, 15)
            results["health_red_while_full"] += bool(red)
            filler.unlink()
            status = wait(lambda: (lambda s: s if s in ENDED else None)(statuses(server, [job_id])[job_id]), 20)
            results["completed"] += status == "Completed"
            results["recorded_failed"] += status == "Failed"
            results["recovered_without_restart"] += bool(wait(
                lambda: server.api("GET", "/health", token=None).status_code == 200, 15))
        server.stop(timeout=60)
    finally:
        if server is not None and server.proc is not None and server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(10)
        for _ in range(20):  # the last of the harness's connections may still be closing
            if subprocess.run(["umount", str(mount)], check=False, capture_output=True).returncode == 0:
                break
            time.sleep(0.5)
        else:
            subprocess.run(["umount", "-l", str(mount)], check=False)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("--out", default=None, help="also write the summary to this file")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="whisperd-chaos-"))
    started = time.monotonic()
    summary = {
        "kill -9 soak": kill9_soak(root, args.seconds * 0.5),
        "ledger held (BEGIN EXCLUSIVE)": held_ledger(root, 3),
        "full disk under the ledger": full_disk(root, 2),
    }
    shutil.rmtree(root, ignore_errors=True)
    lines = [f"chaos run: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, "
             f"{time.monotonic() - started:.0f} s, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"]
    for name, figures in summary.items():
        lines.append(f"{name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
