"""Resumable uploads (tus 1.0.0 at /uploads): the official Python client, raw HTTP, cut connections,
a restart between two PATCHes, expiry, ownership, and the upload becoming a job (used once)."""

from __future__ import annotations

import base64
import hashlib
import socket

import pytest
from tusclient import client as tus_client
from tusclient.exceptions import TusCommunicationError

from conftest import TOKEN, Server, make_wav, wait_until
from whisperd.identity.tokens import RECHECK_SECONDS

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"


def meta(name: str) -> str:
    return "filename " + base64.b64encode(name.encode()).decode()


def create(server: Server, size: int, name: str = "talk.wav", token: str | None = TOKEN, **headers) -> str:
    response = server.api("POST", "/uploads", token=token,
                          headers={**TUS, "Upload-Length": str(size), "Upload-Metadata": meta(name), **headers})
    assert response.status_code == 201, response.text
    assert response.headers["Location"].startswith("/uploads/")
    assert response.headers["Upload-Expires"].endswith("GMT")
    return response.headers["Location"]


def patch(server: Server, location: str, offset: int, data: bytes, token: str | None = TOKEN, **headers):
    return server.api("PATCH", location, token=token, data=data,
                      headers={**TUS, "Upload-Offset": str(offset), "Content-Type": OCTETS, **headers})


def offset_of(server: Server, location: str, token: str | None = TOKEN) -> int:
    response = server.api("HEAD", location, token=token, headers=dict(TUS))
    assert response.status_code == 200, response.status_code
    return int(response.headers["Upload-Offset"])


def use(server: Server, upload_id: str, token: str | None = TOKEN, **fields):
    parts = {"upload": (None, upload_id), **{k: (None, str(v)) for k, v in fields.items()}}
    return server.api("POST", "/transcription", token=token, files=parts)


def nothing_left(server: Server) -> None:
    # A delivery is recorded, and its files removed, just after the client has the last byte.
    assert server.files_gone(), server.job_files()


def test_options_advertises_the_protocol_and_extensions_without_a_token(server):
    response = server.api("OPTIONS", "/uploads", token=None)
    assert response.status_code == 204
    assert response.headers["Tus-Version"] == "1.0.0"
    assert set(response.headers["Tus-Extension"].split(",")) == {"creation", "termination", "expiration", "checksum"}
    assert response.headers["Tus-Max-Size"] == str(536870912)
    assert response.headers["Tus-Checksum-Algorithm"] == "sha1"
    for header in ("Upload-Offset", "Upload-Length", "Location", "Tus-Resumable"):
        assert header in response.headers["Access-Control-Expose-Headers"]
    for header in ("Authorization", "Upload-Offset", "Upload-Checksum", "Tus-Resumable"):
        assert header in response.headers["Access-Control-Allow-Headers"]
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    one = server.api("OPTIONS", "/uploads/0b6d1d9c-2a7f-4d0c-9a39-8f7f51d5a111", token=None)
    assert one.status_code == 204 and one.headers["Tus-Version"] == "1.0.0"
    assert set(one.headers["Access-Control-Allow-Methods"].split(", ")) == {"OPTIONS", "HEAD", "PATCH", "DELETE"}


def test_tuspy_uploads_in_chunks_with_checksums_and_the_upload_becomes_a_job_once(server):
    audio = make_wav(server.root / "five.wav", seconds=5)  # 160 kB: four PATCHes of 48 kB
    client = tus_client.TusClient(server.url("/uploads"), headers={"Authorization": f"Bearer {TOKEN}"})
    uploader = client.uploader(str(audio), chunk_size=48_000, metadata={"filename": "five.wav"},
                               upload_checksum=True)
    uploader.upload()
    upload_id = uploader.url.rstrip("/").rsplit("/", 1)[1]
    assert offset_of(server, f"/uploads/{upload_id}") == audio.stat().st_size
    stored = server.rows("SELECT * FROM uploads WHERE id=?", (upload_id,))[0]
    assert stored["finished_at"] and stored["filename"] == "five.wav" and stored["job_id"] is None

    response = use(server, upload_id, language="en", response_format="srt")
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert server.wait_status(job_id)["status"] == "Completed"
    assert server.job_audio(job_id) == audio.read_bytes()
    job = server.rows("SELECT filename, upload_bytes, response_format FROM jobs WHERE id=?", (job_id,))[0]
    assert (job["filename"], job["upload_bytes"], job["response_format"]) == ("five.wav", audio.stat().st_size, "srt")
    assert server.rows("SELECT job_id FROM uploads WHERE id=?", (upload_id,))[0]["job_id"] == job_id

    again = use(server, upload_id)
    assert again.status_code == 409 and "already used" in again.json()["error"]
    result = server.api("GET", f"/transcription/{job_id}/result")
    assert result.status_code == 200
    nothing_left(server)


