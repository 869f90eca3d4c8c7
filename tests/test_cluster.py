"""Several nodes on one PostgreSQL ledger and one job directory: work spreads, each job runs once,
requests work on any node, a dead node's job is finished by another, a database restart loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import REPO, _job_file, alive, wait_until
from harness import OutageFeeder
from pg import PASSWORD


@pytest.fixture
def cluster(make_server, postgres, tmp_path):
    """make_node(name, role, **env): a node on this test's database and shared job directory
    (the shared-directory cluster even when WHISPERD_TEST_STORAGE=s3: test_cluster_s3.py is S3's)."""
    url = postgres.new_database()
    shared = tmp_path / "shared"

    def make_node(name: str, role: str = "all", start: bool = True, **env):
        env = {"WHISPER_DB_URL": url, "WHISPER_NODE_NAME": name, "WHISPER_NODE_ROLE": role,
               "WHISPER_TMP_FILES": str(shared / "tmp"), "WHISPER_OUTPUT_DIR": str(shared / "output"),
               "WHISPER_LEASE_SECONDS": "3", "WHISPER_STORAGE_URL": "", **env}
        return make_server(start=start, **env)

    make_node.url = url
    make_node.shared = shared
    return make_node


def ran_on(server, job_ids) -> dict[str, str]:
    rows = server.rows("SELECT id, node FROM jobs WHERE id = ANY(?)", (list(job_ids),))
    return {row["id"]: row["node"] for row in rows}


def events_of(server, job_id) -> list[str]:
    return [r["event"] for r in server.rows("SELECT event FROM job_events WHERE job_id=? ORDER BY id", (job_id,))]


def shared_files(root: Path) -> list[str]:
    found = []
    for sub in ("tmp", "output"):
        base = root / sub
        try:
            if base.exists():
                found += [str(p) for p in base.rglob("*") if _job_file(p.relative_to(base).parts)]
        except FileNotFoundError as exc:  # a directory went while it was walked: still on its way out
            found.append(str(exc.filename))
    return found


def shared_files_gone(root: Path, timeout: float = 10.0) -> bool:
    """A delivery's files go just after the client has the last byte (harness.files_gone)."""
    try:
        wait_until(lambda: not shared_files(root), timeout, "the job's files to go", poll=0.02)
    except AssertionError:
        return False
    return True


def test_work_spreads_over_two_worker_nodes_and_each_job_runs_once(cluster):
    both = cluster("alpha", "all", FAKE_WHISPERX_SLOW_SECONDS="1")
    api = cluster("bravo", "api")
    worker = cluster("charlie", "worker", FAKE_WHISPERX_SLOW_SECONDS="1")
    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda _: api.submit_ok(diarize="false", prompt="fake:slow"), range(12)))
    for job_id in ids:
        assert api.wait_status(job_id, timeout=60)["status"] == "Completed"
    nodes = ran_on(api, ids)
    assert set(nodes.values()) == {"alpha", "charlie"}, nodes  # the api node runs nothing
    assert api.engine_runs() == []
    runs = both.engine_runs() + worker.engine_runs()
    ran = [run["argv"][1].split("/")[-2] for run in runs]
    assert sorted(ran) == sorted(ids)  # each job once, on one node
    for job_id in ids:
        assert events_of(api, job_id).count("started") == 1
    # The two worker nodes ran jobs at the same time (sequential mode is per node, not global).
    spans = {node: [] for node in ("alpha", "charlie")}
    for row in api.rows("SELECT node, started_at, finished_at FROM jobs"):
        spans[row["node"]].append((row["started_at"], row["finished_at"]))
    for node, own in spans.items():
        own.sort()
        for (_, end), (start, _) in zip(own, own[1:]):
            assert end <= start, f"node {node} ran two jobs at once in sequential mode"
    assert any(a_start < c_end and c_start < a_end
               for a_start, a_end in spans["alpha"] for c_start, c_end in spans["charlie"])
    # Queue positions are global, whichever node is asked.
    status = api.api("GET", "/status").json()
    assert {n["name"]: n["role"] for n in status["nodes"]} == {"alpha": "all", "bravo": "api", "charlie": "worker"}
    assert status["node"] == {"name": "bravo", "role": "api"}
    # Results fetched through any node: every file of every job is gone from the shared storage.
    for i, job_id in enumerate(ids):
        assert (both, api)[i % 2].api("GET", f"/transcription/{job_id}/result").status_code == 200
    assert shared_files_gone(cluster.shared), shared_files(cluster.shared)


