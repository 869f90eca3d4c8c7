"""Every way a job ends (tests/fast/harness.py runs the fake engine in process)."""

from __future__ import annotations

import pytest

from .harness import body_of, engine_runs, job_files, no_job_files, run_retention_after_a_jump

gen_test = pytest.mark.gen_test(timeout=30)


@gen_test
async def test_a_good_run_completes_and_keeps_the_result_until_delivery(api, service):
    job_id = await api.submit_ok()
    assert (await api.wait_status(job_id))["status"] == "Completed"
    job = await service.ledger.get(job_id)
    assert job.started_at and job.finished_at and job.attempts == 1
    assert any(job_id in path for path in job_files(service))


@pytest.mark.parametrize("mode,reason", [
    ("fail", "RuntimeError: fake engine failure"),
    ("crash", "signal"),
    ("noout", "without writing a result"),
    ("garbage", "json"),
])
@gen_test
async def test_an_engine_that_goes_wrong_fails_the_job_with_its_reason(api, service, mode, reason):
    job_id = await api.submit_ok({"prompt": f"fake:{mode}"})
    body = await api.wait_status(job_id)
    assert body["status"] == "Failed"
    assert reason.lower() in body["data"].lower()
    assert str(service.files.tmp_root) not in body["data"]  # no server path reaches the client
    assert await no_job_files(service)


@gen_test
async def test_a_failing_optional_stage_is_retried_without_it_and_warned_about(api, service, tmp_path):
    job_id = await api.submit_ok({"prompt": "fake:failstage", "language": "en"})
    body = await api.wait_status(job_id)
    runs = engine_runs(tmp_path)
    if "--no_align" in runs[0]["argv"]:  # no alignment model here: nothing optional ran, nothing failed
        assert body["status"] == "Completed" and len(runs) == 1
        return
    assert body["status"] == "Completed"
    assert any("the transcript was made again without" in w for w in body["warnings"])
    assert len(runs) == 2 and "--no_align" in runs[1]["argv"]


@pytest.mark.settings(WHISPER_JOB_TIMEOUT_SECONDS="0.5")
@gen_test
async def test_a_job_over_its_time_limit_is_stopped_and_failed(api, service):
    job_id = await api.submit_ok({"prompt": "fake:hang"})
    body = await api.wait_status(job_id)
    assert body["status"] == "Failed"
    assert "WHISPER_JOB_TIMEOUT_SECONDS (0.5 s)" in body["data"]
    assert await no_job_files(service)


@pytest.mark.settings(WHISPER_CMD="/nonexistent/whisperx")
@gen_test
async def test_an_engine_that_cannot_start_fails_the_job(api):
    job_id = await api.submit_ok()
    body = await api.wait_status(job_id)
    assert body["status"] == "Failed"
    assert "could not be started" in body["data"] or "No such file" in body["data"]


@gen_test
async def test_a_canceled_run_ends_canceled_even_when_the_engine_ignores_sigterm(api, service, tmp_path):
    job_id = await api.submit_ok({"prompt": "fake:hang"})
    await api.wait_status(job_id, ("Processing",))
    assert (await api.call("DELETE", f"/transcription/{job_id}")).code == 200
    job = await service.ledger.get(job_id)
    assert job.status == "Canceled" and job.engine_pid is None
    assert await no_job_files(service)


@gen_test
async def test_a_shutdown_requeues_the_running_job(api, service):
    job_id = await api.submit_ok({"prompt": "fake:hang"})
    await api.wait_status(job_id, ("Processing",))
    await service.scheduler.shutdown(0)
    job = await service.ledger.get(job_id)
    assert job.status == "Queued"
    assert not service.files.output_dir(job_id).exists()
    assert service.files.audio_path(job_id) is not None  # kept for the next start


@gen_test
async def test_a_job_whose_audio_vanished_fails_with_that_reason(api, service):
    service.scheduler.accepting = False  # hold the queue while the file disappears
    job_id = await api.submit_ok()
    for path in service.files.upload_dir(job_id).iterdir():
        path.unlink()
    service.scheduler.accepting = True
    service.scheduler.start()
    body = await api.wait_status(job_id)
    assert body["status"] == "Failed" and "audio is missing" in body["data"]


