"""Issue 24: what a cluster leans on falters (storage, a ledger that raises, a stray directory, a
long outage, nodes sharing a host), and no accepted job becomes a Failed one."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from conftest import alive, wait_until
from harness import metric
from test_cluster import cluster, events_of  # noqa: F401  (the fixture: nodes on one PostgreSQL)


def _mount(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, f"this test needs root to mount a small tmpfs: {done.stderr}"


def _remount(path: Path, mode: str) -> None:
    # A file open for writing makes a read-only remount busy for a moment: try until it takes.
    wait_until(lambda: subprocess.run(["mount", "-o", f"remount,{mode}", str(path)],
                                      capture_output=True).returncode == 0, what=f"remount {mode}")


def _status(node, job_id: str) -> str:
    return node.rows("SELECT status FROM jobs WHERE id=?", (job_id,))[0]["status"]


def _health(node) -> requests.Response:
    return node.api("GET", "/health", token=None)


def test_read_only_or_full_storage_requeues_jobs_uncounted_and_stops_the_node_until_it_is_writable(cluster):
    _mount(cluster.shared, "16m")
    try:
        node = cluster("disk", "all", FAKE_WHISPERX_SLOW_SECONDS="1.5", WHISPER_MIN_FREE_DISK_MB="0")
        # Read-only: the running job's engine cannot write its output, the queued ones could
        # not even get an output directory. Before: 40 jobs Failed in 0.3 s, submissions 500.
        running = node.submit_ok(diarize="false", prompt="fake:slow")
        queued = [node.submit_ok(diarize="false") for _ in range(4)]
        node.wait_status(running, ("Processing",))
        wait_until(lambda: node.engine_runs(), what="the engine to start")
        _remount(cluster.shared, "ro")
        wait_until(lambda: _health(node).status_code == 503, what="/health to report the storage")
        health = _health(node).json()
        assert "read-only" in health["checks"]["storage"], health
        refused = node.submit(diarize="false")
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["Retry-After"]) > 0 and "storage" in refused.json()["error"]
        wait_until(lambda: _status(node, running) == "Queued", what="the running job to go back to the queue")
        assert node.rows("SELECT id FROM jobs WHERE status IN ('Failed', 'Processing')") == []
        assert "claiming no job" in node.log()
        assert metric(node, 'whisperd_storage_unhealthy') == 1.0
        _remount(cluster.shared, "rw")
        for job_id in [running, *queued]:
            assert node.wait_status(job_id, timeout=60)["status"] == "Completed"
        (row,) = node.rows("SELECT attempts FROM jobs WHERE id=?", (running,))
        assert row["attempts"] == 1  # the requeue for storage spent no attempt
        details = [r["detail"] for r in node.rows(
            "SELECT detail FROM job_events WHERE job_id=? AND event='requeued'", (running,))]
        assert details and all("storage" in d for d in details), details
        assert _health(node).status_code == 200
        assert "writable again" in node.log()

        # Full: the same, with 507 for submissions. Before: the 3 running jobs Failed.
        slow = node.submit_ok(diarize="false", prompt="fake:slow")
        node.wait_status(slow, ("Processing",))
        filler = cluster.shared / "filler"
        with open(filler, "wb") as handle:
            try:
                while True:
                    handle.write(b"\1" * 65536)
                    handle.flush()
            except OSError:
                pass
        wait_until(lambda: _health(node).status_code == 503, what="/health to report the full disk")
        assert "full" in _health(node).json()["checks"]["storage"]
        refused = node.submit(diarize="false")
        assert refused.status_code == 507 and "Retry-After" in refused.headers, refused.text
        wait_until(lambda: _status(node, slow) == "Queued", what="the job to go back to the queue")
        filler.unlink()
        assert node.wait_status(slow, timeout=60)["status"] == "Completed"
        assert node.rows("SELECT attempts FROM jobs WHERE id=?", (slow,))[0]["attempts"] == 1
        assert node.rows("SELECT id FROM jobs WHERE status='Failed'") == []
        assert metric(node, 'whisperd_storage_faults_total{kind="full"}') >= 1
        node.stop()
    finally:
        subprocess.run(["umount", "-l", str(cluster.shared)], check=False)


def test_a_ledger_callback_that_raises_stops_the_engine_and_keeps_the_job(cluster):
    # Recording the engine's pid raises what the ledger does not classify (as "too many
    # clients" did): before, the job was Failed "internal error" and its engine ran on.
    node = cluster("pidfail", "all", FAKE_WHISPERX_SLOW_SECONDS="30", WHISPERD_FAIL_AT="engine-pid")
    job_id = node.submit_ok(diarize="false", prompt="fake:slow")
    wait_until(lambda: "requeued" in events_of(node, job_id), what="the job to go back to the queue")
    pids = [int(pid) for pid in re.findall(rf"job {job_id}: engine started, pid (\d+)", node.log())]
    wait_until(lambda: not alive(pids[0]), what="the engine to be stopped")
    node.stop()
    assert "failed" not in events_of(node, job_id)
    assert node.rows("SELECT attempts FROM jobs WHERE id=?", (job_id,))[0]["attempts"] <= 1
    for pid in re.findall(rf"job {job_id}: engine started, pid (\d+)", node.log()):
        assert not alive(int(pid))
    node.env.pop("WHISPERD_FAIL_AT")
    node.env["FAKE_WHISPERX_SLOW_SECONDS"] = "0.2"
    node.start()
    assert node.wait_status(job_id, timeout=30)["status"] == "Completed"
    # The ledger raising the same way while a job is submitted: 503 with Retry-After, nothing kept.
    api = cluster("subfail", "api", WHISPERD_FAIL_AT="ledger-submit")
    refused = api.submit(diarize="false")
    assert refused.status_code == 503 and refused.headers["Retry-After"], refused.text
    assert len(node.rows("SELECT id FROM jobs")) == 1
    assert [p.name for p in (cluster.shared / "tmp").iterdir() if not p.name.startswith(".")] == [job_id]
    assert not list((cluster.shared / "tmp" / ".incoming" / "subfail").iterdir())


def test_a_node_pointed_at_another_directory_is_refused_in_one_line_naming_it(cluster, postgres, tmp_path):
    first = cluster("first", "all")
    job_id = first.submit_ok(diarize="false")
    assert first.wait_status(job_id)["status"] == "Completed"
    for name, setting in (("strayout", "WHISPER_OUTPUT_DIR"), ("straytmp", "WHISPER_TMP_FILES")):
        stray_dir = tmp_path / f"elsewhere-{name}"
        stray = cluster(name, "all", start=False, **{setting: str(stray_dir)})
        stray.start(wait=False)
        assert stray.proc.wait(60) == 1
        last = stray.log().strip().splitlines()[-1]
        assert last.startswith(f"whisperd: {setting}={stray_dir}"), last
        assert "not this cluster's shared directory" in last
    (identity,) = [r["identity"] for r in first.rows("SELECT identity FROM cluster_identity")]
    for sub in ("tmp", "output"):
        assert (cluster.shared / sub / ".whisperd-cluster").read_text().strip() == identity
    # Another cluster's ledger over this cluster's directory: refused too.
    other = cluster("foreign", "all", start=False, WHISPER_DB_URL=postgres.new_database())
    other.start(wait=False)
    assert other.proc.wait(60) == 1
    assert "belongs to another cluster" in other.log().strip().splitlines()[-1]
    # A node that shares the directory starts, and the result is still there to fetch.
    second = cluster("second", "all")
    assert second.api("GET", f"/transcription/{job_id}/result").status_code == 200


def _read_events(node, job_id: str, seen: list) -> None:
    with node.api("GET", f"/transcription/{job_id}/events", stream=True, timeout=90) as stream:
        event = "status"
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                seen.append((event, json.loads(line[6:])))


def test_a_sync_waiter_gets_its_result_or_its_job_id_through_a_long_database_outage(cluster, postgres):
    # Before: after 12 s of a 20 s outage the waiter got 503 "try again" without the job id.
    node = cluster("waits", "all", SYNC_REQUEST_TIMEOUT_SECONDS="45", WHISPER_LEASE_SECONDS="90",
                   FAKE_WHISPERX_SLOW_SECONDS="2")
    seen: list = []
    with ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(node.submit, None, sync="true", diarize="false", prompt="fake:slow", timeout=120)
        (row,) = wait_until(lambda: node.rows("SELECT id FROM jobs WHERE status='Processing'"),
                            what="the sync job to run")
        job_id = row["id"]
        stream = pool.submit(_read_events, node, job_id, seen)
        wait_until(lambda: seen, what="the event stream to begin")
        postgres.restart(down_seconds=13.0)  # longer than the ledger's 10 s of retries
        answer = waiting.result(120)
        stream.result(120)
    assert answer.status_code in (200, 202), answer.text
    if answer.status_code == 202:
        assert answer.json()["job_id"] == job_id
    else:
        assert answer.json()["text"]
    event, body = seen[-1]
    assert (event == "end" and "ledger" in body["reason"] and body["job_id"] == job_id) \
        or body.get("status") == "Completed", seen
    assert node.wait_status(job_id, timeout=60)["status"] == "Completed"


def test_nodes_on_one_host_keep_their_own_engine_socket_and_refuse_a_held_runtime_path(cluster):
    # WHISPER_DB_PATH unset: before, every node bound <parent of WHISPER_TMP_FILES>/engine.sock
    # and stopping one unlinked the others' socket.
    common = {"WHISPER_DB_PATH": "", "WHISPER_ENGINE": "worker", "HTTP_WORKER_NUMBER": "2",
              "FAKE_WHISPERX_SLOW_SECONDS": "0.2"}
    alpha = cluster("alpha", "all", **common)
    bravo = cluster("bravo", "all", **common)

    def socket_of(node) -> Path:
        found = wait_until(lambda: re.search(r"engine host serving .* on (\S+)", node.log()),
                           what="the engine host to listen")
        return Path(found.group(1))

    sockets = {socket_of(alpha), socket_of(bravo)}
    assert len(sockets) == 2, sockets
    bravo.stop()
    assert socket_of(alpha).exists()
    jobs = [alpha.submit_ok(diarize="false") for _ in range(3)]
    for job_id in jobs:
        assert alpha.wait_status(job_id, timeout=60)["status"] == "Completed"
    # A second node under alpha's name on this host would take its socket: refused, naming the path.
    twin = cluster("alpha", "worker", start=False, **common)
    twin.start(wait=False)
    assert twin.proc.wait(60) == 1
    last = twin.log().strip().splitlines()[-1]
    assert "in use by another live whisperd node" in last and "alpha" in last, last
    assert alpha.proc.poll() is None


def test_a_database_error_the_ledger_does_not_classify_is_503_with_retry_after(cluster, postgres):
    # A failover onto a read-only database (SQLSTATE 25006): every write raises an error the
    # ledger has no rule for. Before: submissions and cancels answered a bare 500.
    node = cluster("readonlydb", "api")
    queued = node.submit_ok(diarize="false")
    database = cluster.url.rsplit("/", 1)[1]

    def reconnect_all() -> None:
        postgres.psql("postgres", f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname='{database}'")

    postgres.psql("postgres", f"ALTER DATABASE {database} SET default_transaction_read_only = on")
    reconnect_all()
    try:
        refused = node.submit(diarize="false")
        assert refused.status_code == 503 and refused.headers["Retry-After"], refused.text
        cancel = node.api("DELETE", f"/transcription/{queued}")
        assert cancel.status_code == 503 and cancel.headers["Retry-After"], cancel.text
        assert "ledger" in cancel.json()["error"]
    finally:
        postgres.psql("postgres", f"ALTER DATABASE {database} RESET default_transaction_read_only")
        reconnect_all()
    assert len(node.rows("SELECT id FROM jobs")) == 1
    assert node.api("DELETE", f"/transcription/{queued}").status_code == 200
