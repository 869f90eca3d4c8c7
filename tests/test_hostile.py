"""Hostile and broken uploads: each one refused (or timed out) cleanly, nothing left on disk."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests

from conftest import TOKEN, make_wav, wait_until


def nothing_changed(server) -> None:
    assert server.rows("SELECT id FROM jobs") == []
    assert server.files_gone(3)  # a dropped connection is cleaned up by the server's IOLoop, just after


def still_serves(server) -> None:
    assert server.api("GET", "/status").status_code == 200


def raw_head(length: int | None = None, boundary: str = "b", extra: str = "") -> bytes:
    head = (f"POST /transcription HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n{extra}")
    head += f"Content-Length: {length}\r\n\r\n" if length is not None else "Transfer-Encoding: chunked\r\n\r\n"
    return head.encode()


FILE_PART = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.wav"\r\n\r\n'


def read_status(sock: socket.socket, timeout: float = 10.0) -> tuple[int | None, bytes]:
    """The status code the server answered with (None: it closed without answering)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    if not data.startswith(b"HTTP/1.1 "):
        return None, data
    return int(data[9:12]), data


# -- not audio ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,content,found", [
    # The client's ".txt" once made ffprobe read this as tty; names no longer hint at formats.
    ("notes.txt", b"Minutes of the meeting.\n" * 50, "ffprobe found nothing it can read as audio or video"),
    ("notes.bin", b"Minutes of the meeting.\n" * 50, "ffprobe found nothing it can read as audio or video"),
    ("scan.pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n" * 20, "nothing it can read as audio or video"),
    ("random.wav", bytes(range(256)) * 64, "nothing it can read as audio or video"),
    ("image.png", None, "png"),
])
def test_files_that_are_not_audio_are_415_naming_what_was_found(server, name, content, found):
    if content is None:  # a real PNG: ffprobe reads it as a video stream with no sound
        import zlib, struct  # noqa: E401
        def chunk(kind, data):  # noqa: E306
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        content = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
                   + chunk(b"IDAT", zlib.compress(b"\0\0")) + chunk(b"IEND", b""))
    response = server.api("POST", "/transcription", files={"file": (name, content)}, data={"diarize": "false"})
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert f"'{name}' is not audio" in error and found in error
    nothing_changed(server)
    assert server.engine_runs() == []


def test_real_audio_in_other_containers_passes_the_probe(server, tmp_path):
    import subprocess
    wav = make_wav(tmp_path / "tone.wav", seconds=0.3)
    for suffix in ("flac", "mp3", "ogg"):
        out = tmp_path / f"tone.{suffix}"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(wav), str(out)], check=True)
        assert server.submit(out, diarize="false").status_code == 202, suffix


# -- multipart abuse -----------------------------------------------------------------------------


