"""The cost of synchronous=FULL (the ledger's setting since issue 19) against NORMAL, same run.

    .venv/bin/python -m bench.wal_sync [--jobs 300] [--dir DIR]

Each round submits the same number of jobs (one INSERT and one event row per commit, through
the real SQLiteLedger) to two fresh ledgers on the same disk, one per setting, alternating so a
busy machine slows both sides alike. Printed: commits per second and the p50/p99 commit latency
of each, and the FULL/NORMAL latency ratio. DIR should be on the disk the ledger lives on (the
default is a temporary directory under bench/).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from whisperd.jobs import NewJob
from whisperd.ledger import sqlite as sqlite_ledger

from .common import BENCH, machine, median, pct


def _job() -> NewJob:
    return NewJob(id=str(uuid.uuid4()), owner="bench", filename="a.wav", upload_bytes=1000, language="en",
                  model="tiny.en", response_format="txt", diarize=False, prompt="", device="cpu",
                  device_index="0", warnings=[])


async def _open(path: Path, synchronous: str) -> sqlite_ledger.SQLiteLedger:
    sqlite_ledger.open_admin(str(path)).close()
    ledger = sqlite_ledger.SQLiteLedger(str(path), "bench")
    await ledger.open()
    await ledger._writer.execute(f"PRAGMA synchronous={synchronous}")  # the one thing that differs
    return ledger


async def measure(directory: Path, jobs: int, rounds: int = 6) -> dict[str, list[float]]:
    ledgers = {mode: await _open(directory / f"{mode.lower()}.db", mode) for mode in ("FULL", "NORMAL")}
    latencies: dict[str, list[float]] = {mode: [] for mode in ledgers}
    try:
        for round_ in range(rounds):
            order = ("FULL", "NORMAL") if round_ % 2 == 0 else ("NORMAL", "FULL")
            for mode in order:
                for _ in range(jobs // rounds):
                    began = time.perf_counter()
                    await ledgers[mode].submit(_job())
                    latencies[mode].append(time.perf_counter() - began)
    finally:
        for ledger in ledgers.values():
            await ledger.close()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="wal-sync-", dir=BENCH))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        latencies = asyncio.run(measure(directory, args.jobs))
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
    print(f"machine: {machine()}")
    for mode, values in latencies.items():
        print(f"{mode:6s}: {len(values)} commits, {len(values) / sum(values):7.0f}/s, "
              f"p50 {1000 * median(values):6.2f} ms, p99 {1000 * pct(values, 99):6.2f} ms")
    ratio = median(latencies["FULL"]) / median(latencies["NORMAL"])
    print(f"FULL/NORMAL median commit latency ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
