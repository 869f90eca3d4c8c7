"""The scheduler: queue order, the concurrency limit, wake-ups without polling, cancels from elsewhere."""

from __future__ import annotations

import pytest

from whisperd.ledger.sqlite import SQLiteLedger

from .harness import wait_until

gen_test = pytest.mark.gen_test(timeout=40)


@gen_test
async def test_jobs_run_one_at_a_time_in_the_order_they_came(api, service):
    ids = [await api.submit_ok({"prompt": f"job {n}"}) for n in range(4)]
    for job_id in ids:
        await api.wait_status(job_id)
    jobs = [await service.ledger.get(job_id) for job_id in ids]
    starts = [job.started_at for job in jobs]
    assert starts == sorted(starts)
    for before, after in zip(jobs, jobs[1:]):
        assert before.finished_at <= after.started_at  # never two at once


async def _processing(service, n: int) -> bool:
    return (await service.ledger.counts())["Processing"] >= n


@pytest.mark.settings(ENABLE_CONCURRENCY="true", MAX_CONCURRENT_JOBS="2", FAKE_WHISPERX_SLOW_SECONDS="1")
@gen_test
async def test_concurrency_runs_up_to_the_limit_and_no_more(api, service):
    ids = [await api.submit_ok({"prompt": "fake:slow"}) for _ in range(4)]
    most = 0

    async def all_ended() -> bool:  # watching the running count on the way
        nonlocal most
        counts = await service.ledger.counts()
        most = max(most, counts["Processing"])
        assert len(service.scheduler.running) <= 2
        return counts["Queued"] == counts["Processing"] == 0

    await wait_until(all_ended, 60, "every job to end")
    assert most == 2
    for job_id in ids:
        assert (await service.ledger.get(job_id)).status == "Completed"


@pytest.mark.settings(ENABLE_CONCURRENCY="true", MAX_CONCURRENT_JOBS="3")
@gen_test
async def test_queue_position_counts_rounds_of_the_concurrency_limit(api, service):
    for _ in range(3):
        await api.submit_ok({"prompt": "fake:hang"})
    await wait_until(lambda: _processing(service, 3), 20, "three jobs running")
    waiting = [await api.submit_ok() for _ in range(4)]
    positions = [(await api.status(job_id))[1]["queue_position"] for job_id in waiting]
    assert positions == [1, 1, 1, 2]


@gen_test
async def test_a_submission_and_an_end_wake_the_scheduler_without_its_tick(api, service):
    service.scheduler.tick_seconds = 3600.0  # only wake() can start a job now
    service.scheduler.wake()  # the loop takes its new tick once it has taken this wake-up
    await wait_until(lambda: not service.scheduler._wake.is_set(), 10, "the scheduler to take the wake-up")
    first = await api.submit_ok()
    second = await api.submit_ok()
    assert (await api.wait_status(first, timeout=10))["status"] == "Completed"
    assert (await api.wait_status(second, timeout=10))["status"] == "Completed"


@gen_test
async def test_a_cancel_asked_through_another_process_stops_the_job_here(api, service):
    job_id = await api.submit_ok({"prompt": "fake:hang"})
    await api.wait_status(job_id, ("Processing",))
    other = SQLiteLedger(service.config.db_path, "other-host:1")
    await other.open()
    try:
        outcome, _ = await other.cancel(job_id, "someone-else")
    finally:
        await other.close()
    assert outcome == "requested"
    await api.wait_status(job_id, ("Canceled",), timeout=10)  # the scheduler's tick saw the flag


@gen_test
async def test_the_scheduler_takes_no_job_after_shutdown(api, service):
    await service.scheduler.shutdown(0)
    job_id = await api.submit_ok()  # wakes the scheduler, if it still listened
    assert service.scheduler._loop_task.done()  # it does not: no pass can run, now or later
    assert (await service.ledger.get(job_id)).status == "Queued"
    assert not service.scheduler.running


@gen_test
async def test_a_scheduler_pass_that_fails_is_retried(api, service, monkeypatch):
    calls = {"n": 0}
    claim = service.ledger.claim

    async def flaky(*args, **kwargs):  # claim(max_running, policy)
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("ledger hiccup")
        return await claim(*args, **kwargs)

    monkeypatch.setattr(service.ledger, "claim", flaky)
    service.scheduler.tick_seconds = 0.05
    job_id = await api.submit_ok()
    assert (await api.wait_status(job_id))["status"] == "Completed"
    assert calls["n"] >= 2