def test_sync_sse_result_and_cancel_across_nodes(cluster):
    # An api node runs no engine: its health does not depend on one being installed.
    api = cluster("api1", "api", SYNC_REQUEST_TIMEOUT_SECONDS="60", WHISPER_CMD="/nonexistent/whisperx")
    assert api.api("GET", "/health", token=None).json()["checks"]["engine"] == "not used (WHISPER_NODE_ROLE=api)"
    worker = cluster("work1", "worker", FAKE_WHISPERX_SLOW_SECONDS="30")
    # A sync request on the api node gets the result the worker node made.
    response = api.submit(diarize="false", sync="true")
    assert response.status_code == 200, response.text
    assert response.json()["text"]
    # The event stream on the api node follows a job running on the worker node to its end.
    job_id = api.submit_ok(diarize="false", prompt="fake:ok")
    with api.api("GET", f"/transcription/{job_id}/events", stream=True, timeout=30) as stream:
        statuses = []
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                statuses.append(json.loads(line[6:])["status"])
                if statuses[-1] in ("Completed", "Failed"):
                    break
    assert statuses[-1] == "Completed", statuses
    # Its result, fetched from the api node, was made on the worker node; then every file is gone.
    result = api.api("GET", f"/transcription/{job_id}/result")
    assert result.status_code == 200 and result.json()["text"]
    # A delivery's files go just after the last byte.
    wait_until(lambda: not (cluster.shared / "output" / job_id).exists() and not (cluster.shared / "tmp" / job_id).exists(),
               10, "the delivered job's files to go", poll=0.02)
    # DELETE on the api node stops the engine on the worker node within seconds.
    slow = api.submit_ok(diarize="false", prompt="fake:slow")
    api.wait_status(slow, ("Processing",))
    (run,) = wait_until(lambda: [r for r in worker.engine_runs() if slow in r["argv"][1]], 10,
                        "the worker node to start the engine")
    started = time.monotonic()
    response = api.api("DELETE", f"/transcription/{slow}")
    assert response.status_code == 200, response.text
    assert api.status(slow).status_code == 410
    wait_until(lambda: not alive(run["pid"]), 10, "the engine on the worker node to be stopped")
    assert time.monotonic() - started < 8
    assert "canceled" in events_of(api, slow)
    # A worker node answers /health and /metrics only.
    assert worker.api("GET", "/health", token=None).status_code == 200
    assert worker.api("GET", "/status").status_code == 404


def test_a_killed_node_s_job_is_finished_by_another_after_its_lease(cluster):
    api = cluster("front", "api")
    doomed = cluster("doomed", "worker", FAKE_WHISPERX_SLOW_SECONDS="30")
    job_id = api.submit_ok(diarize="false", prompt="fake:slow")
    api.wait_status(job_id, ("Processing",))
    (run,) = wait_until(doomed.engine_runs, 10, "the doomed node to start the engine")
    doomed.kill9()
    os.killpg(run["pgid"], signal.SIGKILL)  # the box is gone: its engine with it
    killed_at = time.monotonic()
    survivor = cluster("survivor", "worker", FAKE_WHISPERX_SLOW_SECONDS="0.3")
    assert api.wait_status(job_id, timeout=30)["status"] == "Completed"
    assert time.monotonic() - killed_at >= 2.5  # not before the 3 s lease ran out
    (row,) = api.rows("SELECT node, attempts FROM jobs WHERE id=?", (job_id,))
    assert row["node"] == "survivor" and row["attempts"] == 2
    events = events_of(api, job_id)
    assert events.count("started") == 2 and events.count("completed") == 1 and "requeued" in events
    (detail,) = [r["detail"] for r in api.rows("SELECT detail FROM job_events WHERE job_id=? AND event='requeued'",
                                                (job_id,))]
    assert "lease" in detail
    assert len(survivor.engine_runs()) == 1
    assert api.api("GET", f"/transcription/{job_id}/result").status_code == 200


