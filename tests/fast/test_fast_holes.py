"""Issue 23: per-token limits on every way in (multipart, tus, url=), open-upload caps, rate floors
for fetches and PATCHes, the bounded WAV fast path, one strict integer parser, and upload=<id>
kept usable by every refusal but 415. Every request goes to 127.0.0.1 (the served media too)."""

from __future__ import annotations

import asyncio
import base64
import struct
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from whisperd.handlers.transcription import SubmitHandler

from .harness import TOKEN, WAV, body_of, multipart, wav_bytes

gen_test = pytest.mark.gen_test(timeout=60)
TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"
LOCAL_FETCH = dict(WHISPER_FETCH_ALLOWED_HOSTS="127.0.0.1")


# -- helpers


async def create(api, length: int, token: str = TOKEN):
    return await api.call("POST", "/uploads", headers={**TUS, "Upload-Length": str(length)}, token=token)


async def created(api, length: int, token: str = TOKEN) -> str:
    response = await create(api, length, token)
    assert response.code == 201, response.body
    return response.headers["Location"]


async def patch(api, location: str, offset: int, data: bytes, **headers):
    return await api.call("PATCH", location, data, {**TUS, "Upload-Offset": str(offset), "Content-Type": OCTETS,
                                                     **headers})


async def finished_upload(api, data: bytes) -> str:
    location = await created(api, len(data))
    response = await patch(api, location, 0, data)
    assert response.code == 204, response.body
    return location.rsplit("/", 1)[1]


