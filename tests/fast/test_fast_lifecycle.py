"""One life cycle: Service.start starts the parts in order, Service.stop stops them in reverse,
and shutdown waits for the last answer by being told, not by polling."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

RUNS_JOBS = ["ledger", "node", "requests", "webhooks", "waiters", "storage", "engine", "live", "notifications", "scheduler", "timers"]


@pytest.mark.gen_test
async def test_the_parts_start_in_order_and_an_api_node_runs_no_engine(service, monkeypatch):
    assert [part.name for part in service.parts()] == RUNS_JOBS
    monkeypatch.setattr(service, "config", dataclasses.replace(service.config, WHISPER_NODE_ROLE="api"))
    assert [part.name for part in service.parts()] == [n for n in RUNS_JOBS if n not in ("engine", "live", "scheduler")]


@pytest.mark.gen_test
async def test_wait_requests_returns_when_the_last_answer_is_out(service):
    service.request_began()
    service.request_began()
    loop = asyncio.get_running_loop()
    loop.call_soon(service.request_ended)
    loop.call_later(0.05, service.request_ended)
    start = loop.time()
    assert await service.wait_requests(30) == 0
    assert loop.time() - start < 5  # woken by the end itself, not by a 30 s wait
    service.request_began()
    assert await service.wait_requests(0.01) == 1  # still open: the caller is told how many
    service.request_ended()


@pytest.mark.gen_test(timeout=60)
async def test_stop_goes_through_the_parts_in_reverse_once(service):
    stopped = []
    for part in service._started:
        inner = part.stop

        def record(name=part.name, inner=inner):
            stopped.append(name)
            return inner() if inner is not None else None

        part.stop = record
    closed = []

    async def close_http() -> None:
        closed.append(stopped[-1])

    await service.stop(0, 0, close_http)
    assert service.draining
    assert stopped == list(reversed(RUNS_JOBS))
    assert closed == ["requests"]  # the HTTP server closes after the work stopped, before the ledger
    await service.stop(0)  # a second stop (the fixture's) finds nothing left to stop
    assert stopped == list(reversed(RUNS_JOBS))
