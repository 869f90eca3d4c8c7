"""Retention with the clock moved: finished jobs lose their files after WHISPER_JOB_RETENTION_HOURS."""

from __future__ import annotations

import sqlite3

import pytest

from .harness import body_of, job_files, no_job_files, run_retention_after_a_jump

gen_test = pytest.mark.gen_test(timeout=30)
pytestmark = pytest.mark.settings(WHISPER_JOB_RETENTION_HOURS="48")


@gen_test
async def test_a_completed_job_is_kept_until_its_retention_ends(api, service, clock):
    job_id = await api.submit_ok()
    await api.wait_status(job_id)
    clock.advance(hours=47)
    await run_retention_after_a_jump(service)
    assert (await api.status(job_id))[0] == 200
    clock.advance(hours=2)
    await run_retention_after_a_jump(service)
    code, body = await api.status(job_id)
    assert code == 410 and "expired at" in body["error"]
    assert await no_job_files(service)
    job = await service.ledger.get(job_id)
    assert job.status == "Completed" and job.expired_at  # the row stays for audit


@gen_test
async def test_one_pass_after_a_big_clock_jump_expires_nothing_the_next_confirms_it(api, service, clock, caplog):
    job_id = await api.submit_ok()
    await api.wait_status(job_id)
    await service.run_retention()  # a pass before the jump, with the clocks agreeing
    clock.advance(hours=49)
    await service.run_retention()
    assert "wall clock jumped forward" in caplog.text
    assert (await service.ledger.get(job_id)).expired_at is None
    assert (await api.status(job_id))[0] == 200
    await service.run_retention()
    assert "jump is confirmed" in caplog.text
    assert (await service.ledger.get(job_id)).expired_at
    assert await no_job_files(service)


@gen_test
async def test_an_expired_result_is_410(api, service, clock):
    job_id = await api.submit_ok()
    await api.wait_status(job_id)
    clock.advance(hours=49)
    await run_retention_after_a_jump(service)
    response = await api.call("GET", f"/transcription/{job_id}/result")
    assert response.code == 410 and "retention period over" in body_of(response)["error"]


@gen_test
async def test_failed_jobs_expire_too(api, service, clock):
    job_id = await api.submit_ok({"prompt": "fake:fail"})
    await api.wait_status(job_id)
    clock.advance(hours=49)
    await run_retention_after_a_jump(service)
    assert (await service.ledger.get(job_id)).expired_at


@gen_test
async def test_queued_and_running_jobs_never_expire(api, service, clock):
    running = await api.submit_ok({"prompt": "fake:hang"})
    await api.wait_status(running, ("Processing",))
    queued = await api.submit_ok()
    clock.advance(days=30)
    await run_retention_after_a_jump(service)
    for job_id in (running, queued):
        job = await service.ledger.get(job_id)
        assert job.expired_at is None
    assert service.files.audio_path(queued) is not None


@gen_test
async def test_expiry_is_recorded_once(api, service, clock):
    job_id = await api.submit_ok()
    await api.wait_status(job_id)
    clock.advance(hours=49)
    await run_retention_after_a_jump(service)
    first = (await service.ledger.get(job_id)).expired_at
    assert first
    clock.advance(hours=49)
    await run_retention_after_a_jump(service)
    assert (await service.ledger.get(job_id)).expired_at == first
    with sqlite3.connect(service.config.db_path) as conn:
        events = [row[0] for row in conn.execute("SELECT event FROM job_events WHERE job_id=?", (job_id,))]
    assert events.count("expired") == 1


@gen_test
async def test_events_of_an_expired_job_say_so_and_end(api, service, clock):
    job_id = await api.submit_ok()
    await api.wait_status(job_id)
    clock.advance(hours=49)
    await run_retention_after_a_jump(service)
    response = await api.call("GET", f"/transcription/{job_id}/events")
    assert response.code == 200 and "expired at" in response.body.decode()


@gen_test
async def test_a_failing_retention_pass_is_logged_and_retried(api, service, clock, monkeypatch, caplog):
    async def broken(cutoff_iso, limit=500):
        raise RuntimeError("disk on fire")

    job_id = await api.submit_ok()
    await api.wait_status(job_id)
    clock.advance(hours=49)
    real = service.ledger.expire
    monkeypatch.setattr(service.ledger, "expire", broken)
    await service.run_retention()
    assert "retention pass failed" in caplog.text
    monkeypatch.setattr(service.ledger, "expire", real)
    await service.run_retention()
    assert (await service.ledger.get(job_id)).expired_at
