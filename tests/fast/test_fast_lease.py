"""Issue 24 item 3 through the runner: a job taken from this process while it was frozen (here:
claimed by another process after a dead-worker release) is not failed by this runner's time
limit when it wakes, and its files are not deleted; the new holder finishes it."""

from __future__ import annotations

import asyncio

import pytest

from whisperd.ledger import sqlite

from .harness import engine_runs

gen_test = pytest.mark.gen_test(timeout=30)


@pytest.mark.settings(WHISPER_JOB_TIMEOUT_SECONDS="2")
@gen_test
async def test_a_time_limit_reached_after_the_job_was_taken_away_writes_nothing(api, service, tmp_path):
    job_id = await api.submit_ok({"prompt": "fake:hang"})
    await api.wait_status(job_id, ("Processing",))
    # This process looked dead (frozen): its jobs were released and another process claimed this one.
    report = sqlite.release_worker(service.config.db_path, service.ledger.actor, 3, "supervisor:1")
    assert report.requeued == [job_id]
    other = sqlite.SQLiteLedger(service.config.db_path, "other-host:2")
    await other.open()
    try:
        taken = await other.claim(5)
        assert taken.id == job_id
        loop = asyncio.get_running_loop()
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
