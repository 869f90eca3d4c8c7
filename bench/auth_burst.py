#!/usr/bin/env python3
"""Hash-cost burn: a real job's time with and without a burst of wrong tokens for a live prefix.

The issue's attack: 600 requests of `Bearer wd_<live prefix>_<random>` from 20 threads. Each used
to pay the full slow hash; now failures are remembered and rate-limited (whisperd/identity/guard.py).
Prints the job's time quiet and under the burst, their ratio (goal: near 1), the server's CPU
seconds during the burst and the slow hashes it computed. Run: .venv/bin/python bench/auth_burst.py
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from conftest import Server  # noqa: E402  (the test harness: a real whisperd on a free port)
from bench.common import cpu_seconds  # noqa: E402


def job_seconds(server: Server, token: str) -> float:
    started = time.monotonic()
    response = server.submit(token=token, diarize="false", sync="true")
    assert response.status_code == 200, response.text
    return time.monotonic() - started


def hashes(server: Server) -> float:
    text = requests.get(server.url("/metrics"), timeout=30).text
    for line in text.splitlines():
        if line.startswith("whisperd_token_hashes_total "):
            return float(line.split()[1])
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--threads", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5, help="jobs timed on each side")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="whisperd-authburst-"))
    server = Server(root, {"WHISPER_API_ALLOW_ANY_TOKEN": "false", "RUST_LOG": "warn", "FAKE_WHISPERX_LOG": ""})
    server.root.mkdir(parents=True, exist_ok=True)
    server.start()
    try:
        token = server.create_token("alice")
        prefix = token.split("_")[1]
        job_seconds(server, token)  # warm-up
        quiet = sorted(job_seconds(server, token) for _ in range(args.rounds))[args.rounds // 2]

        statuses: dict[int, int] = {}
        lock = threading.Lock()
        stop = threading.Event()

        def attack(_: int) -> None:
            response = requests.get(server.url("/status"), timeout=60,
                                    headers={"Authorization": f"Bearer wd_{prefix}_{secrets.token_hex(24)}"})
            with lock:
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        hashes_before = hashes(server)
        cpu_before = cpu_seconds(server.proc.pid)
        burst_started = time.monotonic()
        timed: list[float] = []

        def timer() -> None:
            while not stop.is_set() and len(timed) < args.rounds:
                timed.append(job_seconds(server, token))

        timing = threading.Thread(target=timer)
        timing.start()
        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(attack, range(args.requests)))
        burst_seconds = time.monotonic() - burst_started
        cpu_burst = cpu_seconds(server.proc.pid) - cpu_before
        stop.set()
        timing.join()
        loaded = sorted(timed)[len(timed) // 2] if timed else float("nan")
        print(f"bad-token requests: {args.requests} from {args.threads} threads in {burst_seconds:.1f} s; "
              f"answers {dict(sorted(statuses.items()))}")
        print(f"slow hashes computed during the burst: {hashes(server) - hashes_before:.0f}")
        print(f"server CPU seconds during the burst: {cpu_burst:.2f}")
        print(f"job time quiet (median of {args.rounds}): {quiet:.3f} s; under the burst (median of {len(timed)}): "
              f"{loaded:.3f} s")
        print(f"ratio under burst / quiet: {loaded / quiet:.2f}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
