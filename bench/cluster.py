#!/usr/bin/env python3
"""Cluster benchmarks on a throwaway PostgreSQL: soak with kill -9, jobs/s per worker nodes, claim latency.

  soak        N jobs (default 1,000) from 20 clients over 3 nodes (role all, shared job directory),
              kill -9 of a random node every 200 accepted jobs (it comes back 1 s later); prints
              lost (goal 0), completed twice (goal 0), files left (goal 0); summary written to
              bench/results/cluster-soak.txt.
  throughput  jobs/s end to end (submit to Completed) on the no-op engine with 1, 2 and 3 worker
              nodes behind one api node, each worker node running 2 jobs at a time.
  claims      claim latency (accepted -> started, from job_events) with 3 worker nodes competing.
  status      status reads on one node, the SQLite ledger beside the PostgreSQL one (20,000 jobs).

Run: .venv/bin/python bench/cluster.py [soak|throughput|claims|status|all] [--jobs N]. Each takes a few
minutes at most on 2 cores; needs Debian's postgresql (scripts/setup.sh installs it).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from conftest import Server  # noqa: E402  (the test harness: a real whisperd on a free port)
from pg import PostgresServer  # noqa: E402

from bench.common import machine, pct, write_noop_engine  # noqa: E402

RESULTS = REPO / "bench" / "results"


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class Cluster:
    def __init__(self, postgres: PostgresServer, root: Path, engine: Path, **env: str) -> None:
        self.url = postgres.new_database()
        self.root = root
        self.engine = engine
        self.env = env
        self.nodes: dict[str, Server] = {}

    def add(self, name: str, role: str, **env: str) -> Server:
        node_env = {"WHISPER_DB_URL": self.url, "WHISPER_NODE_NAME": name, "WHISPER_NODE_ROLE": role,
                    "WHISPER_TMP_FILES": str(self.root / "shared" / "tmp"),
                    "WHISPER_OUTPUT_DIR": str(self.root / "shared" / "output"),
                    "WHISPER_CMD": str(self.engine), "RUST_LOG": "warn", "FAKE_WHISPERX_LOG": "",
                    **self.env, **env}
        (self.root / name).mkdir(parents=True, exist_ok=True)
        server = Server(self.root / name, node_env).start()
        self.nodes[name] = server
        return server

    def any(self) -> Server:
        return next(s for s in self.nodes.values() if s.proc.poll() is None)

    def stop(self) -> None:
        for server in self.nodes.values():
            if server.proc.poll() is None:
                server.stop()


def soak(postgres: PostgresServer, jobs: int, clients: int = 20, kill_every: int = 200) -> dict:
    root = Path(tempfile.mkdtemp(prefix="whisperd-cluster-soak-"))
    engine = write_noop_engine(root)
    cluster = Cluster(postgres, root, engine, ENABLE_CONCURRENCY="true", MAX_CONCURRENT_JOBS="2",
                      WHISPER_LEASE_SECONDS="3", FAKE_WHISPERX_SLEEP="0.05")
    names = ["n1", "n2", "n3"]
    for name in names:
        cluster.add(name, "all")
    lock = threading.Lock()
    acked: list[str] = []
    kills: list[str] = []
    killing = threading.Event()
    down: set[str] = set()

    def submit(i: int) -> None:
        while True:
            with lock:
                up = [n for n in names if n not in down]
            server = cluster.nodes[up[i % len(up)]]  # a load balancer spreads clients over live nodes
            try:
                response = server.submit(diarize="false", timeout=30)
            except requests.RequestException:
                time.sleep(0.1)
                continue
            if response.status_code != 202:
                time.sleep(0.1)
                continue
            with lock:
                acked.append(response.json()["job_id"])
                if len(acked) % kill_every == 0 and len(acked) < jobs:
                    killing.set()
            return

    def killer() -> None:
        while True:
            killing.wait()
            killing.clear()
            if stop.is_set():
                return
            victim = random.choice(names)
            with lock:
                down.add(victim)
            cluster.nodes[victim].kill9()
            kills.append(victim)
            time.sleep(1.0)
            cluster.nodes[victim].start()
            with lock:
                down.discard(victim)

    stop = threading.Event()
    helper = threading.Thread(target=killer, daemon=True)
    helper.start()
    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(submit, range(jobs)))
    stop.set()
    killing.set()
    helper.join(30)
    any_node = cluster.any()
    drained = any_node.wait_drained(600, poll=0.5)
    elapsed = time.monotonic() - started
    statuses = {r["id"]: r["status"] for r in any_node.rows("SELECT id, status FROM jobs")}
    lost = [job_id for job_id in acked if statuses.get(job_id) != "Completed"]
    twice = [r["job_id"] for r in any_node.rows(
        "SELECT job_id FROM job_events WHERE event='completed' GROUP BY job_id HAVING count(*) > 1")]
    ran_twice = any_node.rows("SELECT count(*) AS n FROM jobs WHERE attempts > 1")[0]["n"]

    def fetch(job_id: str) -> int:
        return cluster.nodes[names[hash(job_id) % 3]].api("GET", f"/transcription/{job_id}/result").status_code

    with ThreadPoolExecutor(clients) as pool:
        fetched = list(pool.map(fetch, acked))
    live = {r["id"] for r in any_node.rows(
        "SELECT id FROM jobs WHERE status IN ('Queued','Processing','Completed')"
        " AND delivered_at IS NULL AND expired_at IS NULL")}
    shared = root / "shared"
    left = [p for sub in ("tmp", "output") for p in (shared / sub).rglob("*")
            if p.is_file() and ".nodes" not in p.parts and not any(job_id in str(p) for job_id in live)]
    unacked = len(statuses) - len(acked)
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)
    return {"jobs": len(acked), "unacked": unacked, "seconds": round(elapsed, 1), "drained": drained,
            "lost": len(lost), "completed_twice": len(twice), "run_again_after_a_kill": ran_twice,
            "results_fetched_200": sum(1 for code in fetched if code == 200), "files_left": len(left),
            "kills": kills, "left": [str(p.relative_to(shared)) for p in left[:5]]}


def throughput(postgres: PostgresServer, jobs: int = 120) -> dict[int, float]:
    figures = {}
    for workers in (1, 2, 3):
        root = Path(tempfile.mkdtemp(prefix="whisperd-cluster-tp-"))
        engine = write_noop_engine(root)
        cluster = Cluster(postgres, root, engine, ENABLE_CONCURRENCY="true", MAX_CONCURRENT_JOBS="2")
        api = cluster.add("api", "api")
        for i in range(workers):
            cluster.add(f"w{i + 1}", "worker")
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: api.submit_ok(diarize="false"), range(jobs)))
        api.wait_drained(300, poll=0.05)
        figures[workers] = round(jobs / (time.monotonic() - started), 1)
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    return figures


def claims(postgres: PostgresServer, jobs: int = 150) -> dict:
    root = Path(tempfile.mkdtemp(prefix="whisperd-cluster-claims-"))
    engine = write_noop_engine(root)
    cluster = Cluster(postgres, root, engine, ENABLE_CONCURRENCY="true", MAX_CONCURRENT_JOBS="2")
    api = cluster.add("api", "api")
    for i in range(3):
        cluster.add(f"w{i + 1}", "worker")
    time.sleep(1.0)
    for _ in range(jobs):  # one at a time: the latency of a claim, not of a queue
        api.submit_ok(diarize="false")
        time.sleep(0.05)
    api.wait_drained(300, poll=0.05)
    rows = api.rows(
        "SELECT a.at AS accepted, s.at AS started FROM job_events a JOIN job_events s"
        " ON s.job_id = a.job_id AND s.event = 'started' WHERE a.event = 'accepted'")
    latencies = [1000 * (_seconds(r["started"]) - _seconds(r["accepted"])) for r in rows]
    per_node = {r["node"]: r["n"] for r in api.rows("SELECT node, count(*) AS n FROM jobs GROUP BY node")}
    cluster.stop()
    shutil.rmtree(root, ignore_errors=True)
    return {"jobs": len(latencies), "p50_ms": round(pct(latencies, 50), 1), "p95_ms": round(pct(latencies, 95), 1),
            "max_ms": round(max(latencies), 1), "per_node": per_node}


def _fill(server: Server, total: int) -> list[str]:
    """`total` finished jobs straight into the server's ledger (as the CLI of either database would)."""
    import uuid
    now = datetime.now().astimezone().strftime("%Y-%m-%dT%H:%M:%S.000Z")
    rows = [(str(uuid.uuid4()), "anyone", "Completed", now, "a.wav", 1000, "en", "tiny.en", "txt", 0, "", "cpu", "0",
             now, now) for _ in range(total)]
    columns = ("id", "owner", "status", "created_at", "filename", "upload_bytes", "language", "model",
               "response_format", "diarize", "prompt", "device", "device_index", "started_at", "finished_at")
    if server.db_url:
        import asyncio

        import asyncpg

        async def copy():
            conn = await asyncpg.connect(server.db_url)
            try:
                await conn.copy_records_to_table("jobs", records=rows, columns=columns)
                await conn.execute("ANALYZE jobs")
            finally:
                await conn.close()

        asyncio.run(copy())
    else:
        with server.db() as conn:
            conn.executemany(f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})", rows)
    return [row[0] for row in rows]


