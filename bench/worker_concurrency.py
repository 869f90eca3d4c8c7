#!/usr/bin/env python3
"""Concurrency without multiplying memory: which shape serves several jobs at once best per GB?

  (a) one engine worker per slot: N processes, each one job at a time, cores/N threads each
  (b) one engine worker, one shared model, N jobs at once (CTranslate2 inter_threads = N)
  (c) the baseline: one worker, one job at a time, all cores

Each runs the same batch of jfk.flac jobs straight through whisperd/engine_worker.py (no HTTP),
models preloaded. Prints wall time, jobs/s, peak RSS (sum over processes) and jobs/s per GB.
Usage: /work/main/.venv/bin/python bench/worker_concurrency.py [--slots 2] [--jobs 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from warm_engine import venv_python  # noqa: E402

JFK = REPO.parent / "shared" / "fixtures" / "jfk.flac"
MODEL = str(REPO / "models" / "tiny.en")


class Worker:
    def __init__(self, jobs: int, threads: int) -> None:
        env = dict(os.environ, WHISPERD_WORKER_JOBS=str(jobs), HF_HUB_OFFLINE="1", WHISPERD_WORKER_IDLE_SECONDS="0")
        self.threads = threads
        self.proc = subprocess.Popen([venv_python(), str(REPO / "whisperd" / "engine_worker.py")], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, bufsize=1, start_new_session=True)
        self.wait_for("hello")
        self.send(op="load", **self.spec())
        self.wait_for("models")

    def spec(self) -> dict:
        return {"model": MODEL, "model_dir": str(REPO / "models"), "device": "cpu", "compute_type": "int8",
                "threads": self.threads}

    def send(self, **message) -> None:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def wait_for(self, event: str) -> dict:
        for line in self.proc.stdout:
            message = json.loads(line)
            if message["event"] == event:
                return message
            if message["event"] == "error":
                raise RuntimeError(message)
        raise RuntimeError("worker ended")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def run(shape: str, workers: list[Worker], jobs: int, tmp: Path) -> dict:
    # warm-up: one job per worker (pyannote's first call is slower)
    for index, worker in enumerate(workers):
        worker.send(op="job", id=f"warm{index}", audio=str(JFK), output_dir=str(tmp / f"w{index}"), language="en",
                    word_times=False, **worker.spec())
        worker.wait_for("done")
    started = time.perf_counter()
    for number in range(jobs):
        worker = workers[number % len(workers)]
        worker.send(op="job", id=str(number), audio=str(JFK), output_dir=str(tmp / str(number)), language="en",
                    word_times=False, **worker.spec())
    for number in range(jobs):
        workers[number % len(workers)].wait_for("done")
    wall = time.perf_counter() - started
    rss = sum(worker.peak_rss_mb() for worker in workers)
    for worker in workers:
        worker.close()
    return {"shape": shape, "wall": wall, "jobs_per_s": jobs / wall, "rss_mb": rss,
            "jobs_per_s_per_gb": jobs / wall / (rss / 1024)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=8)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    per_slot = max(1, cores // args.slots)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-conc-") as tmp:
        results.append(run(f"(c) 1 worker, 1 job at a time, {cores} threads", [Worker(1, cores)], args.jobs, Path(tmp)))
        results.append(run(f"(a) {args.slots} workers x 1 job, {per_slot} thread(s) each",
                           [Worker(1, per_slot) for _ in range(args.slots)], args.jobs, Path(tmp)))
        results.append(run(f"(b) 1 worker x {args.slots} jobs, shared model, {per_slot} thread(s) per job",
                           [Worker(args.slots, per_slot)], args.jobs, Path(tmp)))
    print(f"{args.jobs} jfk.flac jobs, {cores} cores")
    for r in results:
        print(f"  {r['shape']:<60} wall {r['wall']:6.2f} s  {r['jobs_per_s']:.3f} jobs/s  "
              f"peak RSS {r['rss_mb']:6.0f} MB  {r['jobs_per_s_per_gb']:.3f} jobs/s/GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