def test_a_job_that_keeps_killing_nodes_fails_after_max_attempts(cluster):
    api = cluster("front", "api", WHISPER_MAX_ATTEMPTS="2")
    job_id = api.submit_ok(diarize="false", prompt="fake:slow")
    for attempt in range(2):
        node = cluster(f"victim{attempt}", "worker", WHISPER_MAX_ATTEMPTS="2", FAKE_WHISPERX_SLOW_SECONDS="30")
        api.wait_status(job_id, ("Processing",))
        wait_until(node.engine_runs, 10, "the node to start the engine")
        node.kill9()
        os.killpg(node.engine_runs()[0]["pgid"], signal.SIGKILL)
    status = api.wait_status(job_id, ("Failed",), timeout=30)
    assert "gave up after 2 attempts" in status["data"]
    assert not (cluster.shared / "tmp" / job_id).exists()


def test_the_database_restarted_under_load_loses_nothing(cluster, postgres):
    env = {"FAKE_WHISPERX_SLOW_SECONDS": "0.3", "WHISPER_LEASE_SECONDS": "20"}
    one = cluster("one", "all", ENABLE_CONCURRENCY="true", MAX_CONCURRENT_JOBS="2", **env)
    two = cluster("two", "worker", ENABLE_CONCURRENCY="true", MAX_CONCURRENT_JOBS="2", **env)
    ids = [one.submit_ok(diarize="false", prompt="fake:slow") for _ in range(8)]
    with OutageFeeder(one, 6) as feeder:  # refused in words while the ledger is away is acceptable; a lost job is not
        postgres.restart(down_seconds=1.0)
    ids += feeder.accepted
    assert len(feeder.accepted) >= 3, feeder.refused
    deadline = time.monotonic() + 90
    for job_id in ids:
        assert one.wait_status(job_id, timeout=max(1, deadline - time.monotonic()))["status"] == "Completed"
    for job_id in ids:
        events = events_of(one, job_id)
        assert events.count("completed") == 1, (job_id, events)
    runs = [run["argv"][1].split("/")[-2] for run in one.engine_runs() + two.engine_runs()]
    assert set(ids) <= set(runs)
    # Both nodes are still alive and still take work after the restart.
    late = [one.submit_ok(diarize="false", prompt="fake:slow") for _ in range(4)]
    for job_id in late:
        assert one.wait_status(job_id, timeout=30)["status"] == "Completed"
    assert one.proc.poll() is None and two.proc.poll() is None


def test_nodes_starting_together_migrate_once_and_job_events_read_with_psql(cluster, postgres):
    nodes = [cluster(f"n{i}", "all", start=False) for i in range(3)]
    for node in nodes:
        node.start(wait=False)
    for node in nodes:
        node.wait_ready()
    database = cluster.url.rsplit("/", 1)[1]
    versions = postgres.psql(database, "SELECT version FROM schema_migrations ORDER BY version").split()
    # Every numbered migration, in order, once: the same files' numbers as SQLite's.
    shipped = sorted(path.stem for path in (REPO / "migrations" / "postgresql").glob("*.sql"))
    assert versions == [str(int(name[:4])) for name in shipped]
    assert [path.stem for path in sorted((REPO / "migrations" / "sqlite").glob("*.sql"))] == shipped
    job_id = nodes[0].submit_ok(diarize="false")
    nodes[1].wait_status(job_id)
    out = postgres.psql(database, f"SELECT status, created_at FROM jobs WHERE id='{job_id}';"
                                  f" SELECT event FROM job_events WHERE job_id='{job_id}' ORDER BY id;").split()
    assert out[0].startswith("Completed|20") and out[0].endswith("Z")
    assert out[1:] == ["accepted", "started", "warning", "completed"]
    markers = sorted(p.name for p in (cluster.shared / "tmp" / ".nodes").iterdir())
    assert markers == ["n0", "n1", "n2"]
    assert "shared with" in nodes[2].log()


