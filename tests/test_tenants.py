"""Tenants through real HTTP: each token lists its own jobs, has limits and a fair share, sees its usage."""

from __future__ import annotations

import asyncio
import random
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
import requests

from conftest import Server, make_wav, wait_until
from whisperd.identity.tokens import RECHECK_SECONDS
from whisperd.jobs import NewJob
from whisperd.ledger.sqlite import SQLiteLedger, open_admin


@pytest.fixture
def secure(make_server):
    """A server that checks the ledger's tokens (the harness default is the spec's any-token)."""

    def factory(start: bool = True, **env) -> Server:
        env.setdefault("WHISPER_API_ALLOW_ANY_TOKEN", "false")
        return make_server(start=start, **env)

    return factory


def run_order(server: Server, job_ids: list[str]) -> list[str]:
    """The job ids in the order the fake engine was started for them (its run log)."""
    order = []
    for run in server.engine_runs():
        argv = " ".join(run["argv"])
        order += [job_id for job_id in job_ids if job_id in argv and job_id not in order]
    return order


def wait_rows(server: Server, sql: str, wanted, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = server.rows(sql)
        if rows and rows[0][0] == wanted:
            return
        time.sleep(0.1)
    raise AssertionError(f"{sql} never gave {wanted}\n{server.log()[-3000:]}")


# -- fair share -------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["fair", "fifo"])
def test_one_tokens_backlog_does_not_starve_anothers_single_job(secure, policy):
    # A's first job runs until it is canceled, so that A's other seven and B's one all wait
    # behind it however slowly this machine takes the uploads.
    server = secure(WHISPER_SCHEDULING=policy, FAKE_WHISPERX_SLOW_SECONDS="120")
    token_a, token_b = server.create_token("tenant-a"), server.create_token("tenant-b")
    a_jobs = [server.submit_ok(token=token_a, prompt="fake:slow")]
    # Its engine has started (logged its run), not just been claimed: a cancel before that
    # would leave no run to see in the order below.
    wait_until(lambda: run_order(server, a_jobs) == a_jobs, 60, "the first job's engine to start")
    a_jobs += [server.submit_ok(token=token_a) for _ in range(7)]
    b_job = server.submit_ok(token=token_b)

    # queue_position tells B where it stands under the active policy.
    position_b = server.status(b_job, token_b).json()["queue_position"]
    positions_a = [server.status(job, token_a).json()["queue_position"] for job in a_jobs[1:]]
    if policy == "fair":
        assert position_b == 1
        assert positions_a == [2, 3, 4, 5, 6, 7, 8]
    else:
        assert position_b == 8
        assert positions_a == [1, 2, 3, 4, 5, 6, 7]
    assert server.api("DELETE", f"/transcription/{a_jobs[0]}", token=token_a).status_code == 200

    assert server.wait_drained(90), server.log()[-3000:]
    order = run_order(server, a_jobs + [b_job])
    assert len(order) == 9 and order[0] == a_jobs[0]
    a_before_b = order.index(b_job)
    if policy == "fair":
        assert a_before_b <= 2, order
    else:
        assert a_before_b == 8, order
    # A's own jobs keep their order under either policy.
    assert [job for job in order if job != b_job] == a_jobs


@pytest.mark.parametrize("seed", range(6))
def test_fair_positions_match_the_order_the_claim_takes(tmp_path, seed):
    """Whatever the mix, queue_position under fair names the order fair claims really follow."""
    chooser = random.Random(seed)
    path = str(tmp_path / "ledger.db")
    open_admin(path).close()

    async def submit(ledger, owner: str) -> str:
        job_id = str(uuid.uuid4())
        await ledger.submit(NewJob(id=job_id, owner=owner, filename="x.wav", upload_bytes=1, language="en",
                                   model="tiny.en", response_format="json", diarize=False, prompt="",
                                   device="cpu", device_index="0"))
        return job_id

    async def scenario() -> tuple[dict[str, int], list[str]]:
        ledger = SQLiteLedger(path, "test")
        await ledger.open()
        try:
            owners = [chooser.choice("abcde"[:chooser.randint(1, 5)]) for _ in range(chooser.randint(1, 25))]
            ids = [await submit(ledger, owner) for owner in owners]
            # Some are served first (they go behind those never served), and more arrive after.
            for _ in range(chooser.randint(0, len(ids) // 2)):
                job = await ledger.claim(1, "fair")
                await ledger.complete(job.id, "en")
                ids.remove(job.id)
            ids += [await submit(ledger, chooser.choice("abcdef")) for _ in range(chooser.randint(0, 6))]
            positions = {job_id: await ledger.queue_position(await ledger.get(job_id), "fair") for job_id in ids}
            taken = []
            while (job := await ledger.claim(1, "fair")) is not None:
                taken.append(job.id)
                await ledger.complete(job.id, "en")
            return positions, taken
        finally:
            await ledger.close()

    positions, taken = asyncio.run(scenario())
    assert sorted(positions.values()) == list(range(1, len(positions) + 1))
    assert [job_id for job_id, _ in sorted(positions.items(), key=lambda item: item[1])] == taken


# -- listing ----------------------------------------------------------------------------------


def test_each_token_lists_only_its_jobs_newest_first_a_page_at_a_time(secure):
    server = secure()
    alice, bob = server.create_token("alice"), server.create_token("bob")
    admin = server.create_token("root", "--admin")
    alice_jobs = [server.submit_ok(token=alice) for _ in range(5)]
    bob_jobs = [server.submit_ok(token=bob) for _ in range(2)]

    # Pages of two, newest first; the cursor holds while new jobs arrive between pages.
    first = server.api("GET", "/transcription?limit=2", token=alice)
    assert first.status_code == 200, first.text
    body = first.json()
    assert [job["job_id"] for job in body["jobs"]] == alice_jobs[::-1][:2]
    newer = server.submit_ok(token=alice)
    seen = [job["job_id"] for job in body["jobs"]]
    cursor = body["next"]
    while cursor:
        page = server.api("GET", "/transcription", token=alice, params={"limit": 2, "cursor": cursor}).json()
        seen += [job["job_id"] for job in page["jobs"]]
        cursor = page["next"]
    assert seen == alice_jobs[::-1]
    assert newer not in seen

    everything = server.api("GET", "/transcription", token=alice).json()
    assert [job["job_id"] for job in everything["jobs"]] == [newer] + alice_jobs[::-1]
    assert everything["next"] is None
    entry = everything["jobs"][0]
    for key in ("job_id", "status", "created_at", "filename", "model", "language"):
        assert key in entry
    assert entry["filename"] == "tone.wav" and entry["model"] == "tiny.en" and entry["language"] == "en"
    assert entry["audio_seconds"] == pytest.approx(1.0, abs=0.01)
    assert "owner" not in entry

    # Bob sees his two and nothing of Alice's, and cannot open hers either.
    bobs = server.api("GET", "/transcription", token=bob).json()
    assert [job["job_id"] for job in bobs["jobs"]] == bob_jobs[::-1]
    assert server.status(alice_jobs[0], bob).status_code == 404

    # The admin sees every job with its owner's name.
    all_jobs = server.api("GET", "/transcription?limit=100", token=admin).json()["jobs"]
    owners = {job["job_id"]: job["owner"] for job in all_jobs}
    assert owners == {**{j: "alice" for j in alice_jobs + [newer]}, **{j: "bob" for j in bob_jobs}}

    # ?status= filters; a finished job says whether its result can still be fetched.
    assert server.wait_drained(60)
    done = server.api("GET", "/transcription?status=completed", token=bob).json()["jobs"]
    assert [job["job_id"] for job in done] == bob_jobs[::-1]
    assert all(job["status"] == "Completed" and job["result_available"] for job in done)
    assert server.api("GET", f"/transcription/{bob_jobs[0]}/result", token=bob).status_code == 200
    def delivered():  # recorded just after the client has the last byte
        after = server.api("GET", "/transcription?status=Completed", token=bob).json()["jobs"]
        fetched = next(job for job in after if job["job_id"] == bob_jobs[0])
        return fetched if not fetched["result_available"] else None

    fetched = wait_until(delivered, what="the delivery recorded")
    assert fetched["result_available"] is False and "delivered_at" in fetched
    assert server.api("GET", "/transcription?status=Queued", token=bob).json() == {"jobs": [], "next": None}


@pytest.mark.parametrize("query, words", [
    ("limit=0", "'limit' must be a whole number from 1 to 100"),
    ("limit=101", "'limit' must be a whole number from 1 to 100"),
    ("limit=ten", "'limit' must be a whole number from 1 to 100"),
    ("limit=-1", "'limit' must be a whole number from 1 to 100"),
    ("status=Done", "'status' must be one of Queued, Processing, Completed, Failed, Canceled"),
    ("cursor=not-a-cursor", "'cursor' is not one this server gave out"),
    ("cursor=" + "A" * 60, "'cursor' is not one this server gave out"),
])
def test_bad_listing_parameters_are_refused_in_words(server, query, words):
    response = server.api("GET", f"/transcription?{query}")
    assert response.status_code == 400
    assert words in response.json()["error"]


def test_listing_needs_a_token(secure):
    server = secure()
    server.create_token("someone")
    response = server.api("GET", "/transcription", token="wrong")
    assert response.status_code == 401 and "error" in response.json()


# -- limits -----------------------------------------------------------------------------------


def assert_nothing_written(server: Server, rows_before: int) -> None:
    assert server.rows("SELECT count(*) FROM jobs")[0][0] == rows_before
    # Only the jobs already accepted have files; a refused upload leaves no staged file.
    accepted = {row[0] for row in server.rows("SELECT id FROM jobs")}
    for path in server.job_files():
        assert any(job_id in path for job_id in accepted), path


def test_max_queued_per_token_with_the_setting_as_default(secure):
    # Every job runs for a minute, so accepted jobs stay queued or running.
    server = secure(WHISPER_TOKEN_MAX_QUEUED="1", FAKE_WHISPERX_MODE="slow", FAKE_WHISPERX_SLOW_SECONDS="60")
    capped = server.create_token("capped")                     # the setting's default: 1
    two = server.create_token("two", "--max-queued", "2")      # its own limit
    free = server.create_token("free", "--max-queued", "0")    # 0: no limit

    server.submit_ok(token=capped)
    before = server.rows("SELECT count(*) FROM jobs")[0][0]
    refused = server.submit(token=capped)
    assert refused.status_code == 429
    assert refused.headers["Retry-After"].isdigit()
    message = refused.json()["error"]
    assert "max_queued is 1 for 'capped'" in message and "which has 1 queued or running" in message
    assert_nothing_written(server, before)

    server.submit_ok(token=two)
    server.submit_ok(token=two)
    before = server.rows("SELECT count(*) FROM jobs")[0][0]
    refused = server.submit(token=two)
    assert refused.status_code == 429 and "max_queued is 2 for 'two', which has 2 queued" in refused.json()["error"]
    assert_nothing_written(server, before)

    for _ in range(3):
        server.submit_ok(token=free)

    # Raised on the command line, taken by the running server within RECHECK_SECONDS (a token's
    # row is remembered that long, tokens.py): the test moves the server's clock that far.
    done = server.cli("token", "update", "two", "--max-queued", "3")
    assert done.returncode == 0 and "max_queued=3" in done.stdout
    server.pass_time(RECHECK_SECONDS)
    server.submit_ok(token=two)
    # And back to the setting's default (1): two has three now, so it is refused again.
    assert server.cli("token", "update", "two", "--max-queued", "default").returncode == 0
    server.pass_time(RECHECK_SECONDS)
    refused = server.submit(token=two)
    assert refused.status_code == 429 and "max_queued is 1 for 'two', which has 3" in refused.json()["error"], \
        refused.text
    # Its listing says what it has.
    assert len(server.api("GET", "/transcription", token=two).json()["jobs"]) == 3


def test_limits_hold_for_uploads_racing_in_two_worker_processes(secure, tmp_path):
    server = secure(HTTP_WORKER_NUMBER="2", FAKE_WHISPERX_MODE="slow", FAKE_WHISPERX_SLOW_SECONDS="60")
    queued = server.create_token("racer", "--max-queued", "2")
    audio = server.create_token("talker", "--max-audio-minutes-per-day", "0.05")  # 3 s
    clip = make_wav(tmp_path / "clip.wav", seconds=1.0)

    def burst(token: str) -> list[requests.Response]:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda _: server.submit(clip, token=token), range(8)))

    for token, name, allowed in ((queued, "racer", 2), (audio, "talker", 3)):
        answers = burst(token)
        codes = sorted(response.status_code for response in answers)
        assert codes == [202] * allowed + [429] * (8 - allowed), [r.text for r in answers]
        assert server.rows("SELECT count(*) FROM jobs WHERE owner=?", (name,))[0][0] == allowed
        for response in answers:
            if response.status_code == 429:
                assert response.headers["Retry-After"].isdigit()
                assert ("max_queued is 2" if name == "racer" else "max_audio_minutes_per_day is 0.05") \
                    in response.json()["error"]
    assert_nothing_written(server, 5)


def test_setting_defaults_apply_to_tokens_the_ledger_does_not_know(make_server):
    # The harness's default: WHISPER_API_ALLOW_ANY_TOKEN=true (every token is "anyone").
    server = make_server(WHISPER_TOKEN_MAX_QUEUED="1", FAKE_WHISPERX_MODE="slow", FAKE_WHISPERX_SLOW_SECONDS="60")
    server.submit_ok()
    refused = server.submit(token="another-token")
    assert refused.status_code == 429 and "max_queued is 1 for 'anyone'" in refused.json()["error"]
    usage = server.api("GET", "/usage").json()
    assert usage["limits"]["max_queued"] == 1 and usage["active_jobs"] == 1


def test_daily_audio_minutes_count_the_probed_duration(secure, tmp_path):
    server = secure()
    # 0.05 minutes = 3 seconds of audio per UTC day.
    token = server.create_token("short", "--max-audio-minutes-per-day", "0.05")
    two = make_wav(tmp_path / "two.wav", seconds=2.0)
    one = make_wav(tmp_path / "one.wav", seconds=1.0)
    server.submit_ok(two, token=token)
    before = server.rows("SELECT count(*) FROM jobs")[0][0]

    refused = server.submit(two, token=token)
    assert refused.status_code == 429
    retry = int(refused.headers["Retry-After"])
    assert 0 < retry <= 86401
    message = refused.json()["error"]
    assert "max_audio_minutes_per_day is 0.05 for 'short'" in message
    assert "used 0.03 minutes today" in message and "this file has 0.03 more" in message
    assert_nothing_written(server, before)

    server.submit_ok(one, token=token)  # 2 + 1 = 3 seconds: exactly the budget
    before = server.rows("SELECT count(*) FROM jobs")[0][0]
    # Nothing left: refused before the body is even stored.
    refused = server.submit(one, token=token)
    assert refused.status_code == 429 and "used 0.05 minutes today" in refused.json()["error"]
    assert_nothing_written(server, before)
    usage = server.api("GET", "/usage", token=token).json()
    assert usage["today"]["audio_seconds"] == pytest.approx(3.0, abs=0.01)
    assert usage["limits"]["max_audio_minutes_per_day"] == 0.05


def test_max_file_size_per_token_by_content_length_and_by_streamed_bytes(secure, tmp_path):
    server = secure(MAX_FILE_SIZE="5000000")
    token = server.create_token("small", "--max-file-size", "20000")
    big = make_wav(tmp_path / "big.wav", seconds=1.0)  # 32,044 bytes
    before = server.rows("SELECT count(*) FROM jobs")[0][0]

    # Content-Length within the form's overhead: the streamed bytes are counted.
    refused = server.submit(big, token=token)
    assert refused.status_code == 413
    assert refused.json()["error"] == "file is larger than this token's max_file_size (20000 bytes)"
    assert_nothing_written(server, before)

    # A Content-Length beyond the limit plus the form's room is refused before the body is read.
    huge = make_wav(tmp_path / "huge.wav", seconds=40.0)  # 1.28 MB
    refused = server.submit(huge, token=token)
    assert refused.status_code == 413
    assert re.match(r"request body of \d+ bytes is larger than this token's max_file_size \(20000 bytes\)",
                    refused.json()["error"])
    assert_nothing_written(server, before)

    # Chunked (no Content-Length): counted as it streams.
    boundary = "tenantsboundary"
    payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.wav\"\r\n"
               "Content-Type: application/octet-stream\r\n\r\n").encode() + big.read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    chunks = (payload[i:i + 4096] for i in range(0, len(payload), 4096))
    refused = requests.post(server.url("/transcription"), data=chunks, timeout=30,
                            headers={"Authorization": f"Bearer {token}",
                                     "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert refused.status_code == 413 and "this token's max_file_size (20000 bytes)" in refused.json()["error"]
    assert_nothing_written(server, before)

    small = make_wav(tmp_path / "small.wav", seconds=0.5)  # 16,044 bytes
    server.submit_ok(small, token=token)
    # The OpenAI-compatible upload keeps to the same limits.
    refused = server.api("POST", "/v1/audio/transcriptions", token=token,
                         files={"file": ("big.wav", big.read_bytes())}, data={"model": "whisper-1"})
    assert refused.status_code == 413 and "max_file_size (20000 bytes)" in refused.text


def test_token_limit_options_are_checked_on_the_command_line(secure):
    server = secure(start=False)
    for bad in (["--max-queued", "-1"], ["--max-queued", "two"], ["--max-file-size", "1.5"],
                ["--max-audio-minutes-per-day", "nan"], ["--max-queued", "default"]):
        done = server.cli("token", "create", "--name", "x", *bad)
        assert done.returncode == 2 and "expected a" in done.stderr, (bad, done.stderr)
    assert server.cli("token", "list").stdout.startswith("no tokens")
    done = server.cli("token", "create", "--name", "limited", "--max-queued", "4",
                      "--max-audio-minutes-per-day", "90", "--max-file-size", "1000000")
    assert done.returncode == 0, done.stderr
    assert "max_queued=4, max_audio_minutes_per_day=90, max_file_size=1000000" in done.stdout
    (row,) = server.rows("SELECT max_queued, max_audio_minutes_per_day, max_file_size FROM api_tokens")
    assert tuple(row) == (4, 90.0, 1000000)
    listing = server.cli("token", "list").stdout
    assert re.search(r"limited .* 4 +90 +1000000 +in force", listing), listing
    assert server.cli("token", "update", "limited").returncode == 2
    missing = server.cli("token", "update", "nobody", "--max-queued", "1")
    assert missing.returncode == 1 and "no token in force is named 'nobody'" in missing.stderr
    done = server.cli("token", "update", "limited", "--max-file-size", "default", "--max-queued", "0")
    assert done.returncode == 0, done.stderr
    (row,) = server.rows("SELECT max_queued, max_audio_minutes_per_day, max_file_size FROM api_tokens")
    assert tuple(row) == (0, 90.0, None)


# -- usage ------------------------------------------------------------------------------------


def test_usage_sums_the_probed_durations_today_and_over_30_days(secure, tmp_path):
    server = secure(WHISPER_TOKEN_MAX_FILE_SIZE="900000")
    user = server.create_token("user", "--max-queued", "5")
    other = server.create_token("other")
    admin = server.create_token("boss", "--admin")
    lengths = [1.5, 2.0, 0.5, 3.25]
    jobs = [server.submit_ok(make_wav(tmp_path / f"clip{i}.wav", seconds=s), token=user)
            for i, s in enumerate(lengths)]
    server.submit_ok(make_wav(tmp_path / "other.wav", seconds=4.0), token=other)
    assert server.wait_drained(60)

    # One job from two days ago (in the 30 days, not today), one from 40 days ago (in neither).
    two_days = (datetime.now(timezone.utc) - timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    forty_days = (datetime.now(timezone.utc) - timedelta(days=40)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    server.rows("UPDATE jobs SET created_at=? WHERE id=?", (two_days, jobs[0]))  # either ledger
    server.rows("UPDATE jobs SET created_at=? WHERE id=?", (forty_days, jobs[1]))

    usage = server.api("GET", "/usage", token=user)
    assert usage.status_code == 200, usage.text
    body = usage.json()
    assert body["name"] == "user" and "tokens" not in body
    assert body["today"] == {"jobs": 2, "audio_seconds": pytest.approx(0.5 + 3.25, abs=0.01)}
    assert body["last_30_days"] == {"jobs": 3, "audio_seconds": pytest.approx(1.5 + 0.5 + 3.25, abs=0.01)}
    assert body["active_jobs"] == 0
    assert body["limits"] == {"max_queued": 5, "max_audio_minutes_per_day": 0.0, "max_file_size": 900000,
                              "max_open_uploads": 10, "max_upload_bytes": 2147483648}  # the settings' defaults

    listed = {job["job_id"]: job["audio_seconds"] for job in
              server.api("GET", "/transcription", token=user).json()["jobs"]}
    assert listed == {job: pytest.approx(s, abs=0.01) for job, s in zip(jobs, lengths)}

    everyone = server.api("GET", "/usage", token=admin).json()
    by_name = {entry["name"]: entry for entry in everyone["tokens"]}
    assert set(by_name) == {"user", "other", "boss"}
    assert by_name["other"]["today"] == {"jobs": 1, "audio_seconds": pytest.approx(4.0, abs=0.01)}
    assert by_name["user"]["last_30_days"] == body["last_30_days"]
    assert by_name["boss"]["today"] == {"jobs": 0, "audio_seconds": 0.0}
    assert by_name["other"]["limits"]["max_queued"] == 0

    # /metrics: the audio seconds of every job that completed, old or new.
    metrics = server.api("GET", "/metrics", token=None).text
    found = re.search(r"^whisperd_audio_seconds_processed_total ([0-9.e+]+)$", metrics, re.M)
    assert found and float(found.group(1)) == pytest.approx(sum(lengths) + 4.0, abs=0.05)


def test_a_job_canceled_before_it_ran_costs_nothing(secure, tmp_path):
    server = secure(FAKE_WHISPERX_SLOW_SECONDS="30")
    token = server.create_token("canceler")
    running = server.submit_ok(make_wav(tmp_path / "a.wav", seconds=1.0), token=token, prompt="fake:slow")
    queued = server.submit_ok(make_wav(tmp_path / "b.wav", seconds=2.0), token=token)
    assert server.api("DELETE", f"/transcription/{queued}", token=token).status_code == 200
    body = server.api("GET", "/usage", token=token).json()
    assert body["today"] == {"jobs": 1, "audio_seconds": pytest.approx(1.0, abs=0.01)}
    assert body["active_jobs"] == 1
    assert server.api("DELETE", f"/transcription/{running}", token=token).status_code == 200
