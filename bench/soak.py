#!/usr/bin/env python3
"""Soak: 1,000 short jobs from 50 clients through the fake engine, then again with kill -9 restarts.

Prints jobs lost (goal 0), jobs the server accepted but whose 202 a crash swallowed, 5xx answers (goal 0), files left (goal 0) and the server's RSS at
start and end (goal: no growth beyond a few MB). Run: .venv/bin/python bench/soak.py [--jobs N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import Server  # noqa: E402  (the shared launcher: a real whisperd on a free port)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def soak(jobs: int, clients: int, restart_every: int | None) -> dict:
    root = Path(tempfile.mkdtemp(prefix="whisperd-soak-"))
    server = Server(root, {"ENABLE_CONCURRENCY": "true", "MAX_CONCURRENT_JOBS": "4", "RUST_LOG": "warn",
                           "FAKE_WHISPERX_LOG": ""}).start()
    lock = threading.Lock()
    acked: list[str] = []
    errors_5xx = 0
    restarting = threading.Event()

    def submit(_: int) -> None:
        nonlocal errors_5xx
        while True:
            try:
                response = server.submit(diarize="false", timeout=30)
            except requests.ConnectionError:
                time.sleep(0.1)  # the server is restarting: try again, as a client would
                continue
            if response.status_code >= 500:
                with lock:
                    errors_5xx += 1
                time.sleep(0.1)
                continue
            if response.status_code == 202:
                with lock:
                    acked.append(response.json()["job_id"])
                    count = len(acked)
                if restart_every and count % restart_every == 0 and count < jobs:
                    restarting.set()
                return

    def restarter() -> None:
        while True:
            restarting.wait()
            restarting.clear()
            if stop.is_set():
                return
            server.kill9()
            server.start()

    stop = threading.Event()
    helper = threading.Thread(target=restarter, daemon=True)
    helper.start()
    time.sleep(0.5)
    rss_start = rss_kib(server.proc.pid)
    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(submit, range(jobs)))
    stop.set()
    restarting.set()
    server.wait_drained(600, poll=0.5)
    elapsed = time.monotonic() - started
    statuses = {r["id"]: r["status"] for r in server.rows("SELECT id, status FROM jobs")}
    lost = [job_id for job_id in acked if statuses.get(job_id) != "Completed"]

    def fetch(job_id: str) -> int:
        return server.api("GET", f"/transcription/{job_id}/result").status_code

    with ThreadPoolExecutor(clients) as pool:
        fetched = list(pool.map(fetch, acked))
    errors_5xx += sum(1 for code in fetched if code >= 500)
    rss_end = rss_kib(server.proc.pid)
    # A job whose 202 was lost in a crash is kept (Completed, never fetched) until retention:
    # its files are owned. Only files that belong to no live job count as left behind.
    live = {r["id"] for r in server.rows(
        "SELECT id FROM jobs WHERE status IN ('Queued','Processing','Completed')"
        " AND delivered_at IS NULL AND expired_at IS NULL")}
    files_left = sum(1 for path in server.job_files() if not any(job_id in path for job_id in live))
    unacknowledged = len(statuses) - len(acked)
    server.stop()
    return {"jobs": len(acked), "unacked": unacknowledged, "seconds": round(elapsed, 1), "lost": len(lost), "5xx": errors_5xx,
            "files_left": files_left, "rss_start_kib": rss_start, "rss_end_kib": rss_end}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=50)
    args = parser.parse_args()
    results = {
        "steady": soak(args.jobs, args.clients, None),
        "kill -9 every 200": soak(args.jobs, args.clients, 200),
    }
    print(f"{'run':<20}{'jobs':>6}{'unacked':>9}{'s':>8}{'lost':>6}{'5xx':>6}{'files':>7}{'RSS start':>11}{'RSS end':>10}")
    for name, r in results.items():
        print(f"{name:<20}{r['jobs']:>6}{r['unacked']:>9}{r['seconds']:>8}{r['lost']:>6}{r['5xx']:>6}{r['files_left']:>7}"
              f"{r['rss_start_kib'] // 1024:>9}MB{r['rss_end_kib'] // 1024:>8}MB")
    bad = any(r["lost"] or r["5xx"] or r["files_left"] for r in results.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