def test_sync_mode_through_an_upload(server):
    audio = make_wav(server.root / "one.wav")
    location = create(server, audio.stat().st_size, "one.wav")
    assert patch(server, location, 0, audio.read_bytes()).status_code == 204
    response = use(server, location.rsplit("/", 1)[1], sync="true")
    assert response.status_code == 200, response.text
    assert "text" in response.json()
    nothing_left(server)


def test_raw_protocol_errors(server):
    data = make_wav(server.root / "a.wav").read_bytes()
    location = create(server, len(data))
    assert server.api("POST", "/uploads", headers={"Upload-Length": "10"}).status_code == 412
    missing = server.api("POST", "/uploads", headers={**TUS})
    assert missing.status_code == 400 and "Upload-Length" in missing.json()["error"]
    huge = server.api("POST", "/uploads", headers={**TUS, "Upload-Length": str(536870912 + 1)})
    assert huge.status_code == 413 and "MAX_FILE_SIZE" in huge.json()["error"]
    assert server.api("POST", "/uploads", headers={**TUS, "Upload-Length": "10"}, token=None).status_code == 401

    wrong_type = server.api("PATCH", location, data=data, headers={**TUS, "Upload-Offset": "0",
                                                                     "Content-Type": "audio/wav"})
    assert wrong_type.status_code == 415
    wrong = patch(server, location, 5, data[5:])
    assert wrong.status_code == 409 and wrong.headers["Upload-Offset"] == "0" and "HEAD" in wrong.json()["error"]
    too_long = patch(server, location, 0, data + b"extra")
    assert too_long.status_code == 413 and "Upload-Length" in too_long.json()["error"]
    bad_sum = patch(server, location, 0, data[:1000],
                    **{"Upload-Checksum": "sha1 " + base64.b64encode(hashlib.sha1(b"other").digest()).decode()})
    assert bad_sum.status_code == 460
    assert patch(server, location, 0, data[:1000], **{"Upload-Checksum": "md5 AAAA"}).status_code == 400
    assert offset_of(server, location) == 0

    good_sum = "sha1 " + base64.b64encode(hashlib.sha1(data[:1000]).digest()).decode()
    answer = patch(server, location, 0, data[:1000], **{"Upload-Checksum": good_sum})
    assert answer.status_code == 204 and answer.headers["Upload-Offset"] == "1000"
    head = server.api("HEAD", location, headers=dict(TUS))
    assert head.headers["Upload-Length"] == str(len(data)) and head.headers["Upload-Metadata"] == meta("talk.wav")
    assert head.headers["Cache-Control"] == "no-store"

    unfinished = use(server, location.rsplit("/", 1)[1])
    assert unfinished.status_code == 409 and "not finished" in unfinished.json()["error"]
    assert server.rows("SELECT count(*) AS n FROM jobs")[0]["n"] == 0

    # termination
    assert server.api("DELETE", location, headers=dict(TUS)).status_code == 204
    assert server.api("HEAD", location, headers=dict(TUS)).status_code == 404
    assert use(server, location.rsplit("/", 1)[1]).status_code == 404
    assert server.api("HEAD", "/uploads/not-an-id", headers=dict(TUS)).status_code == 404
    nothing_left(server)


def test_an_upload_belongs_to_its_token(make_server):
    server = make_server(WHISPER_API_ALLOW_ANY_TOKEN="false")
    alice, bob = server.create_token("alice"), server.create_token("bob")
    data = make_wav(server.root / "a.wav").read_bytes()
    location = create(server, len(data), token=alice)
    assert patch(server, location, 0, data, token=alice).status_code == 204
    assert server.api("HEAD", location, token=bob, headers=dict(TUS)).status_code == 404
    assert patch(server, location, 0, data, token=bob).status_code == 404
    assert server.api("DELETE", location, token=bob, headers=dict(TUS)).status_code == 404
    refused = use(server, location.rsplit("/", 1)[1], token=bob)
    assert refused.status_code == 404
    accepted = use(server, location.rsplit("/", 1)[1], token=alice)
    assert accepted.status_code == 202, accepted.text


