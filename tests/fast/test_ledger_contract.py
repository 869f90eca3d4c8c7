"""The Ledger interface's promises, each checked on both backends in-process: SQLite (a file in
tmp_path) and PostgreSQL (the session's server from tests/pg.py, a database per test).

Several processes or nodes are several ledger objects on the same database, with their own
actor (host:pid) and node name, as whisperd's worker processes and cluster nodes are.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from datetime import timedelta

import pytest

from whisperd.clock import utc_now
from whisperd.jobs import NewJob, Quota, UploadRecord, now_iso
from whisperd.ledger import QuotaExceeded, TokenNameTaken, UploadUnusable, postgresql, sqlite
from whisperd.ledger.core import fair_position

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path):
    """(backend, where): a migrated, empty ledger."""
    if request.param == "sqlite":
        path = str(tmp_path / "ledger.db")
        sqlite.open_admin(path).close()
        return "sqlite", path
    url = request.getfixturevalue("postgres").new_database()
    postgresql.prepare_schema(url)
    return "postgresql", url


def make_ledger(db, actor: str = "host-a:1", node: str = "node-a", lease_seconds: float = 30.0):
    kind, where = db
    if kind == "sqlite":
        return sqlite.SQLiteLedger(where, actor, node=node)
    return postgresql.PostgreSQLLedger(where, actor, node, lease_seconds)


def run(db, body, *who):
    """Open one ledger per (actor, node[, lease_seconds]) in `who` (default one), run body(*ledgers)."""

    async def main():
        ledgers = [make_ledger(db, *w) for w in (who or [("host-a:1", "node-a")])]
        for ledger in ledgers:
            await ledger.open()
        try:
            return await body(*ledgers)
        finally:
            for ledger in ledgers:
                await ledger.close()

    return asyncio.run(main())


def prepare(db, node: str = "node-a", max_attempts: int = 3):
    kind, where = db
    if kind == "sqlite":
        return sqlite.prepare(where, max_attempts, "starter:1", node=node)
    return postgresql.prepare(where, node, max_attempts, "starter:1")


def release(db, worker: str, max_attempts: int = 3):
    kind, where = db
    if kind == "sqlite":
        return sqlite.release_worker(where, worker, max_attempts, "supervisor:1")
    return postgresql.release_worker(where, worker, max_attempts, "supervisor:1")


def known(db, ids):
    kind, where = db
    return (sqlite if kind == "sqlite" else postgresql).known_jobs(where, ids)


def new_job(owner: str = "alice", seconds: float | None = 10.0, **extra) -> NewJob:
    return NewJob(id=uuid.uuid4().hex, owner=owner, filename="a.wav", upload_bytes=123, language="en",
                  model="tiny.en", response_format="json", diarize=False, prompt="", device="cpu",
                  device_index="0", audio_seconds=seconds, **extra)


async def events_of(ledger, job_id):
    return [e["event"] for e in await ledger.events(job_id)]


# --- submit and quota -------------------------------------------------------------------------


def test_submit_inserts_a_queued_job_with_its_accepted_event(db):
    async def body(ledger):
        asked = new_job(warnings=["w1"], callback_url="http://127.0.0.1:9/x", temperature=0.2, batch_size=24)
        job = await ledger.submit(asked, "via test")
        assert (job.status, job.owner, job.attempts, job.warnings, job.temperature, job.batch_size) == (
            "Queued", "alice", 0, ["w1"], 0.2, 24)
        assert job.seq > 0 and job.created_at.endswith("Z") and job.lease is None
        again = await ledger.submit(asked)  # a retry after a lost answer: the same job, no second row
        assert again.seq == job.seq
        assert (await ledger.get(job.id)) == job
        assert await ledger.get("missing") is None
        history = await ledger.events(job.id)
        assert [(e["event"], e["actor"], e["detail"]) for e in history] == [("accepted", "alice", "via test")]
        assert await ledger.counts() == {"Queued": 1, "Processing": 0}

    run(db, body)


def test_quota_refuses_inside_the_inserting_transaction_and_writes_nothing(db):
    async def body(ledger):
        day = now_iso(utc_now() - timedelta(hours=1))
        await ledger.submit(new_job(seconds=50), quota=Quota(max_active=2))
        await ledger.submit(new_job(seconds=50), quota=Quota(max_active=2))
        with pytest.raises(QuotaExceeded) as refused:
            await ledger.submit(new_job(), quota=Quota(max_active=2))
        assert (refused.value.limit, refused.value.used) == ("max_queued", 2)
        with pytest.raises(QuotaExceeded) as refused:
            await ledger.submit(new_job(seconds=1), quota=Quota(max_audio_seconds=100, since=day))
        assert (refused.value.limit, refused.value.used) == ("max_audio_seconds", 100)
        await ledger.submit(new_job(owner="bob", seconds=1), quota=Quota(max_active=2, max_audio_seconds=100,
                                                                        since=day))
        assert (await ledger.counts())["Queued"] == 3

    run(db, body)


# --- claims, queue order, leases ---------------------------------------------------------------


def test_fifo_claims_the_oldest_job_up_to_max_running_each_under_a_fresh_lease(db):
    async def body(ledger):
        jobs = [await ledger.submit(new_job()) for _ in range(3)]
        assert [await ledger.queue_position(job) for job in jobs] == [1, 2, 3]
        first = await ledger.claim(2)
        second = await ledger.claim(2)
        assert await ledger.claim(2) is None  # two run already
        assert [first.id, second.id] == [jobs[0].id, jobs[1].id]
        assert first.status == "Processing" and first.attempts == 1 and first.worker == "host-a:1"
        assert first.lease and first.lease != second.lease
        assert await ledger.queue_position(await ledger.get(jobs[2].id)) == 1
        assert await events_of(ledger, first.id) == ["accepted", "started"]
        assert await ledger.counts() == {"Queued": 1, "Processing": 2}

    run(db, body)


def test_fair_claims_take_owners_in_turn_and_positions_say_that_order(db):
    async def body(ledger):
        for owner in ("alice", "alice", "alice", "bob", "carol", "bob"):
            await ledger.submit(new_job(owner=owner))
        queued = await ledger.list_jobs(None, "Queued", None, 100)
        positions = {job.id: await ledger.queue_position(job, "fair") for job in queued}
        taken = []
        while (job := await ledger.claim(100, "fair")) is not None:
            taken.append(job)
        assert [job.owner for job in taken] == ["alice", "bob", "carol", "alice", "bob", "alice"]
        assert [positions[job.id] for job in taken] == [1, 2, 3, 4, 5, 6]

    run(db, body)


def test_a_status_read_gets_the_job_and_its_place_in_the_order_claims_take(db):
    async def body(ledger):
        for owner in ("alice", "alice", "bob", "alice", "carol"):
            await ledger.submit(new_job(owner=owner))
        running = await ledger.claim(1)
        queued = await ledger.list_jobs(None, "Queued", None, 100)
        for policy in ("fifo", "fair"):
            for job in queued:
                read, place = await ledger.get_with_position(job.id, policy)
                assert read == job and place == await ledger.queue_position(job, policy)
        assert sorted([(await ledger.get_with_position(job.id))[1] for job in queued]) == [1, 2, 3, 4]
        assert sorted([(await ledger.get_with_position(job.id, "fair"))[1] for job in queued]) == [1, 2, 3, 4]
        assert await ledger.get_with_position(running.id) == (await ledger.get(running.id), None)
        assert await ledger.get_with_position(running.id, "fair") == (await ledger.get(running.id), None)
        assert await ledger.get_with_position(uuid.uuid4().hex) == (None, None)
        ledger.POINT_COUNT_LIMIT = 2  # a job further back than a point read counts: placed all the same
        for policy in ("fifo", "fair"):
            for job in queued:
                assert (await ledger.get_with_position(job.id, policy))[1] == await ledger.queue_position(job, policy)

    run(db, body)


def test_a_sqlite_point_read_that_meets_a_lock_is_read_on_the_readers_thread(tmp_path):
    """SQLite reads a job by its id on the IOLoop's thread and never waits there: a lock in the way
    sends the read to the reader's thread (whose busy_timeout may wait); other errors are errors."""
    path = str(tmp_path / "ledger.db")
    sqlite.open_admin(path).close()

    class Locked:
        def __init__(self, message):
            self.message = message

        def execute(self, sql, params):
            raise sqlite3.OperationalError(self.message)

        def close(self):
            pass

    async def main():
        ledger = sqlite.SQLiteLedger(path, "host-a:1")
        await ledger.open()
        try:
            job = await ledger.submit(new_job())
            assert await ledger.get_with_position(job.id) == (job, 1)
            ledger._point.close()
            ledger._point = Locked("database is locked")
            assert await ledger.get_with_position(job.id) == (job, 1)
            assert await ledger.get(job.id) == job
            ledger._point = Locked("no such table: jobs")
            with pytest.raises(sqlite3.OperationalError, match="no such table"):
                await ledger.get(job.id)
        finally:
            await ledger.close()

    asyncio.run(main())