class Served:
    """Media on 127.0.0.1: each route is (status, headers, body pieces, pause between pieces)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str], list[bytes], float]] = {}
        self.requested: list[str] = []
        served = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 (http.server's naming)
                served.requested.append(self.path)
                status, headers, pieces, pause = served.routes[self.path]
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    for piece in pieces:
                        self.wfile.write(piece)
                        self.wfile.flush()
                        if pause:
                            time.sleep(pause)
                except OSError:
                    pass  # the fetcher hung up
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add(self, path: str, body: bytes, status: int = 200, headers: dict[str, str] | None = None,
            pieces: list[bytes] | None = None, pause: float = 0.0) -> str:
        headers = {"Content-Length": str(len(body)), **(headers or {})}
        self.routes[path] = (status, headers, pieces if pieces is not None else [body], pause)
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture
def served():
    media = Served()
    yield media
    media.httpd.shutdown()


def junk_chunks_wav(count: int, seconds: float = 0.1) -> bytes:
    """A valid 16 kHz mono PCM WAV with `count` empty 'junk' chunks between the header and 'fmt '."""
    plain = wav_bytes(seconds)
    body = plain[12:]  # fmt and data chunks
    junk = b"junk" + struct.pack("<I", 0)
    riff = b"WAVE" + junk * count + body
    return b"RIFF" + struct.pack("<I", len(riff)) + riff


async def open_uploads_of(service, owner: str = "anyone"):
    return await service.ledger.open_uploads(owner)


# -- 1. per-token limits on every way in


@pytest.mark.settings(WHISPER_TOKEN_MAX_FILE_SIZE="100000")
@gen_test
async def test_the_token_file_size_limit_holds_at_tus_creation(api, service):
    response = await create(api, 1_100_000)
    assert response.code == 413, response.body
    assert "this token's max_file_size (100000 bytes)" in body_of(response)["error"]
    stored = service.files.tmp_root / ".uploads"
    assert not stored.exists() or not any(stored.iterdir())
    assert (await create(api, 100_000)).code == 201


@pytest.mark.settings(WHISPER_TOKEN_MAX_FILE_SIZE="100000", **LOCAL_FETCH)
@gen_test
async def test_the_token_file_size_limit_holds_for_url_by_content_length_and_while_streaming(api, served):
    big = WAV + b"\0" * 1_100_000
    url = served.add("/big.wav", big)
    response = await api.submit({"url": url}, file=None)
    assert response.code == 413, response.body
    assert "this token's max_file_size (100000 bytes)" in body_of(response)["error"]
    chunked = served.add("/chunked.wav", b"", headers={"Content-Length": "", "Transfer-Encoding": "chunked"},
                         pieces=[b"%x\r\n%s\r\n" % (50_000, b"\0" * 50_000)] * 4 + [b"0\r\n\r\n"])
    served.routes["/chunked.wav"][1].pop("Content-Length")
    response = await api.submit({"url": chunked}, file=None)
    assert response.code == 413, response.body
    assert "this token's max_file_size (100000 bytes)" in body_of(response)["error"]


@pytest.mark.settings(WHISPER_TOKEN_MAX_QUEUED="1", FAKE_WHISPERX_SLOW_SECONDS="5", **LOCAL_FETCH)
@gen_test
async def test_the_queue_limit_holds_for_upload_and_url_before_anything_is_used_or_fetched(api, service, served):
    upload_id = await finished_upload(api, WAV)
    url = served.add("/never.wav", WAV)
    busy = await api.submit_ok({"prompt": "fake:slow"})  # the one job this identity may have
    for fields in ({"upload": upload_id}, {"url": url}):
        refused = await api.submit(fields, file=None)
        assert refused.code == 429, (fields, refused.body)
        assert "max_queued is 1" in body_of(refused)["error"]
    row = await service.ledger.get_upload(upload_id)
    assert row.job_id is None and service.files.resumable_path(upload_id).exists()
    assert "/never.wav" not in served.requested  # refused before any connection
    await api.call("DELETE", f"/transcription/{busy}")


# -- 2. open uploads: counted and capped per token, space reserved, idle ones expire sooner


@pytest.mark.settings(WHISPER_TOKEN_MAX_OPEN_UPLOADS="2")
@gen_test
async def test_open_uploads_are_capped_per_token(api):
    first = await created(api, 1000)
    await created(api, 1000)
    refused = await create(api, 1000)
    assert refused.code == 429, refused.body
    assert "max_open_uploads is 2" in body_of(refused)["error"]
    assert refused.headers.get("Retry-After")
    assert (await api.call("DELETE", first, headers=TUS)).code == 204
    assert (await create(api, 1000)).code == 201


@pytest.mark.settings(WHISPER_TOKEN_MAX_UPLOAD_BYTES="100000")
@gen_test
async def test_declared_bytes_of_open_uploads_are_capped_per_token(api):
    await created(api, 60_000)
    refused = await create(api, 50_000)
    assert refused.code == 429, refused.body
    assert "max_upload_bytes is 100000" in body_of(refused)["error"]
    too_big = await create(api, 100_001)
    assert too_big.code == 413 and "max_upload_bytes" in body_of(too_big)["error"]
    assert (await create(api, 40_000)).code == 201


@pytest.mark.settings(WHISPER_MIN_FREE_DISK_MB="500")
@gen_test
async def test_creation_reserves_the_declared_space_against_the_disk_floor(api, service, monkeypatch):
    monkeypatch.setattr(service.files, "free_disk_mb", lambda: 600.0)
    await created(api, 60 * 2**20)
    refused = await create(api, 60 * 2**20)  # 100 MB above the floor, 60 MB of it promised already
    assert refused.code == 507, refused.body
    assert "WHISPER_MIN_FREE_DISK_MB=500" in body_of(refused)["error"]


@pytest.mark.settings(WHISPER_UPLOAD_IDLE_HOURS="0.0003", WHISPER_UPLOAD_EXPIRY_HOURS="24")
@gen_test
async def test_idle_uploads_expire_sooner_than_finished_ones(api, service, pass_time):
    idle = await created(api, len(WAV))
    done_id = await finished_upload(api, WAV)
    idle_row = await service.ledger.get_upload(idle.rsplit("/", 1)[1])
    done_row = await service.ledger.get_upload(done_id)
    assert idle_row.expires_at < done_row.expires_at
    # The idle one is gone after about a second (0.0003 h), the finished one stays for the day.
    assert (await api.call("HEAD", idle, headers=TUS)).code == 200
    pass_time(2)
    assert (await api.call("HEAD", idle, headers=TUS)).code == 410
    assert (await api.call("HEAD", f"/uploads/{done_id}", headers=TUS)).code == 200


# -- 3. slow fetches and slow PATCHes are cut; PATCHes take a slot


@pytest.mark.settings(WHISPER_UPLOAD_MIN_BYTES_PER_SECOND="2000", WHISPER_UPLOAD_RATE_WINDOW_SECONDS="0.5",
                      **LOCAL_FETCH)
@gen_test
async def test_a_fetch_slower_than_the_floor_is_cut_and_frees_its_slot(api, served, service):
    audio = WAV + b"\0" * 20_000
    url = served.add("/slow.wav", audio, pieces=[audio[i:i + 10] for i in range(0, len(audio), 10)], pause=0.1)
    started = time.monotonic()
    response = await api.submit({"url": url}, file=None)
    assert response.code == 504, response.body
    assert "WHISPER_UPLOAD_MIN_BYTES_PER_SECOND" in body_of(response)["error"]
    assert time.monotonic() - started < 10
    assert service.uploads_in_flight == 0


async def raw_patch(base_url: str, location: str, declared: int, sent: bytes):
    host, port = base_url.rsplit("/", 1)[-1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write((f"PATCH {location} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                  f"Tus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\nContent-Type: {OCTETS}\r\n"
                  f"Content-Length: {declared}\r\n\r\n").encode() + sent)
    await writer.drain()
    return reader, writer


@pytest.mark.settings(WHISPER_UPLOAD_MIN_BYTES_PER_SECOND="2000", WHISPER_UPLOAD_RATE_WINDOW_SECONDS="0.5")
@gen_test
async def test_a_patch_slower_than_the_floor_is_cut_with_408(api, base_url):
    location = await created(api, 100_000)
    reader, writer = await raw_patch(base_url, location, 100_000, b"\0" * 10)
    answer = await asyncio.wait_for(reader.read(4096), timeout=10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"WHISPER_UPLOAD_MIN_BYTES_PER_SECOND" in answer


@pytest.mark.settings(WHISPER_MAX_PENDING_UPLOADS="1", WHISPER_UPLOAD_MIN_BYTES_PER_SECOND="0")
@gen_test
async def test_a_patch_holds_an_upload_slot_while_its_body_streams(api, base_url, service):
    location = await created(api, 100_000)
    reader, writer = await raw_patch(base_url, location, 100_000, b"\0" * 10)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while service.uploads_in_flight == 0:
        assert loop.time() < deadline, "the PATCH never took a slot"
        await asyncio.sleep(0.01)
    refused = await api.submit()
    assert refused.code == 429, refused.body
    writer.close()
    while service.uploads_in_flight:
        assert loop.time() < deadline, "the cut PATCH kept its slot"
        await asyncio.sleep(0.01)
    assert (await api.submit()).code == 202


async def ledger_token(service, name: str) -> str:
    from whisperd.identity import tokens

    token, prefix = tokens.new_token()
    algorithm, salt, digest = tokens.hashed_for_storage(token)
    await service.ledger.insert_token(name, prefix, algorithm, salt, digest, False, None, {})
    return token


async def raw_patch_as(base_url: str, location: str, token: str):
    host, port = base_url.rsplit("/", 1)[-1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write((f"PATCH {location} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                  f"Tus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\nContent-Type: {OCTETS}\r\n"
                  f"Content-Length: 100000\r\n\r\n").encode() + b"\0" * 10)
    await writer.drain()
    return reader, writer


@pytest.mark.settings(WHISPER_API_ALLOW_ANY_TOKEN="false", WHISPER_MAX_PENDING_UPLOADS="4",
                      WHISPER_UPLOAD_SHARE_PER_ADDRESS="1", WHISPER_UPLOAD_SHARE_PER_TOKEN="0.5",
                      WHISPER_UPLOAD_MIN_BYTES_PER_SECOND="0")
@gen_test
async def test_one_token_holds_at_most_its_share_of_the_upload_slots(api, base_url, service):
    greedy, other = await ledger_token(service, "greedy"), await ledger_token(service, "other")
    held = []
    for _ in range(2):
        location = await created(api, 100_000, token=greedy)
        held.append(await raw_patch_as(base_url, location, greedy))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while service.uploads_in_flight < 2:
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    refused = await api.submit(token=greedy)
    assert refused.code == 429, refused.body
    assert "WHISPER_UPLOAD_SHARE_PER_TOKEN" in body_of(refused)["error"]
    assert (await api.submit(token=other)).code == 202  # the same address, another token: slots are left
    for _reader, writer in held:
        writer.close()


@pytest.mark.settings(WHISPER_MAX_PENDING_UPLOADS="4", WHISPER_UPLOAD_SHARE_PER_ADDRESS="1",
                      WHISPER_UPLOAD_SHARE_PER_TOKEN="0.5", WHISPER_UPLOAD_MIN_BYTES_PER_SECOND="0")
@gen_test
async def test_the_identity_every_caller_shares_has_no_share_of_its_own(api, base_url, service):
    """WHISPER_API_ALLOW_ANY_TOKEN: every caller is 'anyone'; a per-token share would halve the slots."""
    held = []
    for _ in range(3):
        location = await created(api, 100_000)
        held.append(await raw_patch_as(base_url, location, TOKEN))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while service.uploads_in_flight < 3:
        assert loop.time() < deadline, "the shared identity was held to a share"
        await asyncio.sleep(0.01)
    for _reader, writer in held:
        writer.close()


# -- 4. the WAV fast path is bounded


@gen_test
async def test_a_wav_with_thousands_of_chunks_before_its_data_is_refused_without_walking_them(api, service):
    hostile = junk_chunks_wav(100_000)  # 800 kB of empty chunks: Python's wave walks every one
    started = time.process_time()
    response = await api.submit(file=hostile)
    assert response.code == 415, response.body
    assert "chunks before its audio" in body_of(response)["error"]
    assert time.process_time() - started < 1.0
    # A real WAV with a few extra chunks is still taken by the fast path.
    assert (await api.submit(file=junk_chunks_wav(3))).code == 202


def test_the_fast_path_stops_when_told_and_at_its_deadline(tmp_path):
    from whisperd.canonical_wav import FastPathStopped, FastPathTimeout, copy_if_canonical

    source = tmp_path / "long.wav"
    source.write_bytes(wav_bytes(2.0))
    assert copy_if_canonical(source, tmp_path / "a.wav", None) == 32000
    with pytest.raises(FastPathStopped):
        copy_if_canonical(source, tmp_path / "b.wav", None, stopped=lambda: True)
    with pytest.raises(FastPathTimeout):
        copy_if_canonical(source, tmp_path / "c.wav", None, deadline=time.monotonic() - 1)


# -- 5. one strict integer parser for every integer input

BAD_NUMBERS = ["²", "-1", "1e3", "1" * 30, ""]


@pytest.mark.settings(**LOCAL_FETCH)
@gen_test
async def test_every_integer_input_refuses_unicode_digits_signs_exponents_huge_and_empty(api, served):
    location = await created(api, 1000)
    for bad in BAD_NUMBERS:
        checks = {
            "Upload-Length": await api.call("POST", "/uploads", headers={**TUS, "Upload-Length": bad}),
            "Upload-Offset": await patch(api, location, 0, b"x", **{"Upload-Offset": bad}),
            "limit": await api.call("GET", "/transcription?limit=" + bad),
            "cursor": await api.call("GET", "/transcription?cursor="
                                     + base64.urlsafe_b64encode(f"j{bad}".encode()).decode().rstrip("=")),
            "device_index": await api.submit({"device_index": bad}) if bad else None,
        }
        url = served.add(f"/length-{uuid.uuid4().hex}.wav", WAV, headers={"Content-Length": bad})
        checks["fetched Content-Length"] = await api.submit({"url": url}, file=None)
        for name, response in checks.items():
            if response is None:
                continue
            assert response.code in (400, 502), (name, bad, response.code, response.body)
            assert "error" in body_of(response), (name, bad)
    cursor = base64.urlsafe_b64encode(("j" + "9" * 30).encode()).decode().rstrip("=")
    response = await api.call("GET", f"/transcription?cursor={cursor}")
    assert response.code == 400 and "cursor" in body_of(response)["error"]


# -- 6 and 7. upload=<id>: used up only by an accepted job or a 415


@pytest.mark.settings(WHISPER_TOKEN_MAX_AUDIO_MINUTES_PER_DAY="0.0025")  # 0.15 s
@gen_test
async def test_a_429_leaves_the_finished_upload_usable(api, service):
    await api.submit_ok()  # 0.1 s of the budget spent
    upload_id = await finished_upload(api, WAV)
    refused = await api.submit({"upload": upload_id}, file=None)
    assert refused.code == 429, refused.body
    row = await service.ledger.get_upload(upload_id)
    assert row is not None and row.job_id is None
    assert service.files.resumable_path(upload_id).stat().st_size == len(WAV)
    head = await api.call("HEAD", f"/uploads/{upload_id}", headers=TUS)
    assert head.code == 200 and head.headers["Upload-Offset"] == str(len(WAV))


@gen_test
async def test_a_415_uses_the_upload_up(api, service):
    upload_id = await finished_upload(api, b"this is no audio at all" * 100)
    refused = await api.submit({"upload": upload_id}, file=None)
    assert refused.code == 415, refused.body
    assert (await api.call("HEAD", f"/uploads/{upload_id}", headers=TUS)).code == 404
    assert not service.files.resumable_path(upload_id).exists()


@gen_test
async def test_an_accepted_upload_is_used_once_and_its_bytes_go(api, service):
    upload_id = await finished_upload(api, WAV)
    accepted = await api.submit({"upload": upload_id}, file=None)
    assert accepted.code == 202, accepted.body
    row = await service.ledger.get_upload(upload_id)
    assert row.job_id == body_of(accepted)["job_id"]
    assert not service.files.resumable_path(upload_id).exists()
    again = await api.submit({"upload": upload_id}, file=None)
    assert again.code == 409


@gen_test(timeout=90)
async def test_clients_that_leave_right_after_naming_an_upload_get_no_job(api, base_url, service, monkeypatch):
    ended: list[str] = []
    original = SubmitHandler.post

    async def counted(self):
        try:
            await original(self)
        finally:
            ended.append(self.request.method)

    monkeypatch.setattr(SubmitHandler, "post", counted)
    host, port = base_url.rsplit("/", 1)[-1].split(":")
    uploads = [await finished_upload(api, WAV) for _ in range(10)]
    for upload_id in uploads:
        body, content_type = multipart({"upload": upload_id}, file=None)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write((f"POST /transcription HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                      f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
        await writer.drain()
        writer.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while len(ended) < len(uploads):
        assert loop.time() < deadline, f"only {len(ended)} of {len(uploads)} submissions ended"
        await asyncio.sleep(0.02)
    assert (await service.ledger.counts())["Queued"] + (await service.ledger.counts())["Processing"] == 0
    assert await service.ledger.list_jobs(None, None, None, 100) == []
    for upload_id in uploads:
        row = await service.ledger.get_upload(upload_id)
        assert row is not None and row.job_id is None, upload_id
        assert service.files.resumable_path(upload_id).exists()


# -- 8. the fetch allow-list: host:port entries, and names checked by the addresses they resolve to


def fetcher_allowing(fast_env, tmp_path, allowed: str):
    from whisperd import config as config_module
    from whisperd.fetch import MediaFetcher

    config = config_module.load(environ={**fast_env, "WHISPER_FETCH_ALLOWED_HOSTS": allowed},
                                conf_path=str(tmp_path / "whisper_api.conf"))
    return MediaFetcher(config)


@gen_test
async def test_allow_list_entries_may_name_a_port(api, service, served, fast_env, tmp_path, monkeypatch):
    url = served.add("/ok.wav", WAV)
    port = served.httpd.server_address[1]
    monkeypatch.setattr(service, "fetcher", fetcher_allowing(fast_env, tmp_path, f"127.0.0.1:{port}"))
    assert (await api.submit({"url": url}, file=None)).code == 202
    other = await api.submit({"url": f"http://127.0.0.1:{port + 1}/ok.wav"}, file=None)
    assert other.code == 400 and "WHISPER_FETCH_ALLOWED_HOSTS" in body_of(other)["error"]
    monkeypatch.setattr(service, "fetcher", fetcher_allowing(fast_env, tmp_path, f"localhost:{port}, 127.0.0.0/8"))
    assert (await api.submit({"url": url.replace("127.0.0.1", "localhost")}, file=None)).code == 202


@gen_test
async def test_a_name_entry_does_not_admit_a_private_address_it_resolves_to(api, service, served, fast_env,
                                                                            tmp_path, monkeypatch):
    url = served.add("/ok.wav", WAV).replace("127.0.0.1", "localhost")
    monkeypatch.setattr(service, "fetcher", fetcher_allowing(fast_env, tmp_path, "localhost"))
    refused = await api.submit({"url": url}, file=None)
    assert refused.code == 400, refused.body
    assert "localhost resolves to" in body_of(refused)["error"]
    monkeypatch.setattr(service, "fetcher", fetcher_allowing(fast_env, tmp_path, "localhost, 127.0.0.1, ::1"))
    assert (await api.submit({"url": url}, file=None)).code == 202


@gen_test
async def test_a_job_the_ledger_refuses_leaves_its_upload_usable(api, service, monkeypatch):
    from whisperd.ledger import QuotaExceeded

    upload_id = await finished_upload(api, WAV)

    async def over_quota(*args, **kwargs):
        raise QuotaExceeded("max_queued", 1)

    monkeypatch.setattr(service.ledger, "submit", over_quota)
    refused = await api.submit({"upload": upload_id}, file=None)
    assert refused.code == 429, refused.body
    row = await service.ledger.get_upload(upload_id)
    assert row.job_id is None and row.used_at is None
    assert service.files.resumable_path(upload_id).exists()
    monkeypatch.undo()
    assert (await api.submit({"upload": upload_id}, file=None)).code == 202


@gen_test
async def test_without_hard_links_the_upload_is_copied_and_still_used_only_by_its_job(api, service, monkeypatch):
    import errno
    import os

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "hard links not supported")

    upload_id = await finished_upload(api, WAV)
    monkeypatch.setattr(os, "link", no_links)
    accepted = await api.submit({"upload": upload_id}, file=None)
    assert accepted.code == 202, accepted.body
    assert (await service.ledger.get_upload(upload_id)).job_id == body_of(accepted)["job_id"]
    assert not service.files.resumable_path(upload_id).exists()
