"""#2 Status reads under a big ledger: 100,000 jobs, wrk on loopback, and the query plans.

The ledger is made by the server's own migrations (whisperd.ledger.prepare), then filled with
plain INSERTs: a long history of finished jobs and a backlog of Queued ones at the end. The
oldest Queued job gets an audio file and the noop engine sleeps, so it stays Processing and
the backlog stays put for the whole run (the queue is global: one job at a time).
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from unittest import mock

import aiosqlite

from whisperd.ledger import sqlite as ledger_module

from .common import PROFILER, REPO, Whisperd, cpu_seconds, free_port, prune_profile, stop_process, wait_http

# wrk runs this: walk the paths in order (pre-shuffled), and print the summary as one JSON line.
WRK_SCRIPT = """
local paths = {%s}
local i = 0
request = function()
  i = i %% #paths + 1
  return wrk.format("GET", paths[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK {"requests": %%d, "rps": %%.1f, "p50_ms": %%.3f, "p99_ms": %%.3f, "errors": %%d}\\n',
    summary.requests, summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, e.connect + e.read + e.write + e.timeout + e.status))
end
"""


def fill(db_path: Path, total: int, queued: int) -> dict[str, list[str]]:
    """Create the ledger with the migrations, insert `total` jobs (the last `queued` Queued); ids by status."""
    ledger_module.prepare(str(db_path), 3, "bench")
    rng = random.Random(7)
    ids: dict[str, list[str]] = {"Completed": [], "Failed": [], "Canceled": [], "Queued": []}
    rows, events = [], []
    # The last 24 hours, oldest first: inside the retention period, so no expiry pass runs meanwhile.
    start = datetime.now(timezone.utc) - timedelta(hours=24)
    for n in range(total):
        job_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        at = (start + timedelta(seconds=n * 86400 / total)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        if n >= total - queued:
            status = "Queued"
        else:
            status = rng.choices(["Completed", "Failed", "Canceled"], [90, 7, 3])[0]
        finished = None if status == "Queued" else at
        delivered = at if status == "Completed" else None
        error = {"Failed": "fake failure", "Canceled": "canceled by the client"}.get(status)
        rows.append((job_id, "bench", status, at, at if finished else None, finished, delivered, "clip.flac",
                     123456, "en", "tiny.en", "txt", 0, "", "cpu", "0", 1 if finished else 0, error))
        events.append((job_id, at, "accepted", "bench", "clip.flac, 123456 bytes"))
        ids[status].append(job_id)
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO jobs (id, owner, status, created_at, started_at, finished_at, delivered_at, filename,"
        " upload_bytes, language, model, response_format, diarize, prompt, device, device_index, attempts, error)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    conn.executemany("INSERT INTO job_events (job_id, at, event, actor, detail) VALUES (?, ?, ?, ?, ?)", events)
    conn.execute("COMMIT")
    conn.close()
    return ids


async def _traced_reads(db_path: Path, job_id: str) -> list[str]:
    """The SQL the status endpoints run, captured from the server's own Ledger methods."""
    statements: list[str] = []
    real_connect = aiosqlite.connect

    async def traced_connect(*args, **kwargs):
        conn = await real_connect(*args, **kwargs)
        await conn.set_trace_callback(statements.append)
        return conn

    with mock.patch.object(ledger_module.aiosqlite, "connect", traced_connect):
        ledger = ledger_module.SQLiteLedger(str(db_path), "bench")
        await ledger.open()
        ledger._point.set_trace_callback(statements.append)  # reads by key, on the IOLoop's thread
        statements.clear()  # the PRAGMAs of opening are not part of a request
        try:
            await ledger.get_with_position(job_id)  # GET /transcription/{id}, also of a Queued job
            await ledger.counts()  # GET /status
        finally:
            await ledger.close()
    return statements


def query_plans(db_path: Path, job_id: str) -> list[dict]:
    conn = sqlite3.connect(db_path)
    plans = []
    for sql in asyncio.run(_traced_reads(db_path, job_id)):
        steps = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)]
        # "SCAN t" reads every row; "SCAN t USING ... INDEX" reads every index entry: both grow with the
        # table. A SCAN of a subquery's rows ("CO-ROUTINE x", here one with a LIMIT) does not.
        subqueries = {s.split()[1] for s in steps if s.startswith("CO-ROUTINE ")}
        scans = any(s.startswith("SCAN") and s.split()[1] not in subqueries for s in steps)
        plans.append({"sql": sql, "plan": steps, "scans": scans})
    conn.close()
    return plans