def test_fair_position_is_a_round_robin_from_the_least_recently_served():
    owners = [("a", 3, 0, 1), ("b", 1, 0, 2), ("c", 2, 5, 0)]
    assert fair_position("a", 1, owners) == 1
    assert fair_position("b", 1, owners) == 2
    assert fair_position("c", 1, owners) == 3
    assert fair_position("a", 3, owners) == 3 + 1 + 2


# --- a runner's writes: transitions and their guards ----------------------------------------------


def test_a_runners_writes_need_its_process_and_its_lease(db):
    async def body(mine, other):
        job = await mine.submit(new_job())
        claimed = await mine.claim(1)
        for ledger, lease in ((other, claimed.lease), (mine, "not-the-lease")):
            assert not await ledger.set_engine_pid(job.id, 4242, lease)
            assert not await ledger.set_progress(job.id, 50.0, "transcribing", lease)
            assert not await ledger.add_warning(job.id, "nope", lease)
            assert not await ledger.complete(job.id, "en", lease)
            assert not await ledger.fail(job.id, "nope", lease)
            assert not await ledger.requeue(job.id, "nope", lease)
            assert not await ledger.requeue_uncounted(job.id, "nope", lease)
            assert not await ledger.mark_canceled(job.id, "nope", lease)
            assert not await ledger.holds(job.id, lease)
        untouched = await mine.get(job.id)
        assert (untouched.status, untouched.engine_pid, untouched.progress, untouched.warnings) == (
            "Processing", None, 0, [])
        assert await mine.holds(job.id, claimed.lease)
        assert await mine.set_engine_pid(job.id, 4242, claimed.lease)
        assert await mine.set_progress(job.id, 50.0, "transcribing", claimed.lease)
        assert await mine.add_warning(job.id, "a warning", claimed.lease)
        assert await mine.complete(job.id, "en", claimed.lease)
        done = await mine.get(job.id)
        assert (done.status, done.detected_language, done.progress, done.engine_pid, done.warnings) == (
            "Completed", "en", 100, None, ["a warning"])
        assert not await mine.complete(job.id, "en", claimed.lease)  # once
        assert not await mine.fail(job.id, "late", claimed.lease)
        assert await events_of(mine, job.id) == ["accepted", "started", "warning", "completed"]

    run(db, body, ("host-a:1", "node-a"), ("host-b:2", "node-b"))


