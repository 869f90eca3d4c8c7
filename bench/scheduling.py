"""#3 Submit → engine start latency, and #4 queue throughput, both with the noop engine.

Baselines, measured in the same run: the noop engine started directly with subprocess (spawn →
its first instruction, and the wall time of N runs one by one or 6 at a time). What whisperd
adds on top of them is the service's share.
"""

from __future__ import annotations

import http.client
import os
import sqlite3
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .common import (PROFILER, REPO, Whisperd, cpu_seconds, median, pct, intake_ms, prune_profile, small_upload,
                     wav_header)

AUDIO = wav_header(4096) + os.urandom(4096)  # 16 kHz: taken as it is; the noop engine never reads it
AUDIO_44K = wav_header(11290, rate=44100) + os.urandom(11290)  # the same 0.128 s at 44.1 kHz: probed and decoded
FIELDS = {"diarize": "false", "response_format": "json"}
WARM_UP_JOBS = 5


def _submit(conn: http.client.HTTPConnection, auth: dict[str, str], audio: bytes = AUDIO) -> str:
    body, ctype = small_upload(audio, **FIELDS)
    conn.request("POST", "/transcription", body=body, headers={**auth, "Content-Type": ctype})
    response = conn.getresponse()
    data = response.read()
    if response.status != 202:
        raise RuntimeError(f"submit answered {response.status}: {data[:200]!r}")
    return response.getheader("Location").rsplit("/", 1)[1]


def direct_runs(engine: Path, work: Path, count: int, parallel: int) -> tuple[float, list[float]]:
    """(wall seconds for `count` engine runs, `parallel` at a time; spawn → first instruction of each)."""
    log = work / f"direct-{parallel}.log"
    log.unlink(missing_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "FAKE_WHISPERX_LOG": str(log)}
    audio = work / "direct.wav"
    audio.write_bytes(AUDIO)

    def one(n: int) -> float:
        out = work / "direct-out" / str(n)
        out.mkdir(parents=True, exist_ok=True)
        spawned = time.time()
        subprocess.run([str(engine), str(audio), "--output_dir", str(out)], env=env, check=True)
        return spawned

    start = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        spawned = list(pool.map(one, range(count)))
    wall = time.perf_counter() - start
    started = [float(x) for x in log.read_text().split()]
    return wall, [s - p for s, p in zip(sorted(started), sorted(spawned))]


def start_latency(work: Path, engine: Path, jobs: int) -> dict:
    """#3: one job at a time on an idle queue: the 202's arrival → the engine's first instruction."""
    root = work / "latency"
    root.mkdir(parents=True, exist_ok=True)
    _, spawn = direct_runs(engine, work, 20, 1)
    latencies = []
    with Whisperd(root, engine) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        for n in range(jobs):
            job_id = _submit(conn, server.auth)
            accepted = time.time()
            server.wait_job(job_id, "Completed", conn=conn)
            latencies.append(server.engine_starts()[n] - accepted)
        conn.close()
    ms = [1000 * x for x in latencies]
    spawn_ms = [1000 * x for x in spawn]
    return {
        "jobs": jobs,
        "median_ms": round(median(ms), 2), "p99_ms": round(pct(ms, 99), 2),
        "baseline_spawn_to_first_instruction_median_ms": round(median(spawn_ms), 2),
        "scheduler_share_median_ms": round(median(ms) - median(spawn_ms), 2),
    }


def throughput(work: Path, engine: Path, jobs: int, concurrent: int, audio: bytes = AUDIO,
               extra_env: dict[str, str] | None = None) -> dict:
    """#4: `jobs` submitted at once from 4 client connections, until the last one is Completed."""
    root = work / f"queue-{concurrent}-{len(audio)}-{'-'.join((extra_env or {}).values())}"
    root.mkdir(parents=True, exist_ok=True)
    env = {"ENABLE_CONCURRENCY": "true" if concurrent > 1 else "false", "MAX_CONCURRENT_JOBS": str(concurrent),
           **(extra_env or {})}
    direct_wall, _ = direct_runs(engine, work, jobs, concurrent)
    clip = work / "clip.wav"
    clip.write_bytes(audio)
    with Whisperd(root, engine, env) as server:
        def client(count: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            for _ in range(count):
                _submit(conn, server.auth, audio)
            conn.close()

        # Warm-up, not timed: the first requests of a fresh process pay its one-time costs
        # (lazy imports, the first thread hops, caches); the goal is about the jobs after them.
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        for job_id in [_submit(conn, server.auth, audio) for _ in range(WARM_UP_JOBS)]:
            server.wait_job(job_id, "Completed", conn=conn)
        conn.close()
        cpu_before = cpu_seconds(server.proc.pid)
        start = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(client, [jobs // 4 + (i < jobs % 4) for i in range(4)]))
        db = sqlite3.connect(server.env["WHISPER_DB_PATH"], timeout=10)
        while db.execute("SELECT count(*) FROM jobs WHERE status IN ('Queued', 'Processing')").fetchone()[0]:
            time.sleep(0.01)
        wall = time.perf_counter() - start
        cpu = cpu_seconds(server.proc.pid) - cpu_before
        done = db.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall()
        db.close()
    if dict(done).get("Completed") != jobs + WARM_UP_JOBS:
        raise RuntimeError(f"expected {jobs} Completed jobs, the ledger says {done}")
    return {
        "jobs": jobs, "concurrent": concurrent,
        "jobs_per_s": round(jobs / wall, 1),
        "baseline_direct_jobs_per_s": round(jobs / direct_wall, 1),
        "ratio_to_direct": round(direct_wall / wall, 3),
        "overhead_ms_per_job": round(1000 * (wall - direct_wall) / jobs, 2),
        # The server's own CPU (its threads included, the engines not): what a busy machine does not inflate.
        "server_cpu_ms_per_job": round(1000 * cpu / jobs, 2),
        # Every upload is taken in before it is queued: ffprobe and ffmpeg are processes of their
        # own (not in the CPU above); a 16 kHz mono WAV is copied by the server itself.
        "intake_ms_per_upload": intake_ms(clip, (extra_env or {}).get("WHISPER_DECODER", "auto")),
    }


def profile(work: Path, engine: Path, jobs: int, out: Path) -> None:
    """`jobs` queued jobs run one at a time under pyinstrument (the IOLoop's thread): where the
    sequential service overhead goes. The text report goes to `out`."""
    root = work / "queue-profile"
    root.mkdir(parents=True, exist_ok=True)
    with Whisperd(root, engine, wrap=[*PROFILER, str(out)]) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        ids = [_submit(conn, server.auth) for _ in range(jobs)]
        server.wait_job(ids[-1], "Completed", timeout=120, conn=conn)
        conn.close()
    prune_profile(out, 0.01)


def run(work: Path, engine: Path, quick: bool, do_profile: bool = True) -> dict:
    jobs = 100 if quick else 1000
    result = {
        "start_latency": start_latency(work, engine, 50 if quick else 200),
        "sequential": throughput(work, engine, jobs, 1),
        "concurrent": throughput(work, engine, jobs, 6),
        # Report only, so 100 jobs: each costs two ffmpeg-family starts (~0.25 s of CPU).
        "sequential_decoded": throughput(work, engine, 100, 1, AUDIO_44K),
    }
    if do_profile:
        profile(work, engine, 100, REPO / "bench" / "results" / "queue-profile.txt")
    return result