def test_the_database_password_never_reaches_a_log_or_an_error(cluster, postgres, tmp_path):
    node = cluster("quiet", "all", RUST_LOG="trace")
    node.submit_ok(diarize="false")
    node.stop()
    assert PASSWORD not in node.log()
    assert "***" in node.log()  # the URL is shown, redacted
    wrong = postgres.url(cluster.url.rsplit("/", 1)[1], password="not-the-password-42")
    env = {k: v for k, v in node.env.items()}
    env["WHISPER_DB_URL"] = wrong
    done = subprocess.run([sys.executable, str(REPO / "whisperd.py")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert "not-the-password-42" not in done.stderr and "WHISPER_DB_URL" in done.stderr.splitlines()[-1]
    bad = subprocess.run([sys.executable, str(REPO / "whisperd.py")], capture_output=True, text=True, timeout=60,
                         env={**env, "WHISPER_DB_URL": "mysql://user:hunter2@x/db"})
    assert bad.returncode == 2 and "hunter2" not in bad.stderr and "WHISPER_DB_URL" in bad.stderr


def test_a_node_that_cannot_renew_its_lease_abandons_the_job_without_a_result(cluster, postgres):
    node = cluster("cutoff", "all", FAKE_WHISPERX_SLOW_SECONDS="6")
    job_id = node.submit_ok(diarize="false", prompt="fake:slow")
    node.wait_status(job_id, ("Processing",))
    (first,) = wait_until(node.engine_runs, 10, "the engine to start")
    postgres.restart(down_seconds=5.0)  # longer than the 3 s lease: the node cannot prove the job is its own
    assert not alive(first["pid"]), "the engine of an abandoned job must be stopped"
    assert "abandon" in node.log()
    assert node.wait_status(job_id, timeout=60)["status"] == "Completed"
    (row,) = node.rows("SELECT attempts FROM jobs WHERE id=?", (job_id,))
    assert row["attempts"] == 2
    events = events_of(node, job_id)
    assert events.count("completed") == 1 and events.count("requeued") == 1, events
    assert "failed" not in events


def test_a_webhook_is_sent_once_across_the_cluster(cluster):
    from test_webhooks import LOOPBACK, Receiver

    receiver = Receiver()
    try:
        api = cluster("hookapi", "api", **LOOPBACK)
        workers = [cluster(f"hookw{i}", "worker", FAKE_WHISPERX_SLOW_SECONDS="0.3", **LOOPBACK) for i in range(2)]
        ids = [api.submit_ok(diarize="false", prompt="fake:slow", callback_url=receiver.url(f"/hook/{i}"))
               for i in range(6)]
        canceled = api.submit_ok(diarize="false", prompt="fake:slow", callback_url=receiver.url("/hook/c"))
        api.api("DELETE", f"/transcription/{canceled}")
        for job_id in ids:
            api.wait_status(job_id)
        # Each notice is recorded (webhook-delivered) after its POST was answered: once every job
        # has its record, every copy that was sent has arrived, and a second copy would have a
        # second record.
        wait_until(lambda: all("webhook-delivered" in events_of(api, job_id) for job_id in ids + [canceled]), 15,
                   "every job's notice to be recorded")
        paths = sorted(call["path"] for call in receiver.calls)
        assert paths == sorted([f"/hook/{i}" for i in range(6)] + ["/hook/c"])
        for job_id in ids + [canceled]:
            assert events_of(api, job_id).count("webhook-delivered") == 1
        assert len({row["node"] for row in api.rows("SELECT node FROM jobs WHERE id = ANY(?)", (ids,))}) >= 1
        assert all(w.proc.poll() is None for w in workers)
    finally:
        receiver.httpd.shutdown()