def test_a_job_claimed_again_refuses_the_writes_of_its_earlier_claim(db):
    async def body(ledger):
        await ledger.submit(new_job())
        before = await ledger.claim(1)
        assert await ledger.requeue_uncounted(before.id, "shutdown", before.lease)
        assert not await ledger.fail(before.id, "time limit", before.lease)  # back in the queue: not the runner's
        assert (await ledger.get(before.id)).status == "Queued"
        after = await ledger.claim(1)
        assert after.id == before.id and after.lease != before.lease
        assert not await ledger.fail(before.id, "the frozen runner's time limit", before.lease)
        assert not await ledger.holds(before.id, before.lease)
        assert (await ledger.get(before.id)).status == "Processing"
        assert await ledger.complete(after.id, None, after.lease)

    run(db, body)


def test_requeue_counts_the_attempt_and_requeue_uncounted_gives_it_back(db):
    async def body(ledger):
        job = await ledger.submit(new_job())
        await ledger.submit(new_job())
        claimed = await ledger.claim(1)
        assert await ledger.requeue(job.id, "engine died", claimed.lease)
        back = await ledger.get(job.id)
        assert (back.status, back.attempts, back.worker, back.lease, back.started_at) == ("Queued", 1, None, None, None)
        assert await ledger.queue_position(back) == 1  # its original place
        claimed = await ledger.claim(1)
        assert claimed.id == job.id and claimed.attempts == 2
        assert await ledger.requeue_uncounted(job.id, "shutdown", claimed.lease)
        assert (await ledger.get(job.id)).attempts == 1
        assert await events_of(ledger, job.id) == ["accepted", "started", "requeued", "started", "requeued"]

    run(db, body)


