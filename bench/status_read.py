"""The status read against its floor: server CPU per GET /transcription/{id} over a bare Tornado
handler answering a constant JSON, measured in the same run (no wrk needed).

    .venv/bin/python -m bench.status_read [--jobs 20000] [--requests 2000] [--rounds 3] [--profile OUT]
                                          [--before TREE]

The ledger is made as bench/ledger_load.py makes it (finished jobs, then a Queued backlog behind
one Processing job); one keep-alive connection sends the same mix of job ids to each server in
turn, round after round, and the figure is the median round's server CPU per request (user +
system time of the server process, which a busy machine does not inflate the way it does wall
time). --profile writes a cProfile of the whisperd process (pstats file) for one extra round.
--before TREE also runs another checkout's whisperd (e.g. `git worktree add /tmp/before HEAD~1`)
on the same ledger in every round, so that a change is judged against its parent in one run.
"""

from __future__ import annotations

import argparse
import http.client
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import REPO, Whisperd, cpu_seconds, free_port, stop_process, wait_http, write_noop_engine
from .ledger_load import fill


def _drive(port: int, paths: list[str], token: str) -> float:
    """Send every path once over one connection; wall seconds per request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {token}"}
    start = time.perf_counter()
    for path in paths:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path} answered {response.status}")
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed / len(paths)


def _cpu_us(pid: int, port: int, paths: list[str], token: str) -> tuple[float, float]:
    before = cpu_seconds(pid)
    wall = _drive(port, paths, token)
    return (cpu_seconds(pid) - before) / len(paths) * 1e6, wall * 1e6


def _start_before(tree: Path, root: Path, engine: Path, env: dict[str, str]) -> Whisperd:
    """The other checkout's whisperd.py, on the same ledger and files (reads only)."""
    tree = tree.resolve()
    code = (f"import runpy, sys; sys.path.insert(0, {str(tree)!r}); sys.argv = [{str(tree / 'whisperd.py')!r}]; "
            f"runpy.run_path(sys.argv[0], run_name='__main__')")
    # Its own port, WHISPER_NODE_ROLE=api (it runs no job); its argv[1], our whisperd.py, is dropped.
    other = Whisperd(root, engine, {**env, "WHISPER_NODE_ROLE": "api"}, wrap=["-c", code])
    other.start()
    return other


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.status_read", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--before", type=Path, default=None, help="another checkout whose whisperd runs beside")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="status-read-", dir=REPO / "bench" / "results"))
    root = work / "ledger"
    root.mkdir(parents=True)
    queued = min(500, args.jobs // 10)
    ids = fill(root / "whisperd.db", args.jobs, queued)
    first = ids["Queued"][0]
    (root / "tmp" / first).mkdir(parents=True)
    (root / "tmp" / first / "audio.wav").write_bytes(b"noop")
    rng = random.Random(8)
    sample = rng.sample(ids["Completed"] + ids["Failed"], 3 * args.requests // 4) + \
        rng.sample(ids["Queued"][1:], min(queued - 1, args.requests // 4))
    rng.shuffle(sample)
    paths = [f"/transcription/{job_id}" for job_id in sample]
    engine = write_noop_engine(work)
    env = {"FAKE_WHISPERX_SLEEP": "3600", "WHISPER_SHUTDOWN_GRACE_SECONDS": "0.2", "WHISPER_KILL_GRACE_SECONDS": "0.5"}
    port = free_port()
    hello = subprocess.Popen([sys.executable, "-m", "bench.peers", "hello", str(port)], cwd=REPO, start_new_session=True)
    bare, ours, before = [], [], []
    try:
        wait_http(port, proc=hello)
        with Whisperd(root, engine, env) as server:
            server.wait_job(first, "Processing")
            _drive(port, paths[:200], "none")  # warm both
            _drive(server.port, paths[:200], server.token)
            other = _start_before(args.before, root, engine, env) if args.before else None
            try:
                for _ in range(args.rounds):
                    bare.append(_cpu_us(hello.pid, port, paths, "none"))
                    ours.append(_cpu_us(server.proc.pid, server.port, paths, server.token))
                    if other is not None:
                        before.append(_cpu_us(other.proc.pid, other.port, paths, other.token))
            finally:
                if other is not None:
                    other.stop()
    finally:
        stop_process(hello)
    if args.profile:
        with Whisperd(root, engine, env, wrap=["-m", "cProfile", "-o", str(args.profile)]) as server:
            server.wait_job(first, "Processing")
            _drive(server.port, paths, server.token)
    ratios = [o[0] / b[0] for o, b in zip(ours, bare)]
    cpu_b, cpu_o = statistics.median(b[0] for b in bare), statistics.median(o[0] for o in ours)
    wall_b, wall_o = statistics.median(b[1] for b in bare), statistics.median(o[1] for o in ours)
    print(f"status read, {args.jobs} jobs, {len(paths)} requests x {args.rounds} rounds, one connection")
    print(f"  server CPU per request: whisperd {cpu_o:.0f} us, bare Tornado {cpu_b:.0f} us: "
          f"{statistics.median(ratios):.2f}x (rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"  wall time per request:  whisperd {wall_o:.0f} us, bare Tornado {wall_b:.0f} us: {wall_o / wall_b:.2f}x")
    if before:
        ratios = [o[0] / b[0] for o, b in zip(before, bare)]
        print(f"  --before {args.before}: server CPU per request {statistics.median(o[0] for o in before):.0f} us: "
              f"{statistics.median(ratios):.2f}x (rounds: {', '.join(f'{r:.2f}' for r in ratios)})")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