def status_reads(postgres: PostgresServer, jobs: int = 20000, reads: int = 4000) -> dict[str, dict]:
    """GET /transcription/{id} from 8 client threads on one node, SQLite beside PostgreSQL."""
    figures = {}
    for backend in ("sqlite", "postgresql"):
        root = Path(tempfile.mkdtemp(prefix="whisperd-cluster-status-"))
        env = {"RUST_LOG": "warn", "FAKE_WHISPERX_LOG": ""}
        if backend == "postgresql":
            env["WHISPER_DB_URL"] = postgres.new_database()
        server = Server(root, env).start()
        ids = _fill(server, jobs)
        picks = [random.choice(ids) for _ in range(reads)]
        session = threading.local()

        def read(job_id: str) -> float:
            if not hasattr(session, "s"):
                session.s = requests.Session()
            started = time.perf_counter()
            response = session.s.get(server.url(f"/transcription/{job_id}"),
                                     headers={"Authorization": "Bearer bench"}, timeout=30)
            assert response.status_code == 200, response.text
            return 1000 * (time.perf_counter() - started)

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            latencies = list(pool.map(read, picks))
        elapsed = time.monotonic() - started
        figures[backend] = {"reads_per_s": round(reads / elapsed), "p50_ms": round(pct(latencies, 50), 2),
                            "p99_ms": round(pct(latencies, 99), 2)}
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="all", choices=("soak", "throughput", "claims", "status", "all"))
    parser.add_argument("--jobs", type=int, default=1000, help="soak jobs")
    parser.add_argument("--kill-every", type=int, default=200, help="soak: kill -9 a node after this many jobs")
    args = parser.parse_args()
    postgres = PostgresServer().start()
    bad = False
    lines = [f"machine: {machine()}"]
    try:
        if args.what in ("throughput", "all"):
            figures = throughput(postgres)
            line = "jobs/s end to end, no-op engine, 2 slots per worker node: " + \
                ", ".join(f"{n} worker node(s) {v}" for n, v in figures.items())
            print(line)
            lines.append(line)
        if args.what in ("claims", "all"):
            result = claims(postgres)
            line = f"claim latency (accepted -> started) with 3 worker nodes: {result}"
            print(line)
            lines.append(line)
        if args.what in ("status", "all"):
            result = status_reads(postgres)
            line = f"status reads (GET /transcription/{{id}}, 20,000 jobs, 8 client threads, one node): {result}"
            print(line)
            lines.append(line)
        if args.what in ("soak", "all"):
            result = soak(postgres, args.jobs, kill_every=args.kill_every)
            line = f"soak over 3 nodes, kill -9 of a random node every {args.kill_every} jobs: {result}"
            print(line)
            lines.append(line)
            bad = bool(result["lost"] or result["completed_twice"] or result["files_left"] or not result["drained"])
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / "cluster-soak.txt").write_text("\n".join(lines) + "\n")
    finally:
        postgres.stop()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
