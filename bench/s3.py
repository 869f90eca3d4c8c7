"""#6 Job files in S3 (issue 29): an upload to whisperd on the S3 backend vs the local directory
(throughput, server RSS growth), a tus upload in 8 MiB PATCHes the same two ways and with its
PATCHes alternating between two nodes, and jobs/s of 2 worker nodes sharing only PostgreSQL and
S3 vs 1.

The S3 server is SeaweedFS (`weed mini`, tests/seaweed.py) on loopback, on the same disk: its
own writes compete with whisperd's, as a store on the same box would; read the ratios, not the
absolute figures. Upload throughput = file size / (first byte sent .. the 202), which on S3
includes publishing the canonical audio to the store before the job's row commits.

    python -m bench.s3 [--quick] [--out bench/results/s3.txt]   # also run by ./bench/run.sh (--only s3)

The --out summary is what docs/performance.md shows (bench/report.py copies it there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .common import REPO, RssSampler, Server, Whisperd, machine, write_noop_engine
from .upload import MIB, make_file, measure

sys.path.insert(0, str(REPO / "tests"))
from pg import PostgresServer  # noqa: E402
from seaweed import SeaweedServer  # noqa: E402


def uploads(work: Path, engine: Path, store: SeaweedServer, mib: int, repeats: int) -> dict:
    path = make_file(work / f"upload-{mib}mib.bin", mib * MIB)
    fields = {"diarize": "false", "response_format": "json"}
    # The no-op engine's jobs need no result here: one slot, the queue holds the rest.
    env = {"WHISPER_MAX_AUDIO_SECONDS": "0"}
    result = {}
    for backend, extra in (("local", {}), ("s3", store.storage_env())):
        root = work / f"upload-{backend}"
        root.mkdir(parents=True, exist_ok=True)
        with Whisperd(root, engine, {**env, **extra}) as server:
            result[backend] = measure(server.proc.pid, server.port, path, repeats, fields, root / "tmp", server.token)
    path.unlink()
    return result


def tus(work: Path, engine: Path, store: SeaweedServer, postgres: PostgresServer, mib: int) -> dict:
    """A tus upload of `mib` MiB in 8 MiB PATCHes: create .. the last 204, and the HTTP process's
    RSS growth; on the local directory, on S3, and on S3 with the PATCHes alternating between two
    nodes (PostgreSQL): no node holds an upload, any takes the next PATCH."""
    import requests

    path = make_file(work / f"tus-{mib}mib.bin", mib * MIB)
    chunk = 8 * MIB
    env = {"MAX_FILE_SIZE": str(2**33)}
    url, storage = postgres.new_database(), store.storage_env()
    setups = {"local": [env], "s3": [{**env, **store.storage_env()}],
              "s3, 2 nodes": [{**env, **storage, "WHISPER_DB_URL": url, "WHISPER_NODE_NAME": f"n{i}"} for i in (1, 2)]}
    result = {}
    for name, envs in setups.items():
        nodes = []
        try:
            for i, node_env in enumerate(envs):
                root = work / f"tus-{name.replace(', ', '-').replace(' ', '')}-{i}"
                root.mkdir(parents=True, exist_ok=True)
                nodes.append(Whisperd(root, engine, node_env).start())
            tus_headers = {**nodes[0].auth, "Tus-Resumable": "1.0.0"}
            with RssSampler(nodes[0].proc.pid) as rss, requests.Session() as session, path.open("rb") as handle:
                started = time.monotonic()
                created = session.post(nodes[0].url("/uploads"), headers={**tus_headers, "Upload-Length": str(path.stat().st_size)})
                assert created.status_code == 201, created.text
                location, offset = created.headers["Location"], 0
                while data := handle.read(chunk):
                    node = nodes[(offset // chunk) % len(nodes)]
                    answer = session.patch(node.url(location), data=data, headers={
                        **tus_headers, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"})
                    assert answer.status_code == 204, answer.text
                    offset = int(answer.headers["Upload-Offset"])
                elapsed = time.monotonic() - started
            result[name] = {"mib_per_s": round(mib / elapsed, 1), "rss_growth_mib": round(rss.growth_mib, 1)}
        finally:
            for node in nodes:
                node.stop()
    path.unlink()
    return result


def throughput(work: Path, engine: Path, store: SeaweedServer, postgres: PostgresServer, jobs: int) -> dict:
    figures = {}
    for workers in (1, 2):
        url = postgres.new_database()
        storage = store.storage_env()
        nodes: list[Server] = []
        try:
            def add(name: str, role: str) -> Server:
                root = work / f"tp{workers}-{name}"  # each node its own directories: nothing shared
                root.mkdir(parents=True, exist_ok=True)
                node = Server(root, {"WHISPER_DB_URL": url, "WHISPER_NODE_NAME": name, "WHISPER_NODE_ROLE": role,
                                     "WHISPER_CMD": str(engine), "RUST_LOG": "warn", "FAKE_WHISPERX_LOG": "",
                                     "ENABLE_CONCURRENCY": "true", "MAX_CONCURRENT_JOBS": "2", **storage}).start()
                nodes.append(node)
                return node

            api = add("api", "api")
            for i in range(workers):
                add(f"w{i + 1}", "worker")
            started = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                ids = list(pool.map(lambda _: api.submit_ok(diarize="false"), range(jobs)))
            if not api.wait_drained(300, poll=0.05):
                raise RuntimeError("the jobs did not drain")
            figures[str(workers)] = round(jobs / (time.monotonic() - started), 1)
            done = api.rows("SELECT count(*) AS n FROM jobs WHERE status = 'Completed'")[0]["n"]
            if done != len(ids):
                raise RuntimeError(f"{done} of {len(ids)} jobs Completed")
        finally:
            for node in nodes:
                node.stop()
    return figures


def run(work: Path, engine: Path, quick: bool) -> dict:
    mib, repeats, jobs = (16, 2, 40) if quick else (512, 3, 200)
    store = SeaweedServer().start()
    postgres = PostgresServer().start()
    try:
        up = uploads(work, engine, store, mib, repeats)
        resumable = tus(work, engine, store, postgres, mib)
        tp = throughput(work, engine, store, postgres, jobs)
    finally:
        store.destroy()
        postgres.stop()
    return {"upload_mib": mib, "repeats": repeats, "upload": up, "tus": resumable, "jobs": jobs, "jobs_per_s": tp}


def summary(r: dict) -> str:
    up, tp = r["upload"], r["jobs_per_s"]
    m = machine()
    lines = [f"{m['cores']} cores, {m['cpu']}; load average {os.getloadavg()[0]:.1f} at the end",
             f"upload of {r['upload_mib']} MiB (median of {r['repeats']}), first byte .. 202:"]
    for backend in ("local", "s3"):
        u = up[backend]
        lines.append(f"  {backend:5}  {u['mib_per_s']:7.1f} MiB/s  RSS growth {u['rss_growth_mib']:5.1f} MiB  "
                     f"server CPU {u['cpu_ms_per_mib']:.2f} ms/MiB")
    lines.append(f"  S3 / local throughput: {up['s3']['mib_per_s'] / up['local']['mib_per_s']:.2f}x")
    if "tus" in r:
        lines.append(f"tus upload of {r['upload_mib']} MiB in 8 MiB PATCHes, create .. last 204:")
        for name, t in r["tus"].items():
            lines.append(f"  {name:11}  {t['mib_per_s']:7.1f} MiB/s  RSS growth {t['rss_growth_mib']:5.1f} MiB  "
                         f"({t['mib_per_s'] / r['tus']['local']['mib_per_s']:.2f}x local)")
    lines.append(f"{r['jobs']} jobs (no-op engine, 2 slots per worker node), an api node, PostgreSQL + S3, no shared directory:")
    lines.append(f"  1 worker node {tp['1']:.1f} jobs/s, 2 worker nodes {tp['2']:.1f} jobs/s: {tp['2'] / tp['1']:.2f}x")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 MiB and 40 jobs instead of 512 MiB and 200")
    parser.add_argument("--out", type=Path, help="also write the summary here (e.g. bench/results/s3.txt)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="s3-", dir=REPO / "bench" / "results"))
    try:
        result = run(work, write_noop_engine(work), args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    text = summary(result)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
