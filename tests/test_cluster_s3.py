"""A shared-nothing cluster (issue 29): nodes share a PostgreSQL ledger and an S3 bucket, and no
directory (each node its own scratch). Work spreads, each job runs once, results come from any
node, a killed node loses nothing, the store restarted under load loses nothing, and nothing is
left in the store once the results are delivered."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import wait_until
from harness import OutageFeeder
from seaweed import prefix_of


@pytest.fixture
def s3_cluster(make_server, postgres, seaweed):
    """make_node(name, role, **env): a node on this test's database and prefix, with its own directories."""
    url = postgres.new_database()
    storage = seaweed.storage_env()

    def make_node(name: str, role: str = "all", start: bool = True, **env):
        env = {"WHISPER_DB_URL": url, "WHISPER_NODE_NAME": name, "WHISPER_NODE_ROLE": role,
               "WHISPER_LEASE_SECONDS": "3", **storage, **env}
        return make_server(start=start, **env)

    make_node.prefix = prefix_of(storage) + "jobs/"  # the jobs' objects (the cluster's mark is beside them)
    make_node.store = seaweed
    return make_node


def events_of(server, job_id) -> list[str]:
    return [r["event"] for r in server.rows("SELECT event FROM job_events WHERE job_id=? ORDER BY id", (job_id,))]


def ran(nodes) -> list[str]:
    return [run["argv"][1].split("/")[-2] for node in nodes for run in node.engine_runs()]


def nothing_left(cluster, nodes, timeout: float = 15.0) -> None:
    wait_until(lambda: not cluster.store.keys(cluster.prefix) and not any(n.job_files(stored=False) for n in nodes),
               timeout, "every object and every scratch copy to go")


def test_three_nodes_sharing_only_the_ledger_and_the_store(s3_cluster):
    both = s3_cluster("alpha", "all", FAKE_WHISPERX_SLOW_SECONDS="1")
    api = s3_cluster("bravo", "api")
    worker = s3_cluster("charlie", "worker", FAKE_WHISPERX_SLOW_SECONDS="1")
    assert len({n.env["WHISPER_TMP_FILES"] for n in (both, api, worker)}) == 3  # no shared directory
    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda _: api.submit_ok(diarize="false", prompt="fake:slow"), range(12)))
    for job_id in ids:
        assert api.wait_status(job_id, timeout=60)["status"] == "Completed"
    nodes = {row["id"]: row["node"] for row in api.rows("SELECT id, node FROM jobs")}
    assert set(nodes.values()) == {"alpha", "charlie"}, nodes  # the api node accepted them, ran nothing
    assert sorted(ran([both, api, worker])) == sorted(ids)  # each job once, on one node
    for job_id in ids:
        assert events_of(api, job_id).count("completed") == 1
    for i, job_id in enumerate(ids):  # any node that answers the API reads any result from the store
        assert (both, api)[i % 2].api("GET", f"/transcription/{job_id}/result").status_code == 200
    nothing_left(s3_cluster, [both, api, worker])


def test_a_node_killed_mid_run_loses_nothing_and_runs_nothing_twice(s3_cluster):
    doomed = s3_cluster("doomed", "all", FAKE_WHISPERX_SLOW_SECONDS="30")
    job_id = doomed.submit_ok(diarize="false", prompt="fake:slow")
    wait_until(lambda: doomed.engine_runs(), 15, "the engine to start on the doomed node")
    doomed.kill9()
    survivor = s3_cluster("survivor", "all", FAKE_WHISPERX_SLOW_SECONDS="0.3")
    assert survivor.wait_status(job_id, timeout=60)["status"] == "Completed"
    assert events_of(survivor, job_id).count("completed") == 1
    assert survivor.api("GET", f"/transcription/{job_id}/result").status_code == 200
    nothing_left(s3_cluster, [survivor])


