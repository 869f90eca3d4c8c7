"""Storage faults and the cluster identity, in process: the ledger method and the watch's states."""

from __future__ import annotations

import asyncio
import errno

import pytest

from whisperd.errors import Kind

from whisperd import storage

gen_test = pytest.mark.gen_test(timeout=20)


@gen_test
async def test_the_cluster_identity_is_made_once_and_then_kept(service):
    first, made = await service.ledger.cluster_identity("identity-a")
    assert (first, made) == ("identity-a", True)
    again, made = await service.ledger.cluster_identity("identity-b")
    assert (again, made) == ("identity-a", False)


@gen_test
async def test_a_storage_error_trips_the_watch_until_a_probe_write_succeeds(service, monkeypatch):
    monkeypatch.setattr(storage, "PROBE_SECONDS", 0.05)
    watch = service.storage
    assert watch.healthy and service.scheduler.may_claim()
    failing = [OSError(errno.ENOSPC, "No space left on device")]
    real_probe = watch.probe_once
    monkeypatch.setattr(watch, "probe_once", lambda: failing[0] if failing else real_probe())
    refusal = service.storage_refusal(OSError(errno.EROFS, "Read-only file system"))
    assert refusal is not None and refusal.kind is Kind.UNAVAILABLE and refusal.retry_after
    assert service.storage_refusal(OSError(errno.ENOENT, "No such file")) is None  # not the storage's fault
    assert not watch.healthy and not service.scheduler.may_claim()
    assert "read-only" in service.storage_problem()
    await asyncio.sleep(0.2)
    assert watch.kind == "full" and watch.refusal().kind is Kind.STORAGE_FULL  # the probe found it full meanwhile
    failing.clear()
    for _ in range(100):
        if watch.healthy:
            break
        await asyncio.sleep(0.02)
    assert watch.healthy and service.scheduler.may_claim() and service.storage_problem() is None