def _cut_patch(server: Server, location: str, offset: int, declared: int, sent: bytes, **headers) -> None:
    """A PATCH that announces `declared` bytes, sends fewer, and drops the connection."""
    lines = [f"PATCH {location} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", f"Authorization: Bearer {TOKEN}",
             "Tus-Resumable: 1.0.0", f"Upload-Offset: {offset}", f"Content-Type: {OCTETS}",
             f"Content-Length: {declared}", *[f"{k}: {v}" for k, v in headers.items()]]
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + sent)
    # closed here, mid-body: the server reads what was sent, then the end of the connection


def _patch_done(server: Server, location: str, offset: int) -> bool:
    """True once a PATCH of no bytes at `offset` is taken (204): the cut PATCH before it has been
    handled and let go of the upload (while it holds it, the answer is 423)."""
    status = patch(server, location, offset, b"").status_code
    assert status in (204, 423), status
    return status == 204


def _wait_offset(server: Server, location: str, wanted: int, timeout: float = 10.0) -> None:
    wait_until(lambda: offset_of(server, location) == wanted, timeout, f"the upload's offset to reach {wanted}")


def test_a_connection_cut_mid_patch_keeps_what_came_and_the_client_resumes(server):
    data = make_wav(server.root / "three.wav", seconds=3).read_bytes()
    location = create(server, len(data), "three.wav")
    _cut_patch(server, location, 0, len(data), data[:40_000])
    _wait_offset(server, location, 40_000)
    # With a checksum, a part of the body cannot be verified: it is dropped, not kept.
    sha = "sha1 " + base64.b64encode(hashlib.sha1(data[40_000:]).digest()).decode()
    _cut_patch(server, location, 40_000, len(data) - 40_000, data[40_000:60_000], **{"Upload-Checksum": sha})
    wait_until(lambda: _patch_done(server, location, 40_000), 10, "the cut PATCH to be handled")
    assert offset_of(server, location) == 40_000
    # The official client resumes from HEAD's offset (stored URL), and the file arrives whole.
    client = tus_client.TusClient(server.url("/uploads"), headers={"Authorization": f"Bearer {TOKEN}"})
    path = server.root / "three.wav"
    uploader = client.uploader(str(path), url=server.url(location), chunk_size=30_000)
    assert uploader.offset == 40_000
    uploader.upload()
    job_id = use(server, location.rsplit("/", 1)[1]).json()["job_id"]
    assert server.wait_status(job_id)["status"] == "Completed"
    assert server.job_audio(job_id) == data


def test_a_restart_between_two_patches_loses_nothing(make_server):
    server = make_server()
    data = make_wav(server.root / "four.wav", seconds=4).read_bytes()
    location = create(server, len(data), "four.wav")
    assert patch(server, location, 0, data[:50_000]).status_code == 204
    server.stop()
    server.start()
    assert offset_of(server, location) == 50_000
    assert patch(server, location, 50_000, data[50_000:]).status_code == 204
    upload_id = location.rsplit("/", 1)[1]
    assert hashlib.sha1(server.upload_bytes(upload_id)).digest() == hashlib.sha1(data).digest()
    job_id = use(server, upload_id).json()["job_id"]
    assert server.wait_status(job_id)["status"] == "Completed"
    # A kill -9 between two PATCHes: the same.
    location = create(server, len(data), "four.wav")
    assert patch(server, location, 0, data[:10_000]).status_code == 204
    server.kill9()
    server.start()
    assert offset_of(server, location) == 10_000


def test_an_upload_that_is_not_audio_is_refused_at_use_and_leaves_nothing(server):
    text = b"%PDF-1.4 not audio at all " * 200
    location = create(server, len(text), "report.pdf")
    assert patch(server, location, 0, text).status_code == 204
    response = use(server, location.rsplit("/", 1)[1])
    assert response.status_code == 415 and "not audio" in response.json()["error"]
    assert server.rows("SELECT count(*) AS n FROM jobs")[0]["n"] == 0
    nothing_left(server)


def test_one_source_only(server):
    audio = make_wav(server.root / "a.wav")
    both = server.api("POST", "/transcription", files={"file": ("a.wav", audio.read_bytes()),
                                                       "upload": (None, "0b6d1d9c-2a7f-4d0c-9a39-8f7f51d5a111")})
    assert both.status_code == 400 and "one source" in both.json()["error"]
    nothing_left(server)