def test_fail_ends_a_queued_job_or_the_callers_running_one(db):
    async def body(ledger):
        queued = await ledger.submit(new_job())
        assert await ledger.fail(queued.id, "bad audio")
        failed = await ledger.get(queued.id)
        assert (failed.status, failed.error) == ("Failed", "bad audio") and failed.finished_at
        assert not await ledger.fail(queued.id, "again")

    run(db, body)


# --- cancel, delivery, retention -------------------------------------------------------------


def test_cancel_ends_a_queued_job_and_flags_a_running_one_for_its_runner(db):
    async def body(api, runner):
        queued = await api.submit(new_job())
        running = await api.submit(new_job())
        assert (await api.cancel("missing", "alice")) == ("missing", None)
        claimed = await runner.claim(1)
        assert claimed.id == queued.id
        outcome, was = await api.cancel(running.id, "alice")
        assert outcome == "canceled" and was.status == "Queued"
        assert (await api.get(running.id)).status == "Canceled"
        outcome, was = await api.cancel(queued.id, "alice")
        assert outcome == "requested" and was.status == "Processing"
        assert (await api.cancel(queued.id, "alice"))[0] == "requested"  # flagged once
        assert await runner.cancel_requests() == [queued.id]
        assert await api.cancel_requests() == []  # another process's job
        assert await runner.mark_canceled(queued.id, "engine stopped", claimed.lease)
        assert (await api.cancel(queued.id, "alice"))[0] == "finished"
        assert await events_of(api, queued.id) == ["accepted", "started", "cancel-requested", "canceled"]

    run(db, body, ("api:1", "node-a"), ("runner:2", "node-a"))


def test_delivery_is_recorded_once_and_expiry_takes_finished_jobs_past_the_cutoff(db):
    async def body(ledger):
        job = await ledger.submit(new_job())
        claimed = await ledger.claim(1)
        assert not await ledger.mark_delivered(job.id, "alice")  # not Completed yet
        await ledger.complete(job.id, "en", claimed.lease)
        assert await ledger.mark_delivered(job.id, "alice")
        assert not await ledger.mark_delivered(job.id, "bob")
        assert (await ledger.get(job.id)).delivered_to == "alice"
        queued = await ledger.submit(new_job())
        assert await ledger.expire(now_iso(utc_now() - timedelta(hours=1))) == []
        assert await ledger.expire(now_iso(utc_now() + timedelta(seconds=5)), limit=10) == [job.id]
        assert (await ledger.get(job.id)).expired_at
        assert (await ledger.get(queued.id)).expired_at is None  # never finished: never expires
        assert await ledger.expire(now_iso(utc_now() + timedelta(seconds=5))) == []
        assert (await events_of(ledger, job.id))[-2:] == ["delivered", "expired"]

    run(db, body)


def test_in_a_cluster_the_database_clock_decides_what_retention_expires(db):
    """Issue 24 item 4: a node whose clock runs 48 h ahead expires nothing finished a moment ago."""
    from whisperd.retention import expire_old_jobs

    async def body(ledger):
        job = await ledger.submit(new_job())
        claimed = await ledger.claim(1)
        await ledger.complete(job.id, "en", claimed.lease)
        deleted = []
        fast_clock = utc_now() + timedelta(hours=48)
        expired = await expire_old_jobs(ledger, lambda job_id, why: deleted.append(job_id), 24, fast_clock)
        return expired, deleted

    expired, deleted = run(db, body)
    if db[0] == "postgresql":
        assert expired == [] and deleted == []
    else:  # one box: its clock is the only clock there is (retention.py guards its jumps)
        assert len(expired) == 1 and deleted == expired


# --- tokens -------------------------------------------------------------------------------------