def wrk(port: int, paths: list[str], connections: int, seconds: float, script: Path, token: str = "none") -> dict:
    script.write_text(WRK_SCRIPT % ", ".join(json.dumps(p) for p in paths))
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script),
         "-H", f"Authorization: Bearer {token}", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith("WRK "))
    return json.loads(line[4:])


def _per_request(cpu: float, figures: dict) -> float:
    """Server CPU per answered request, in microseconds: what a busy machine does not inflate."""
    return round(1e6 * cpu / max(1, figures["requests"]), 1)


def run(work: Path, engine: Path, quick: bool, do_profile: bool = True) -> dict:
    total, queued = 100_000, 2_000
    seconds = 1 if quick else 8
    root = work / "ledger"
    root.mkdir(parents=True, exist_ok=True)
    ids = fill(root / "whisperd.db", total, queued)
    first = ids["Queued"][0]
    (root / "tmp" / first).mkdir(parents=True)
    (root / "tmp" / first / "audio.wav").write_bytes(b"noop")
    rng = random.Random(8)
    # Finished jobs in proportion, plus Queued ones (whose answer counts their queue position);
    # canceled ones answer 410, which wrk would count as errors.
    sample = rng.sample(ids["Completed"] + ids["Failed"], 1500) + rng.sample(ids["Queued"][1:], 500)
    rng.shuffle(sample)
    job_paths = [f"/transcription/{job_id}" for job_id in sample]
    result: dict = {"jobs": total, "queued": queued, "seconds_per_run": seconds,
                    "query_plans": query_plans(root / "whisperd.db", ids["Queued"][-1]), "runs": []}
    port = free_port()
    hello = subprocess.Popen([sys.executable, "-m", "bench.peers", "hello", str(port)], cwd=REPO, start_new_session=True)
    try:
        wait_http(port, proc=hello)
        for connections in (1, 8):
            cpu = cpu_seconds(hello.pid)
            figures = wrk(port, job_paths, connections, seconds, work / "wrk.lua")
            figures["server_cpu_us_per_request"] = _per_request(cpu_seconds(hello.pid) - cpu, figures)
            result["runs"].append({"endpoint": "tornado_hello", "workers": 1, "connections": connections, **figures})
    finally:
        stop_process(hello)
    env = {"FAKE_WHISPERX_SLEEP": "3600", "WHISPER_SHUTDOWN_GRACE_SECONDS": "0.2", "WHISPER_KILL_GRACE_SECONDS": "0.5"}
    for workers in (1, 2):
        with Whisperd(root, engine, {**env, "HTTP_WORKER_NUMBER": str(workers)}) as server:
            server.wait_job(first, "Processing")
            status, body = server.request("GET", f"/transcription/{ids['Queued'][-1]}")
            assert status == 200 and body["queue_position"] == queued - 1, (status, body)
            for name, paths in (("job", job_paths), ("status", ["/status"])):
                for connections in (1, 8):
                    cpu = cpu_seconds(server.proc.pid)  # with 2 workers, the supervisor's own: not reported
                    figures = wrk(server.port, paths, connections, seconds, work / "wrk.lua", server.token)
                    if workers == 1:
                        figures["server_cpu_us_per_request"] = _per_request(cpu_seconds(server.proc.pid) - cpu, figures)
                    result["runs"].append({"endpoint": name, "workers": workers, "connections": connections, **figures})
    if do_profile:  # where a status read's time goes: one connection, one worker, under pyinstrument
        out = REPO / "bench" / "results" / "status-profile.txt"
        with Whisperd(root, engine, {**env, "HTTP_WORKER_NUMBER": "1"}, wrap=[*PROFILER, str(out)]) as server:
            server.wait_job(first, "Processing")
            wrk(server.port, job_paths, 1, 3, work / "wrk.lua", server.token)
        prune_profile(out, 0.01)
    return result