def test_unfinished_uploads_expire_and_retention_deletes_their_bytes(make_server):
    # 1.8 s to live, retention every 0.36 s.
    server = make_server(WHISPER_UPLOAD_EXPIRY_HOURS="0.0005", WHISPER_CLEANUP_INTERVAL_HOURS="0.0001")
    data = make_wav(server.root / "a.wav").read_bytes()
    location = create(server, len(data))
    assert patch(server, location, 0, data[:1000]).status_code == 204
    upload_id = location.rsplit("/", 1)[1]
    assert server.upload_bytes(upload_id) == data[:1000]
    wait_until(lambda: not server.rows("SELECT count(*) AS n FROM uploads")[0]["n"], 15,
               "retention to expire the unfinished upload", poll=0.2)
    assert server.upload_bytes(upload_id) is None
    assert server.api("HEAD", location, headers=dict(TUS)).status_code == 404
    nothing_left(server)


def test_tuspy_reports_a_refusal(server):
    big = server.root / "big.bin"
    big.write_bytes(b"\0" * 1024)
    client = tus_client.TusClient(server.url("/uploads"), headers={"Authorization": "Bearer "})
    with pytest.raises(TusCommunicationError) as refused:
        client.uploader(str(big), chunk_size=512).upload()
    assert refused.value.status_code == 401


def test_open_upload_limits_set_on_the_command_line_hold_at_creation(make_server):
    """Issue 23: a token's size limit holds at POST /uploads (from Upload-Length), and so do its
    caps on open uploads and on the bytes they declare; `token update` changes them live."""
    server = make_server(WHISPER_API_ALLOW_ANY_TOKEN="false")
    token = server.create_token("uploader", "--max-file-size", "30000", "--max-open-uploads", "2",
                                "--max-upload-bytes", "45000")
    listing = server.cli("token", "list").stdout
    assert "OPEN UPLOADS" in listing and "UPLOAD BYTES" in listing

    def attempt(size: int):
        return server.api("POST", "/uploads", token=token, headers={**TUS, "Upload-Length": str(size)})

    too_big = attempt(1_100_000)
    assert too_big.status_code == 413
    assert too_big.json()["error"] == "Upload-Length 1100000 is larger than this token's max_file_size (30000 bytes)"
    first = create(server, 20_000, token=token)
    over_bytes = attempt(30_000)  # 20,000 + 30,000 > 45,000
    assert over_bytes.status_code == 429 and "max_upload_bytes is 45000" in over_bytes.json()["error"]
    create(server, 20_000, token=token)
    over_count = attempt(1_000)
    assert over_count.status_code == 429 and "max_open_uploads is 2" in over_count.json()["error"]
    assert server.api("DELETE", first, token=token, headers=dict(TUS)).status_code == 204
    assert server.cli("token", "update", "uploader", "--max-upload-bytes", "default").returncode == 0
    # Token rows are read again after RECHECK_SECONDS (tokens.py): the test lets that pass.
    server.pass_time(RECHECK_SECONDS)
    response = attempt(30_000)
    assert response.status_code == 201, response.text


def test_a_patch_killed_with_its_server_does_not_hold_the_upload_after_the_restart(make_server):
    """The one-PATCH-at-a-time claim of a PATCH that died with its server goes at the restart:
    the client resumes at once (no 423 for the claim's remaining life)."""
    server = make_server()
    data = make_wav(server.root / "four.wav", seconds=4).read_bytes()
    location = create(server, len(data), "four.wav")
    assert patch(server, location, 0, data[:30_000]).status_code == 204
    head = [f"PATCH {location} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", f"Authorization: Bearer {TOKEN}",
            "Tus-Resumable: 1.0.0", "Upload-Offset: 30000", f"Content-Type: {OCTETS}",
            f"Content-Length: {len(data) - 30_000}"]
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data[30_000:40_000])
        upload_id = location.rsplit("/", 1)[1]
        wait_until(lambda: server.rows("SELECT patch_claim FROM uploads WHERE id=?", (upload_id,))[0]["patch_claim"],
                   10, "the PATCH to claim the upload")
        server.kill9()
    server.start()
    assert offset_of(server, location) == 30_000  # what the killed PATCH got never counted
    assert patch(server, location, 30_000, data[30_000:]).status_code == 204
    job_id = use(server, upload_id).json()["job_id"]
    assert server.wait_status(job_id)["status"] == "Completed"
    assert server.job_audio(job_id) == data
