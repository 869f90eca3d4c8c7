#!/usr/bin/env python3
"""Chaos run (issues 19 and 24): kill -9 in a stream of submissions and cancels, a ledger held by an
operator's sqlite3 session, a full disk under the ledger, job storage turning read-only and full,
PostgreSQL away longer than its retries and out of connection slots; then counts what was lost.

    .venv/bin/python bench/chaos.py [--seconds 150] [--only storage,connections] [--out FILE]

Each scenario runs a real whisperd (tests/conftest.py's Server, fake engine) and is bounded in
time; the whole run stays under --seconds (default 150). The full-disk scenario mounts a 4 MiB
tmpfs for the ledger (needs root; skipped with a note otherwise) and unmounts it at the end.
Goals: every accepted job ends (none lost, none stuck), no finished transcript recorded Failed,
every cancel honoured, no 5xx but 503, no file left behind once results are fetched. Issue 24's
scenarios add: no job Failed for the box's trouble (storage, database), no attempt spent on it,
no sync waiter answered 503 for an accepted job, no event stream ended without a last event, no
engine left running. The storage scenario mounts a tmpfs (root); the connection scenarios start
a throwaway PostgreSQL (tests/pg.py).
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


# -- job storage read-only, then full (issue 24) --------------------------------------------


class Submitter:
    """Clients submitting a stream of jobs; counts the answers by kind."""

    def __init__(self, servers: list[Server], threads: int = 2, pause: float = 0.1, **fields) -> None:
        self.servers, self.fields, self.pause = servers, fields, pause
        self.accepted: list[str] = []
        self.answers: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            server = self.servers[(index + n) % len(self.servers)]
            n += 1
            try:
                response = server.submit(diarize="false", timeout=60, **self.fields)
                key = str(response.status_code)
                if response.status_code in (503, 507) and "Retry-After" not in response.headers:
                    key += "-no-retry-after"
            except requests.RequestException as exc:
                key = exc.__class__.__name__
                response = None
            with self._lock:
                self.answers[key] = self.answers.get(key, 0) + 1
                if response is not None and response.status_code == 202:
                    self.accepted.append(response.json()["job_id"])
            time.sleep(self.pause)

    def __enter__(self) -> "Submitter":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)

    def bad_5xx(self) -> int:
        return sum(n for k, n in self.answers.items() if k[:1] == "5" and k not in ("503", "507"))


def _metric(server: Server, name: str) -> float:
    try:
        text = server.api("GET", "/metrics", timeout=10).text
    except requests.RequestException:
        return -1.0
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def storage_faults(root: Path, fault_seconds: float = 4.0) -> dict:
    disk = root / "jobdisk"
    disk.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)], check=True, capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        return {"skipped": f"cannot mount a tmpfs ({exc}); run as root"}
    server = Server(root / "storage", {"RUST_LOG": "warn", "ENABLE_CONCURRENCY": "true", "MAX_CONCURRENT_JOBS": "3",
                                       "FAKE_WHISPERX_SLOW_SECONDS": "0.5", "WHISPER_MIN_FREE_DISK_MB": "0",
                                       "WHISPER_TMP_FILES": str(disk / "tmp"), "WHISPER_OUTPUT_DIR": str(disk / "out"),
                                       "WHISPER_RESULT_GRACE_SECONDS": "0"})
    server.root.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    try:
        server.start()
        with Submitter([server], threads=2, pause=0.05, prompt="fake:slow") as clients:
            wait(lambda: len(clients.accepted) >= 6, 20)
            # Read-only, as after a remount on disk errors; a writer open at that moment makes
            # the remount busy for an instant, so it is retried.
            wait(lambda: subprocess.run(["mount", "-o", "remount,ro", str(disk)],
                                        capture_output=True).returncode == 0, 10, poll=0.02)
            results["health_red_read_only"] = bool(wait(
                lambda: server.api("GET", "/health", token=None).status_code == 503, 10))
            time.sleep(fault_seconds)  # the fault lasts this long, whatever the server does
            subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True, capture_output=True)
            results["health_green_after_ro"] = bool(wait(
                lambda: server.api("GET", "/health", token=None).status_code == 200, 10))
            filler = disk / "filler"
            with open(filler, "wb") as handle:
                try:
                    while True:
                        handle.write(b"\1" * 65536)
                        handle.flush()
                except OSError:
                    pass
            results["health_red_full"] = bool(wait(
                lambda: server.api("GET", "/health", token=None).status_code == 503, 10))
            time.sleep(fault_seconds)
            filler.unlink()
            results["health_green_after_full"] = bool(wait(
                lambda: server.api("GET", "/health", token=None).status_code == 200, 10))
            time.sleep(1.0)
        results["drained"] = server.wait_drained(60)
        ended = statuses(server, clients.accepted)
        rows = server.rows("SELECT attempts, status FROM jobs")
        results.update({
            "accepted": len(clients.accepted), "answers": dict(sorted(clients.answers.items())),
            "5xx_not_503_507": clients.bad_5xx(),
            "lost": sum(1 for v in ended.values() if v == "missing"),
            "failed": sum(1 for v in ended.values() if v == "Failed"),
            "completed": sum(1 for v in ended.values() if v == "Completed"),
            "attempts_spent_over_1": sum(1 for r in rows if r["attempts"] > 1),
            "requeued_for_storage": _metric(server, "whisperd_jobs_requeued_for_storage_total"),
        })
        server.stop(timeout=60)
    finally:
        if server.proc is not None and server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(10)
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=False, capture_output=True)
        subprocess.run(["umount", "-l", str(disk)], check=False)
    return results


# -- PostgreSQL away, and out of connection slots (issue 24) -------------------------------


def _events(server: Server, job_id: str, out: list) -> None:
    try:
        with server.api("GET", f"/transcription/{job_id}/events", stream=True, timeout=120) as stream:
            event = "status"
            for line in stream.iter_lines(decode_unicode=True):
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    out.append(event if event == "end" else line)
    except requests.RequestException as exc:
        out.append(exc.__class__.__name__)


def _stream_end(lines: list) -> str:
    if not lines:
        return "nothing"
    last = lines[-1]
    if last == "end":
        return "end event"
    return "final status" if ('"Completed"' in last or '"Failed"' in last) else "silent"


def database_away(root: Path, down_seconds: float = 13.0) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from pg import PostgresServer

    pg = PostgresServer().start()
    url = pg.new_database()
    shared = root / "pg-shared"
    env = {"RUST_LOG": "warn", "WHISPER_DB_URL": url, "WHISPER_TMP_FILES": str(shared / "tmp"),
           "WHISPER_OUTPUT_DIR": str(shared / "out"), "WHISPER_LEASE_SECONDS": "60", "SYNC_REQUEST_TIMEOUT_SECONDS": "40",
           "FAKE_WHISPERX_SLOW_SECONDS": "2", "ENABLE_CONCURRENCY": "true", "MAX_CONCURRENT_JOBS": "2",
           "WHISPER_RESULT_GRACE_SECONDS": "0"}
    nodes = [Server(root / f"pg-node{i}", {**env, "WHISPER_NODE_NAME": f"n{i}"}) for i in range(2)]
    results: dict = {}
    try:
        for node in nodes:
            node.root.mkdir(parents=True, exist_ok=True)
            node.start()
        # Sync waiters and event streams across an outage longer than the ledger's 10 s of retries.
        sync_answers: list = []
        streams: list[list] = []

        def sync_client(node: Server) -> None:
            try:
                response = node.submit(diarize="false", sync="true", prompt="fake:slow", timeout=120)
                has_id = "job_id" in response.text or response.status_code == 200
                sync_answers.append(f"{response.status_code}{'' if has_id else '-without-job-id'}")
            except requests.RequestException as exc:
                sync_answers.append(exc.__class__.__name__)

        waiters = [threading.Thread(target=sync_client, args=(nodes[i % 2],)) for i in range(3)]
        for thread in waiters:
            thread.start()
        running = wait(lambda: nodes[0].rows("SELECT id FROM jobs"), 20) or []
        readers = []
        for row in running[:3]:
            lines: list = []
            streams.append(lines)
            readers.append(threading.Thread(target=_events, args=(nodes[1], row["id"], lines)))
            readers[-1].start()
        wait(lambda: all(streams), 10)
        with Submitter(nodes, threads=2, pause=0.3, prompt="fake:slow") as clients:
            pg.restart(down_seconds=down_seconds)
            time.sleep(2.0)
        for thread in waiters + readers:
            thread.join(120)
        drained = nodes[0].wait_drained(90)
        ids = [r["id"] for r in nodes[0].rows("SELECT id FROM jobs")]
        ended = statuses(nodes[0], ids)
        results["outage"] = {
            "down_s": down_seconds, "sync_answers": sorted(sync_answers),
            "streams_ended_by": sorted(_stream_end(lines) for lines in streams),
            "submissions": dict(sorted(clients.answers.items())), "5xx_not_503": clients.bad_5xx(),
            "accepted": len(clients.accepted) + len(running), "drained": drained,
            "failed": sum(1 for v in ended.values() if v == "Failed"),
            "lost": sum(1 for job_id in clients.accepted if ended.get(job_id, "missing") == "missing"),
        }
        results["no connection slots"] = no_connection_slots(pg, url, nodes)
    finally:
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                os.killpg(node.proc.pid, signal.SIGKILL)
                node.proc.wait(10)
        pg.stop()
    return results


def no_connection_slots(pg, url: str, nodes: list[Server], hold_seconds: float = 6.0,
                        max_connections: int = 20) -> dict:
    """Another client takes every free connection slot ("too many clients", SQLSTATE 53300) for
    a while: the nodes' pools cannot grow, new connections are refused."""
    import asyncio

    import asyncpg

    async def hog(stop: threading.Event, held: list) -> None:
        conns = []
        try:
            # All at once, as soon as the server takes connections: before the nodes reconnect.
            while not conns:
                got = await asyncio.gather(*(asyncpg.connect(url) for _ in range(max_connections)),
                                           return_exceptions=True)
                conns = [conn for conn in got if isinstance(conn, asyncpg.Connection)]
            held.append(len(conns))
            while not stop.is_set():
                await asyncio.sleep(0.05)
        finally:
            for conn in conns:
                await conn.close()

    def engines_alive() -> int:
        count = 0
        for node in nodes:
            for run in node.engine_runs():
                try:
                    os.kill(run["pid"], 0)
                    count += 1
                except (ProcessLookupError, PermissionError):
                    pass
        return count

    before = {r["id"] for r in nodes[0].rows("SELECT id FROM jobs")}
    stop = threading.Event()
    held: list = []
    hogger = threading.Thread(target=lambda: asyncio.run(hog(stop, held)))
    # A restart with few slots drops the pools' connections: the nodes must connect again, and
    # the hog (started at once) leaves them none.
    pg._run("pg_ctl", "-D", str(pg.data), "-m", "fast", "-w", "stop")
    options = (f"-c listen_addresses=127.0.0.1 -p {pg.port} -k {pg.root} -c fsync=off -c synchronous_commit=off"
               f" -c full_page_writes=off -c max_connections={max_connections}")
    pg._run("pg_ctl", "-D", str(pg.data), "-o", options, "-l", str(pg.root / "postgres.log"), "-w", "-t", "60", "start")
    hogger.start()
    with Submitter(nodes, threads=3, pause=0.2) as clients:
        wait(lambda: held, 30)
        time.sleep(hold_seconds)
        stop.set()
        hogger.join(30)
        time.sleep(2.0)
    drained = nodes[0].wait_drained(90)
    ids = [r["id"] for r in nodes[0].rows("SELECT id FROM jobs") if r["id"] not in before]
    ended = statuses(nodes[0], ids)
    reasons = sorted({(r["error"] or "")[:60] for r in nodes[0].rows(
        "SELECT error FROM jobs WHERE status='Failed'") if r})
    return {
        "max_connections": max_connections, "slots_taken_by_hog": held[0] if held else 0, "held_s": hold_seconds,
        "submissions": dict(sorted(clients.answers.items())), "5xx_not_503": clients.bad_5xx(),
        "accepted": len(clients.accepted), "drained": drained,
        "failed": sum(1 for v in ended.values() if v == "Failed"), "failed_because": reasons,
        "lost": sum(1 for job_id in clients.accepted if ended.get(job_id, "missing") == "missing"),
        "engines_left_running": engines_alive(), "nodes_alive": sum(1 for n in nodes if n.proc.poll() is None),
    }


SCENARIOS = ("kill9", "held", "full", "storage", "connections")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {SCENARIOS}")
    parser.add_argument("--out", default=None, help="also write the summary to this file")
    args = parser.parse_args()
    chosen = set(args.only.split(","))
    root = Path(tempfile.mkdtemp(prefix="whisperd-chaos-"))
    started = time.monotonic()
    summary = {}
    if "kill9" in chosen:
        summary["kill -9 soak"] = kill9_soak(root, args.seconds * 0.5)
    if "held" in chosen:
        summary["ledger held (BEGIN EXCLUSIVE)"] = held_ledger(root, 3)
    if "full" in chosen:
        summary["full disk under the ledger"] = full_disk(root, 2)
    if "storage" in chosen:
        summary["job storage read-only, then full"] = storage_faults(root)
    if "connections" in chosen:
        for name, figures in database_away(root).items():
            summary[f"PostgreSQL {name}"] = figures
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