def test_a_node_killed_mid_upload_leaves_nothing_once_it_restarts(s3_cluster):
    node = s3_cluster("uploader", "all", WHISPERD_CRASH_AT="upload-committed")
    other = s3_cluster("bystander", "all")
    with pytest.raises(requests.RequestException):
        node.submit(diarize="false", timeout=10)
    node.proc.wait(10)
    node._log_handle.close()
    stored = s3_cluster.store.keys(s3_cluster.prefix)
    assert any(key.endswith("/upload/.node-uploader") for key in stored), stored  # its upload, orphaned
    other.stop()
    other.start()  # another node's start keeps what may be an upload being published (too young)
    assert s3_cluster.store.keys(s3_cluster.prefix) == stored
    del node.env["WHISPERD_CRASH_AT"]
    node.start()  # its own start knows its last life is dead
    assert s3_cluster.store.keys(s3_cluster.prefix) == []
    assert s3_cluster.store.multipart_uploads(s3_cluster.prefix) == []


def test_a_node_killed_mid_delivery_delivers_again(s3_cluster):
    node = s3_cluster("deliverer", "all")
    job_id = node.submit_ok(diarize="false")
    assert node.wait_status(job_id)["status"] == "Completed"
    node.stop()
    node.env["WHISPERD_CRASH_AT"] = "result-sent"
    node.start()
    node.api("GET", f"/transcription/{job_id}/result")  # the whole answer, then the node dies
    node.proc.wait(10)
    node._log_handle.close()
    del node.env["WHISPERD_CRASH_AT"]
    node.start()
    assert node.api("GET", f"/transcription/{job_id}/result").status_code == 200
    nothing_left(s3_cluster, [node])


def test_the_store_restarted_under_load_loses_nothing(s3_cluster):
    env = {"FAKE_WHISPERX_SLOW_SECONDS": "0.3", "WHISPER_LEASE_SECONDS": "20"}
    one = s3_cluster("one", "all", ENABLE_CONCURRENCY="true", MAX_CONCURRENT_JOBS="2", **env)
    two = s3_cluster("two", "worker", ENABLE_CONCURRENCY="true", MAX_CONCURRENT_JOBS="2", **env)
    ids = [one.submit_ok(diarize="false", prompt="fake:slow") for _ in range(8)]
    with OutageFeeder(one, 8) as feeder:
        s3_cluster.store.stop()
        time.sleep(1.0)  # the outage itself: a second with no store at all
        s3_cluster.store.start()
    for status, text, headers in feeder.refused:  # refused in words while the store is away is acceptable
        assert status in (None, 503) and (status is None or headers.get("Retry-After")), text
    ids += feeder.accepted  # a lost job is not acceptable
    for job_id in ids:
        assert one.wait_status(job_id, timeout=90)["status"] == "Completed", job_id
    for job_id in ids:
        assert events_of(one, job_id).count("completed") == 1
    for job_id in ids:
        assert one.api("GET", f"/transcription/{job_id}/result").status_code == 200
    assert one.proc.poll() is None and two.proc.poll() is None
    nothing_left(s3_cluster, [one, two], timeout=30)
    assert not set(ran([one, two])) - set(ids)  # nothing ran that was not accepted


def test_a_claimed_job_whose_audio_cannot_be_fetched_goes_back_uncounted(s3_cluster):
    front = s3_cluster("front", "api")
    worker = s3_cluster("fetcher", "worker", WHISPER_LEASE_SECONDS="20")
    os.killpg(worker.proc.pid, signal.SIGSTOP)  # it claims nothing until the store is gone
    try:
        job_id = front.submit_ok(diarize="false")  # published while the store is up
        s3_cluster.store.stop()
    finally:
        os.killpg(worker.proc.pid, signal.SIGCONT)
    # The worker, healthy as far as it knows, claims the job; the fetch fails: back to the queue.
    wait_until(lambda: "requeued" in events_of(front, job_id), 30, "the job to go back to the queue")
    (row,) = front.rows("SELECT status, attempts FROM jobs")
    assert row["status"] == "Queued" and row["attempts"] == 0, dict(row)  # no attempt burnt
    health = worker.api("GET", "/health")
    assert health.status_code == 503 and "object store" in health.json()["checks"]["storage"]
    assert "the job storage failed" in worker.log() and "object store" in worker.log()
    assert worker.engine_runs() == []
    s3_cluster.store.start()
    assert front.wait_status(job_id, timeout=60)["status"] == "Completed"
    assert events_of(front, job_id).count("completed") == 1
    assert front.api("GET", f"/transcription/{job_id}/result").status_code == 200
    nothing_left(s3_cluster, [front, worker])
