"""Issue 24 item 3 through the runner, on both backends: a job taken from this process while it
was frozen (here: released as a dead worker's and claimed by another process or node) is not
failed by this runner's time limit when it wakes, and its files are not deleted; the new holder
finishes it."""

from __future__ import annotations

import asyncio

import pytest

from whisperd.ledger import postgresql, sqlite

from .harness import engine_runs

gen_test = pytest.mark.gen_test(timeout=30)


@pytest.fixture(params=("sqlite", "postgresql"))
def fast_env(fast_env, request):
    """The harness's configuration, on SQLite or on a PostgreSQL database of its own."""
    if request.param == "postgresql":
        fast_env["WHISPER_DB_URL"] = request.getfixturevalue("postgres").new_database()
    return fast_env


@pytest.mark.settings(WHISPER_JOB_TIMEOUT_SECONDS="2")
@gen_test
async def test_a_time_limit_reached_after_the_job_was_taken_away_writes_nothing(api, service, tmp_path):
    job_id = await api.submit_ok({"prompt": "fake:hang"})
    await api.wait_status(job_id, ("Processing",))
    # This process looked dead (frozen): its jobs were released and another process claimed this one.
    url = service.config.WHISPER_DB_URL
    if url:
        def release():
            return postgresql.release_worker(url, service.ledger.actor, 3, "supervisor:1")
        other = postgresql.PostgreSQLLedger(url, "other-host:2", "node-b")
    else:
        def release():
            return sqlite.release_worker(service.config.db_path, service.ledger.actor, 3, "supervisor:1")
        other = sqlite.SQLiteLedger(service.config.db_path, "other-host:2")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    # PostgreSQL's take-back skips a row locked by a write under way (its progress): ask again.
    while (report := release()).requeued != [job_id]:
        assert loop.time() < deadline and report.requeued == [], report
        await asyncio.sleep(0.05)
    await other.open()
    try:
        taken = await other.claim(5)
        assert taken.id == job_id
        deadline = loop.time() + 15
        while job_id in service.scheduler.running:  # the engine hangs until the time limit stops it
            assert loop.time() < deadline, "the runner never ended"
            await asyncio.sleep(0.05)
        assert any(run.get("argv") for run in engine_runs(service.files.tmp_root.parent))
        job = await service.ledger.get(job_id)
        assert (job.status, job.worker, job.error) == ("Processing", "other-host:2", None)
        assert service.files.audio_path(job_id) is not None  # the new holder's input is still there
        events = [e["event"] for e in await service.ledger.events(job_id)]
        assert "failed" not in events
        assert await other.complete(job_id, "en", taken.lease)
    finally:
        await other.close()


@pytest.mark.settings(WHISPER_JOB_TIMEOUT_SECONDS="2")
@gen_test
async def test_a_time_limit_reached_after_the_job_went_back_to_the_queue_fails_nothing(api, service):
    """The frozen node's job was taken back to the queue and nobody has claimed it yet: it is not
    this runner's to fail (PostgreSQL's fail() used to match any Queued row)."""
    job_id = await api.submit_ok({"prompt": "fake:hang"})
    await api.wait_status(job_id, ("Processing",))
    first = service.scheduler.running[job_id]
    url = service.config.WHISPER_DB_URL
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:  # PostgreSQL's take-back skips a row locked by a write under way (its progress): ask again
        if url:
            report = postgresql.release_worker(url, service.ledger.actor, 3, "supervisor:1")
        else:
            report = sqlite.release_worker(service.config.db_path, service.ledger.actor, 3, "supervisor:1")
        if report.requeued == [job_id]:
            break
        assert loop.time() < deadline and report.requeued == [], report
        await asyncio.sleep(0.05)
    deadline = loop.time() + 15
    while service.scheduler.running.get(job_id) is first:  # until the time limit ends the first run
        assert loop.time() < deadline, "the runner never ended"
        await asyncio.sleep(0.05)
    events = [e["event"] for e in await service.ledger.events(job_id)]
    assert "requeued" in events and "failed" not in events
    assert service.files.audio_path(job_id) is not None  # still there for its next run