def test_tokens_rows_names_limits_and_revocation(db):
    async def body(ledger):
        created = await ledger.insert_token("ci", "pfx1", "scrypt", "salt", "hash", False, None,
                                            {"max_queued": 3, "max_audio_minutes_per_day": 1.5})
        assert created.endswith("Z")
        with pytest.raises(TokenNameTaken):
            await ledger.insert_token("ci", "pfx2", "scrypt", "salt", "hash", False, None)
        await ledger.insert_token("admin", "pfx3", "scrypt", "salt", "hash", True, None)
        token = await ledger.token_by_prefix("pfx1")
        assert (token.name, token.admin, token.max_queued, token.max_audio_minutes_per_day) == ("ci", False, 3, 1.5)
        assert await ledger.token_by_prefix("nope") is None
        assert await ledger.live_token_count() == 2
        await ledger.touch_token(token.id)
        assert (await ledger.token_by_prefix("pfx1")).last_used_at
        assert await ledger.update_token_limits("ci", {"max_queued": None, "max_file_size": 1000})
        updated = await ledger.token_by_prefix("pfx1")
        assert (updated.max_queued, updated.max_file_size) == (None, 1000)
        assert await ledger.update_token_limits("ci", {})
        assert not await ledger.update_token_limits("nobody", {"max_queued": 1})
        with pytest.raises(ValueError):
            await ledger.update_token_limits("ci", {"max_everything": 1})
        assert await ledger.revoke_token("ci")
        assert not await ledger.revoke_token("ci")
        assert await ledger.live_token_count() == 1
        await ledger.insert_token("ci", "pfx4", "scrypt", "salt", "hash", False, None)  # the name is free again
        assert [t.name for t in await ledger.list_tokens()] == ["admin", "ci", "ci"]

    run(db, body)


# --- resumable uploads ---------------------------------------------------------------------------


def _upload(owner: str = "alice", length: int = 10, hours: float = 1.0) -> UploadRecord:
    now = utc_now()
    return UploadRecord(id=uuid.uuid4().hex, owner=owner, upload_length=length, upload_offset=0, filename="a.wav",
                        metadata="", created_at=now_iso(now), updated_at=now_iso(now),
                        expires_at=now_iso(now + timedelta(hours=hours)))


def test_uploads_advance_by_offset_and_are_used_once(db):
    async def body(ledger):
        upload = _upload()
        await ledger.create_upload(upload)
        assert (await ledger.get_upload(upload.id)).upload_offset == 0
        assert await ledger.advance_upload(upload.id, 0, 4)
        assert not await ledger.advance_upload(upload.id, 0, 6)  # another PATCH won
        assert not await ledger.use_upload(upload.id, "job-1")  # not finished
        assert await ledger.advance_upload(upload.id, 4, 10)
        assert (await ledger.get_upload(upload.id)).finished_at
        assert await ledger.use_upload(upload.id, "job-1")
        assert not await ledger.use_upload(upload.id, "job-2")
        assert not await ledger.delete_upload(upload.id)  # used: only expiry removes it
        other = _upload()
        await ledger.create_upload(other)
        assert await ledger.delete_upload(other.id)
        assert await ledger.get_upload(other.id) is None
        stale = _upload(hours=-1)
        await ledger.create_upload(stale)
        assert await ledger.expire_uploads(now_iso()) == [stale.id]

    run(db, body)