@pytest.mark.settings(FAKE_WHISPERX_DETECT="de")
@gen_test
async def test_auto_language_records_what_the_engine_detected(api, service):
    job_id = await api.submit_ok({"language": "auto", "model": "small", "response_format": "json"})
    await api.wait_status(job_id)
    assert (await service.ledger.get(job_id)).detected_language == "de"
    result = body_of(await api.call("GET", f"/transcription/{job_id}/result"))
    assert result["language"] == "de"


@gen_test
async def test_the_engine_gets_the_jobs_options(api, tmp_path):
    # tiny.en knows English only (issue 16 refuses another language for it at submission).
    job_id = await api.submit_ok({"language": "en", "prompt": "Hello", "device_index": "0"})
    await api.wait_status(job_id)
    argv = engine_runs(tmp_path)[0]["argv"]
    options = dict(zip(argv, argv[1:]))
    assert options["--language"] == "en" and options["--model"].endswith("tiny.en") and options["--device"] == "cpu"
    assert options["--initial_prompt"] == "Hello" and options["--device_index"] == "0"


@gen_test
async def test_a_grandchild_left_by_the_engine_is_killed_with_its_group(api, tmp_path):
    import os
    job_id = await api.submit_ok({"prompt": "fake:grandchild"})
    import asyncio
    while not engine_runs(tmp_path):  # the fake logs its run once the grandchild exists
        await asyncio.sleep(0.02)
    await api.call("DELETE", f"/transcription/{job_id}")
    pid = engine_runs(tmp_path)[0]["grandchild_pid"]
    for _ in range(100):
        try:
            os.kill(pid, 0)
            state = open(f"/proc/{pid}/stat").read().split(") ")[1][0]
            if state == "Z":
                break
        except (ProcessLookupError, FileNotFoundError):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the engine's grandchild survived the cancel")


@pytest.mark.settings(FAKE_WHISPERX_SLOW_SECONDS="3")
@gen_test
async def test_progress_is_recorded_while_the_engine_runs(api, service):
    # Progress writes are merged (at most one a second, the newest value kept): wait for a
    # value the engine reported to reach the row while the job still runs, not for every one.
    job_id = await api.submit_ok({"prompt": "fake:slow"})
    import asyncio
    while True:
        job = await service.ledger.get(job_id)
        assert not job.finished, f"no progress was recorded before the job ended: {job}"
        if job.progress is not None and job.progress > 0:
            break
        await asyncio.sleep(0.05)
    assert job.status == "Processing" and job.stage == "transcribing" and 0 < job.progress <= 100


async def _deliver(api, service, clock):
    job_id = await api.submit_ok()
    await api.wait_status(job_id)
    await api.call("GET", f"/transcription/{job_id}/result")
    return job_id


async def _cancel(api, service, clock):
    job_id = await api.submit_ok({"prompt": "fake:hang"})
    await api.wait_status(job_id, ("Processing",))
    await api.call("DELETE", f"/transcription/{job_id}")
    return job_id


async def _fail(api, service, clock):
    job_id = await api.submit_ok({"prompt": "fake:fail"})
    await api.wait_status(job_id)
    return job_id


async def _expire(api, service, clock):
    job_id = await api.submit_ok()
    await api.wait_status(job_id)
    clock.advance(days=3)
    await run_retention_after_a_jump(service)
    return job_id


async def _refuse(api, service, clock):
    assert (await api.submit({"language": "xx"})).code == 400
    return None


@pytest.mark.parametrize("reason,make", [
    ("delivered", _deliver), ("canceled", _cancel), ("failed", _fail), ("expired", _expire), ("refused", _refuse),
])
@gen_test
async def test_a_jobs_files_go_through_one_service_method_whatever_the_reason(api, service, clock, caplog,
                                                                               reason, make):
    import logging
    caplog.set_level(logging.DEBUG, logger="whisperd.service")
    job_id = await make(api, service, clock)
    assert await no_job_files(service)  # a delivery's files go just after the client has the last byte
    deleted = [r.getMessage() for r in caplog.records if "files deleted" in r.getMessage()]
    assert any(f"({reason})" in line and (job_id is None or job_id in line) for line in deleted), deleted
