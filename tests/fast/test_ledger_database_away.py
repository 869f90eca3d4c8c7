"""Issue 24 item 2 (ledger part), on a real PostgreSQL: no connection slot left ("too many
clients", SQLSTATE class 53) and an administrator's shutdown of a connection (57P01) are the
database being away, as a broken connection is: LedgerUnavailable, transient, retried; never a
raw driver error that a handler would answer 500 and a runner would fail a job for."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace

import asyncpg
import pytest

from whisperd.jobs import NewJob
from whisperd.ledger import LedgerUnavailable, postgresql


@pytest.fixture
def limited(postgres):
    """A migrated database and the URL of a role that is not a superuser (connection limits
    apply to it), with the role's name."""
    url = postgres.new_database()
    postgresql.prepare_schema(url)
    database = url.rsplit("/", 1)[1]
    role = "lim_" + uuid.uuid4().hex[:10]
    postgres.psql(database, f"CREATE ROLE {role} LOGIN PASSWORD 'limited-pw';"
                            f" GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};"
                            f" GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role};")
    url = postgres.url(database, password="limited-pw").replace(postgres.user + ":", role + ":", 1)
    return SimpleNamespace(url=url, role=role, database=database, server=postgres)


def _job() -> NewJob:
    return NewJob(id=uuid.uuid4().hex, owner="alice", filename="a.wav", upload_bytes=1, language="en",
                  model="tiny.en", response_format="json", diarize=False, prompt="", device="cpu", device_index="0")


def test_no_connection_slot_left_is_the_database_away_not_an_error(limited):
    async def body():
        ledger = postgresql.PostgreSQLLedger(limited.url, "host:1", "node-a")
        await ledger.open()
        try:
            job = await ledger.submit(_job())
            # No slot left for this role, and its connections dropped by an administrator (57P01):
            # the pool must open new ones and is refused with SQLSTATE 53300.
            limited.server.psql(limited.database, f"ALTER ROLE {limited.role} CONNECTION LIMIT 0;"
                                                  f" SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                                  f" WHERE usename = '{limited.role}'")
            with pytest.raises(LedgerUnavailable) as away:
                await ledger.check_writable()  # tried once (no retry), like the heartbeat
            assert away.value.transient
            with pytest.raises(LedgerUnavailable):
                await ledger.heartbeat("all", "2026-01-01T00:00:00.000Z", [job.id])
            # Slots again: the same ledger goes on, nothing lost.
            limited.server.psql(limited.database, f"ALTER ROLE {limited.role} CONNECTION LIMIT -1")
            await ledger.check_writable()
            assert (await ledger.get(job.id)).status == "Queued"
        finally:
            await ledger.close()

    asyncio.run(body())


def test_the_errors_that_mean_away_are_told_by_their_sqlstate(limited):
    async def refused():
        held = await asyncpg.connect(limited.url)
        try:
            limited.server.psql(limited.database, f"ALTER ROLE {limited.role} CONNECTION LIMIT 1")
            try:
                await asyncpg.connect(limited.url)
            except Exception as exc:  # the real error the server sends
                return exc
            return None
        finally:
            await held.close()

    error = asyncio.run(refused())
    assert error is not None and error.sqlstate == "53300"
    assert postgresql.database_away(error)
    for state, away in (("08006", True), ("53300", True), ("57P01", True), ("57P03", True), ("57014", False),
                        ("23505", False), ("42P01", False)):
        assert postgresql.database_away(SimpleNamespace(sqlstate=state)) is away, state


def test_each_process_pool_is_sized_from_the_nodes_worker_processes():
    assert [postgresql.pool_size(n) for n in (1, 2, 3, 4, 8, 16)] == [4, 4, 2, 2, 2, 2]
    config = SimpleNamespace(WHISPER_DB_URL="postgresql://u@127.0.0.1:1/d", node_name="n", WHISPER_LEASE_SECONDS=30.0,
                             worker_processes=4)
    assert postgresql.Backend(config).ledger("host:1").pool_size == 2