def test_one_patch_claims_an_upload_at_a_time_and_part_numbers_are_never_given_twice(db):
    """Issue 29: any node may take a PATCH; the ledger decides which one writes, and hands out the
    S3 part numbers; the offset update lets go of the claim and records the store's record."""

    async def body(ledger):
        upload = _upload()
        await ledger.create_upload(upload)
        soon, later = now_iso(utc_now() + timedelta(seconds=20)), now_iso(utc_now() + timedelta(seconds=40))
        assert await ledger.claim_upload(upload.id, "first", soon) is None
        assert await ledger.claim_upload(upload.id, "second", soon) == soon  # held: until when
        assert await ledger.renew_upload_claim(upload.id, "first", later)
        assert not await ledger.renew_upload_claim(upload.id, "second", later)
        assert await ledger.claim_upload(upload.id, "second", soon) == later
        assert await ledger.reserve_upload_parts(upload.id, 3, 10_000) == 1
        assert await ledger.reserve_upload_parts(upload.id, 2, 10_000) == 4
        assert await ledger.reserve_upload_parts(upload.id, 9_996, 10_000) is None  # past S3's last number
        expires = now_iso(utc_now() + timedelta(hours=5))
        assert await ledger.advance_upload(upload.id, 0, 4, stored='{"tail": "t1"}', claim="first", expires_at=expires)
        row = await ledger.get_upload(upload.id)
        assert (row.upload_offset, row.stored, row.next_part, row.expires_at) == (4, '{"tail": "t1"}', 6, expires)
        assert await ledger.claim_upload(upload.id, "second", soon) is None  # the offset update let go
        assert await ledger.advance_upload(upload.id, 4, 4, claim="first")  # not its claim: kept
        assert await ledger.claim_upload(upload.id, "third", soon) == soon
        await ledger.release_upload_claim(upload.id, "second")
        assert (await ledger.get_upload(upload.id)).stored == '{"tail": "t1"}'  # None keeps it
        lapsed = _upload()
        await ledger.create_upload(lapsed)
        assert await ledger.claim_upload(lapsed.id, "dead node", now_iso(utc_now() - timedelta(seconds=1))) is None
        assert await ledger.claim_upload(lapsed.id, "living node", soon) is None  # a lapsed claim is taken over

    run(db, body)


def test_an_upload_becomes_a_job_in_the_jobs_own_transaction(db):
    """Issue 24 item 7: until the job's row commits, the upload stays whole and usable."""

    async def body(ledger):
        unfinished = _upload()
        await ledger.create_upload(unfinished)
        refused = new_job()
        with pytest.raises(UploadUnusable):
            await ledger.submit(refused, upload_id=unfinished.id)
        assert await ledger.get(refused.id) is None  # no job without its upload
        over = _upload()
        await ledger.create_upload(over)
        await ledger.advance_upload(over.id, 0, 10)
        await ledger.submit(new_job(), quota=Quota(max_active=5))
        with pytest.raises(QuotaExceeded):
            await ledger.submit(new_job(), quota=Quota(max_active=1), upload_id=over.id)
        assert (await ledger.get_upload(over.id)).job_id is None  # a refused submission used nothing
        job = await ledger.submit(new_job(), upload_id=over.id)
        assert (await ledger.get_upload(over.id)).job_id == job.id
        with pytest.raises(UploadUnusable):
            await ledger.submit(new_job(), upload_id=over.id)

    run(db, body)


# --- start-up, dead workers, leases -------------------------------------------------------------


def test_a_restart_takes_back_its_running_jobs_poisons_repeaters_and_keeps_cancels(db):
    async def body(ledger):
        ids = [(await ledger.submit(new_job(callback_url="http://127.0.0.1:9/h" if n == 3 else None))).id
               for n in range(4)]
        again = await ledger.claim(10)
        for _ in range(2):  # the second job has used up its attempts
            poison = await ledger.claim(10)
            await ledger.requeue(poison.id, "engine died", poison.lease)
        poison = await ledger.claim(10)
        canceled = await ledger.claim(10)
        await ledger.cancel(canceled.id, "alice")
        await ledger.set_engine_pid(again.id, 999, again.lease)
        finished = await ledger.claim(10)
        await ledger.complete(finished.id, "en", finished.lease)
        return ids, again.id, poison.id, canceled.id

    ids, again, poison, canceled = run(db, body)
    report = prepare(db, max_attempts=3)
    assert report.requeued == [again] and report.poisoned == [poison] and report.canceled == [canceled]
    assert report.engine_pids == {again: 999}
    assert report.webhooks_pending == [ids[3]] and report.job_rows == 4
    assert report.live_jobs == {again, ids[3]}
    assert known(db, ids + ["never-seen"]) == set(ids)

    async def after(ledger):
        return [(await ledger.get(job_id)).status for job_id in (again, poison, canceled)], \
            await ledger.claim_pending_webhooks(), await ledger.claim_pending_webhooks()

    statuses, pending, none_left = run(db, after)
    assert statuses == ["Queued", "Failed", "Canceled"]
    assert [job.id for job in pending] == [ids[3]] and none_left == []