def test_ten_thousand_tiny_fields_are_refused(server):
    body = b"".join(b'--b\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n' % i for i in range(10_000))
    body += b"--b--\r\n"
    response = server.api("POST", "/transcription", data=body,
                          headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 400 and "too many form fields" in response.json()["error"]
    nothing_changed(server)


@pytest.mark.parametrize("pad,needle", [
    (b"X-Pad: " + b"a" * (3 * 1024 * 1024) + b"\r\n", "header size"),  # one line of megabytes
    (b"".join(b"X-Pad-%d: " % i + b"a" * 4000 + b"\r\n" for i in range(6)), "headers are longer than"),
])
def test_part_header_block_of_megabytes_is_refused(server, pad, needle):
    body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.wav"\r\n' + pad + b"\r\nRIFF\r\n--b--\r\n"
    response = server.api("POST", "/transcription", data=body,
                          headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert response.status_code == 400 and needle in response.json()["error"]
    nothing_changed(server)


def test_http_header_block_of_megabytes_is_refused(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        try:
            sock.sendall(raw_head(100, extra="X-Pad: " + "a" * (2 * 1024 * 1024) + "\r\n"))
        except (ConnectionResetError, BrokenPipeError):
            pass  # the server stopped reading: that is a refusal too
        status, _ = read_status(sock)
    assert status is None or 400 <= status < 500
    nothing_changed(server)
    still_serves(server)


def test_text_fields_streamed_past_the_limit_are_413(make_server):
    server = make_server(MAX_FILE_SIZE="1000")
    # Chunked (no Content-Length) and no file part: the count covers the whole body. Fields each
    # within the per-field and field-count limits (64 KiB, 64 fields), 2.4 MB in all: past
    # MAX_FILE_SIZE plus the form's 1 MiB allowance.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        try:
            sock.sendall(raw_head(None, boundary="b"))
            for i in range(40):
                part = (b"--b\r\n" if i == 0 else b"") + f'Content-Disposition: form-data; name="f{i}"\r\n\r\n'.encode() \
                    + b"x" * 60_000 + b"\r\n--b\r\n"
                sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        except (ConnectionResetError, BrokenPipeError):
            pass  # the server answered and stopped reading
        status, data = read_status(sock)
        try:
            while b"}" not in data and (more := sock.recv(65536)):  # the JSON body, then the close
                data += more
        except OSError:
            pass
    assert status == 413, data[:2000]
    assert b'"request body is larger than MAX_FILE_SIZE (1000 bytes) plus the form"' in data, data[:2000]
    nothing_changed(server)


@pytest.mark.parametrize("content_type,status", [
    ("text/plain", 415), ("application/x-www-form-urlencoded", 415), ("multipart/form-data", 400),
    ("multipart/form-data; boundary=" + "x" * 300, 400), ("multipart/mixed; boundary=b", 415),
])
def test_wrong_content_types(server, content_type, status):
    response = server.api("POST", "/transcription", data=FILE_PART + b"RIFF\r\n--b--\r\n",
                          headers={"Content-Type": content_type})
    assert response.status_code == status and response.json()["error"]
    nothing_changed(server)


def test_truncated_bodies_are_400(server):
    audio = make_wav(server.root / "a.wav", seconds=0.1).read_bytes()
    full = FILE_PART + audio + b"\r\n--b--\r\n"
    for cut in (10, len(FILE_PART) - 3, len(FILE_PART) + 100, len(full) - 4):
        response = server.api("POST", "/transcription", data=full[:cut],
                              headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert response.status_code == 400, cut
        assert response.json()["error"]
    nothing_changed(server)


def test_a_client_sending_a_byte_a_second_is_cut_off(make_server):
    server = make_server(WHISPER_API_TIMEOUT="2")
    started = time.monotonic()
    closed_after = None
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(raw_head(10_000) + FILE_PART)
        try:
            for _ in range(40):
                sock.sendall(b"\1")
                time.sleep(0.25)  # the slow client itself (4 bytes a second), not a wait
        except (ConnectionResetError, BrokenPipeError):
            closed_after = time.monotonic() - started
        if closed_after is None:
            status, _ = read_status(sock, timeout=1)
            closed_after = time.monotonic() - started
    assert 1.5 < closed_after < 8, f"cut off after {closed_after:.1f} s, not by WHISPER_API_TIMEOUT=2"
    nothing_changed(server)
    still_serves(server)


def test_too_many_uploads_at_once_are_429_then_accepted_again(make_server):
    # One address may hold every slot here: this is the global cap (the share: test_media_intake.py).
    server = make_server(WHISPER_MAX_PENDING_UPLOADS="3", WHISPER_UPLOAD_SHARE_PER_ADDRESS="1")
    slow = []
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(raw_head(100_000) + FILE_PART + b"\1" * 1000)
        slow.append(sock)
    wait_until(lambda: len([p for p in server.job_files() if "/.incoming/" in p]) >= 3, 10,
               "the three slow uploads to hold their slots")
    response = server.submit(diarize="false")
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "5"
    assert "too many uploads in progress (limit 3)" in response.json()["error"]
    assert server.rows("SELECT id FROM jobs") == []
    for sock in slow:
        sock.close()
    wait_until(lambda: server.submit(diarize="false").status_code != 429, 5, "a slot to be given back")
    assert len(server.rows("SELECT id FROM jobs")) == 1
    assert not [p for p in server.job_files() if ".incoming/" in p]


def test_many_parallel_uploads_end_cleanly(make_server):
    server = make_server(WHISPER_MAX_PENDING_UPLOADS="4")
    audio = make_wav(server.root / "a.wav", seconds=0.5).read_bytes()
    statuses = []

    def upload():
        try:
            response = server.api("POST", "/transcription", files={"file": ("a.wav", audio)},
                                  data={"diarize": "false"})
            statuses.append(response.status_code)
            assert response.json()  # JSON, always
        except requests.RequestException as exc:
            statuses.append(repr(exc))

    threads = [threading.Thread(target=upload) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert set(statuses) <= {202, 429}, statuses
    accepted = [r["id"] for r in server.rows("SELECT id FROM jobs")]
    assert len(accepted) == statuses.count(202)
    for path in server.job_files():
        assert any(job_id in path for job_id in accepted), path


def test_disk_below_the_floor_is_507_and_nothing_is_written(make_server):
    server = make_server(WHISPER_MIN_FREE_DISK_MB=str(10**9))
    assert "below WHISPER_MIN_FREE_DISK_MB" in server.log()
    response = server.submit(diarize="false")
    assert response.status_code == 507
    assert "WHISPER_MIN_FREE_DISK_MB=1000000000" in response.json()["error"]
    nothing_changed(server)
    still_serves(server)