def test_a_dead_worker_process_releases_only_its_own_jobs(db):
    async def body(dead, alive):
        await dead.submit(new_job())
        await dead.submit(new_job())
        return (await dead.claim(5)).id, (await alive.claim(5)).id

    lost, kept = run(db, body, ("host-a:1", "node-a"), ("host-a:2", "node-a"))
    report = release(db, "host-a:1")
    assert report.requeued == [lost]

    async def after(ledger):
        return (await ledger.get(lost)).status, (await ledger.get(kept)).status

    assert run(db, after) == ("Queued", "Processing")


def test_heartbeats_renew_leases_and_expired_leases_are_taken_back_on_a_shared_ledger(db):
    async def body(frozen, alive):
        await alive.heartbeat("all", now_iso(), [])
        job = await frozen.submit(new_job())
        claimed = await frozen.claim(1)
        assert await alive.heartbeat("all", now_iso(), [job.id]) == ([job.id] if alive.shared else [])
        taken = await alive.take_back_expired(3)
        lost = await frozen.heartbeat("all", now_iso(), [job.id])
        late = await frozen.complete(job.id, "en", claimed.lease)
        names = [node["name"] for node in await alive.nodes()]
        counts, nodes = await alive.counts_and_nodes()  # an admin's /status reads both at once
        assert counts == await alive.counts() and [node["name"] for node in nodes] == names
        assert nodes and set(nodes[0]) >= {"name", "role", "last_seen", "seconds_since_seen", "running_jobs"}
        return job.id, taken, lost, late, names, (await alive.get(job.id)).status

    # The frozen node's lease is over as soon as it is taken (a lease of -1 s).
    job_id, taken, lost, late, names, status = run(db, body, ("frozen:1", "node-f", -1.0), ("alive:2", "node-b"))
    if db[0] == "postgresql":
        assert taken.requeued == [job_id] and lost == [job_id] and late is False and status == "Queued"
        assert names == ["node-b", "node-f"]
    else:  # one box takes back by process (at start and release_worker), never by lease
        assert taken.requeued == [] and lost == [] and late is True and status == "Completed"
        assert names == ["node-b", "node-f"]


# --- reads: lists, usage, counts, events ------------------------------------------------------


def test_lists_usage_and_counts(db):
    async def body(ledger):
        day = now_iso(utc_now() - timedelta(hours=1))
        a1 = await ledger.submit(new_job("alice", 10))
        a2 = await ledger.submit(new_job("alice", 5))
        b1 = await ledger.submit(new_job("bob", 7))
        never_ran = await ledger.submit(new_job("bob", 100))
        await ledger.cancel(never_ran.id, "bob")
        claimed = await ledger.claim(1)
        await ledger.fail(claimed.id, "bad", claimed.lease)
        await ledger.add_event(b1.id, "webhook-delivered", "HTTP 200")
        assert [j.id for j in await ledger.list_jobs(None, None, None, 10)] == [never_ran.id, b1.id, a2.id, a1.id]
        assert [j.id for j in await ledger.list_jobs("alice", None, None, 10)] == [a2.id, a1.id]
        assert [j.id for j in await ledger.list_jobs(None, "Queued", None, 10)] == [b1.id, a2.id]
        assert [j.id for j in await ledger.list_jobs(None, None, b1.seq, 1)] == [a2.id]
        usage = await ledger.usage(None, day, day)
        assert usage == {
            "alice": {"active": 1, "jobs_today": 2, "seconds_today": 15.0, "jobs_window": 2, "seconds_window": 15.0},
            "bob": {"active": 1, "jobs_today": 1, "seconds_today": 7.0, "jobs_window": 1, "seconds_window": 7.0},
        }
        assert list(await ledger.usage("bob", day, day)) == ["bob"]
        assert await ledger.status_counts() == {"Queued": 2, "Processing": 0, "Completed": 0, "Failed": 1,
                                                "Canceled": 1}
        history = await ledger.events(b1.id)
        assert [(e["event"], e["detail"]) for e in history] == [("accepted", None), ("webhook-delivered", "HTTP 200")]
        await ledger.check_writable()
        assert len(await ledger.checkpoint()) == 3

    run(db, body)
