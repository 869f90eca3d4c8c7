"""Hostile media and shared resources (issue 13), through real HTTP against a real server.

Media: only allow-listed containers, decided by what ffprobe finds (never the file's name),
are opened; nothing that names other files; the declared duration is checked before anything is
decoded; the engine gets a canonical 16 kHz mono WAV made from the job's own file only.
Shared resources: a queue cap, a job time limit scaled to the audio, upload slots that a
trickling body or one address cannot hold, and token failures that cannot burn the CPU.
"""

from __future__ import annotations

import os
import secrets
import socket
import stat
import subprocess
import threading
import time
import uuid
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import JFK, JFK_TEXT, REPO, TOKEN, alive, make_wav, wait_until, words

# -- helpers ------------------------------------------------------------------------------------


class Tripwire:
    """A named pipe at `path`: if anything opens it for reading, `tripped` is set."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        self.path = path
        self.tripped = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        fd = os.open(self.path, os.O_WRONLY)  # returns only once a reader has the pipe open
        if not self._closing:
            self.tripped.set()
        os.close(fd)

    def close(self) -> bool:
        """Whether anything opened the pipe; then unblock our own writer."""
        tripped = self.tripped.is_set()
        self._closing = True
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self._thread.join(5)
        os.close(fd)
        return tripped


def post_file(server, name: str, content: bytes, token: str = TOKEN, timeout: float = 30, **fields):
    data = {"diarize": "false", **fields}
    return server.api("POST", "/transcription", token=token, files={"file": (name, content)}, data=data,
                      timeout=timeout)


def no_job_and_no_upload(server, ignore: tuple[str, ...] = ()) -> None:
    assert server.rows("SELECT id FROM jobs") == []

    def left() -> list[str]:
        return [p for p in server.job_files() if not any(p.startswith(str(i)) for i in ignore)]

    wait_until(lambda: not left(), 3, "no file of the refused upload left on disk")


def incoming(server) -> list[str]:
    return [p for p in server.job_files() if "/.incoming/" in p]


def multipart(fields: dict[str, str], name: str, content: bytes, boundary: str = "b") -> bytes:
    body = b""
    for key, value in fields.items():
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
    body += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
             "Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body


def raw_request(server, method: str, path: str, source: str = "127.0.0.1", headers: dict | None = None,
                body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request from a chosen loopback source address (requests cannot pick one)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30, source_address=(source, 0)) as sock:
        sock.sendall(head.encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    found = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), found, rest


def slow_upload(server, source: str = "127.0.0.1", declared: int = 1_000_000) -> socket.socket:
    """A connection that declares a big body and sends only its start: it holds an upload slot."""
    sock = socket.create_connection(("127.0.0.1", server.port), source_address=(source, 0))
    sock.sendall((f"POST /transcription HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                  f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {declared}\r\n\r\n").encode()
                 + b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.wav"\r\n\r\n' + b"\1" * 1000)
    return sock


def read_answer(sock: socket.socket, timeout: float) -> tuple[int | None, bytes]:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, BrokenPipeError, socket.timeout):
        pass
    if not data.startswith(b"HTTP/1.1 "):
        return None, data
    return int(data[9:12]), data


def scrape(server) -> dict[tuple[str, tuple], float]:
    response = server.api("GET", "/metrics", token=None)
    assert response.status_code == 200, response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(server, name: str, **labels) -> float:
    return scrape(server).get((name, tuple(sorted(labels.items()))), 0.0)


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True, timeout=120)


def playlist(target: str, live: bool = False) -> bytes:
    if live:  # no end: ffmpeg would wait for the next segment for as long as it is told
        return f"#EXTM3U\n#EXT-X-TARGETDURATION:600\n#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:600,\n{target}\n".encode()
    return f"#EXTM3U\n#EXT-X-TARGETDURATION:20\n#EXTINF:11,\n{target}\n#EXT-X-ENDLIST\n".encode()


@pytest.fixture(scope="module")
def ten_hour_flac(tmp_path_factory) -> Path:
    """Ten hours of silence in a few kilobytes: the decompression bomb of the issue."""
    path = tmp_path_factory.mktemp("bomb") / "silence.flac"
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=1000:cl=mono", "-t", "36000", "-c:a", "flac",
           "-frame_size", "65535", str(path))
    assert path.stat().st_size < 100_000
    return path


# -- files that name other files ------------------------------------------------------------------


@pytest.mark.parametrize("upload_name", ["x.m3u8", "x.wav", "x.mp3"])
def test_a_playlist_naming_server_files_is_415_and_nothing_is_read(make_server, tmp_path, upload_name):
    server = make_server()
    # Another job's audio (as a tripwire: a pipe that tells when it is opened) and an absolute path.
    other_job = str(uuid.uuid4())
    other_dir = Path(server.env["WHISPER_TMP_FILES"]) / other_job
    wires = [Tripwire(other_dir / "audio.wav"), Tripwire(tmp_path / "secret.flac")]
    targets = [f"../{other_job}/audio.wav", f"../../{other_job}/audio.wav", str(tmp_path / "secret.flac")]
    try:
        for target in targets:
            response = post_file(server, upload_name, playlist(target))
            assert response.status_code == 415, (target, response.text)
            error = response.json()["error"]
            assert f"'{upload_name}' is not audio" in error
            assert "hls, a playlist: it names other files" in error
            assert target not in error and str(tmp_path) not in error
    finally:
        tripped = [wire.close() for wire in wires]
    assert tripped == [False, False], "ffprobe or ffmpeg opened a file the playlist named"
    assert server.engine_runs() == []
    no_job_and_no_upload(server, ignore=(str(other_dir),))


def test_a_playlist_cannot_reach_another_jobs_audio(make_server):
    server = make_server(FAKE_WHISPERX_SLOW_SECONDS="10")
    victim = server.submit_ok(prompt="fake:slow", diarize="false")
    server.wait_status(victim, ("Processing",))
    for target in (f"../{victim}/audio.wav", f"../../{victim}/audio.wav",
                   str(Path(server.env["WHISPER_TMP_FILES"]) / victim / "audio.wav")):
        response = post_file(server, "steal.m3u8", playlist(target))
        assert response.status_code == 415 and "playlist" in response.json()["error"]
    assert [r["id"] for r in server.rows("SELECT id FROM jobs")] == [victim]


def test_an_ffconcat_list_is_415(server, tmp_path):
    wire = Tripwire(tmp_path / "secret.wav")
    try:
        for name in ("list.ffconcat", "list.wav"):
            response = post_file(server, name, f"ffconcat version 1.0\nfile '{wire.path}'\n".encode())
            assert response.status_code == 415
            assert "concat, a concat list: it names other files" in response.json()["error"]
    finally:
        assert wire.close() is False
    no_job_and_no_upload(server)


def test_a_live_playlist_is_415_without_waiting(server, tmp_path):
    segment = make_wav(tmp_path / "seg.wav")
    started = time.monotonic()
    response = post_file(server, "live.m3u8", playlist(str(segment), live=True))
    assert response.status_code == 415 and "playlist" in response.json()["error"]
    # Generous (the machine is shared): the point is that it did not wait for a 600 s segment.
    assert time.monotonic() - started < 25
    no_job_and_no_upload(server)


def test_images_and_subtitles_are_refused_by_what_they_are(server, tmp_path):
    png = tmp_path / "x.png"
    ffmpeg("-f", "lavfi", "-i", "color=c=red:s=8x8", "-frames:v", "1", str(png))
    subtitles = b"1\n00:00:00,000 --> 00:00:02,000\nHello\n\n2\n00:00:02,000 --> 00:00:04,000\nWorld\n"
    for name, content, found in (("photo.wav", png.read_bytes(), "an image"),
                                 ("talk.mp3", subtitles, "subtitles")):
        response = post_file(server, name, content)
        assert response.status_code == 415, response.text
        assert found in response.json()["error"]
    no_job_and_no_upload(server)


# -- duration ---------------------------------------------------------------------------------------


def test_a_ten_hour_flac_is_413_before_anything_is_decoded(server, ten_hour_flac):
    hwm_before = _peak_rss_kib(server.proc.pid)
    response = post_file(server, "silence.flac", ten_hour_flac.read_bytes())
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    # "lasts 10 hours" is the declared duration: the decoded one would read "more than 4 hours".
    assert "lasts 10 hours (36000 s)" in error and "at most 4 hours (WHISPER_MAX_AUDIO_SECONDS=14400)" in error
    assert _peak_rss_kib(server.proc.pid) - hwm_before < 50 * 1024
    assert server.engine_runs() == []
    no_job_and_no_upload(server)


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_duration_the_file_hides_is_caught_by_the_decode(make_server, tmp_path):
    server = make_server(WHISPER_MAX_AUDIO_SECONDS="5")
    flac = tmp_path / "twenty.flac"
    ffmpeg("-f", "lavfi", "-i", "sine=d=20", "-ar", "16000", str(flac))
    data = bytearray(flac.read_bytes())
    data[21] &= 0xF0  # STREAMINFO's total sample count: 0, "unknown"
    data[22:26] = b"\0\0\0\0"
    response = post_file(server, "twenty.flac", bytes(data))
    assert response.status_code == 413, response.text
    assert "lasts more than 5 seconds" in response.json()["error"]
    no_job_and_no_upload(server)
    short = tmp_path / "two.flac"
    ffmpeg("-f", "lavfi", "-i", "sine=d=2", "-ar", "16000", str(short))
    assert post_file(server, "two.flac", short.read_bytes()).status_code == 202


# -- the canonical file ---------------------------------------------------------------------------


def test_the_engine_gets_a_canonical_wav_made_from_the_upload(server, tmp_path):
    mp3 = tmp_path / "tone.mp3"
    ffmpeg("-f", "lavfi", "-i", "sine=d=1.5:f=440", "-ar", "44100", "-ac", "2", str(mp3))
    # The name says FLAC; ffprobe says MP3: what the file is decides.
    response = post_file(server, "tone.flac", mp3.read_bytes(), prompt="fake:slow")
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    server.wait_status(job_id, ("Processing",))
    job_dir = Path(server.env["WHISPER_TMP_FILES"]) / job_id
    # (on the S3 backend the job's directory is the worker's scratch copy, fetched once it claimed the job)
    wait_until(lambda: (job_dir / "audio.wav").exists(), 10, "the job's audio in its directory")
    assert sorted(p.name for p in job_dir.iterdir()) == ["audio.wav"]  # the original is gone
    with wave.open(str(job_dir / "audio.wav")) as canonical:
        assert (canonical.getframerate(), canonical.getnchannels(), canonical.getsampwidth()) == (16000, 1, 2)
        assert 1.4 < canonical.getnframes() / 16000 < 1.7
    server.wait_status(job_id)
    (run,) = server.engine_runs()
    assert run["argv"][1] == str(job_dir / "audio.wav")
    (row,) = server.rows("SELECT audio_seconds, upload_bytes FROM jobs")
    assert 1.4 < row["audio_seconds"] < 1.7 and row["upload_bytes"] == mp3.stat().st_size


def test_without_ffmpeg_uploads_are_503_not_passed_through(make_server):
    server = make_server(WHISPER_FFMPEG="/nonexistent/ffmpeg")
    assert "WHISPER_FFMPEG=/nonexistent/ffmpeg not found" in server.log()
    response = server.submit(diarize="false")
    assert response.status_code == 503
    assert "WHISPER_FFMPEG=/nonexistent/ffmpeg is not installed" in response.json()["error"]
    no_job_and_no_upload(server)


def test_a_forced_error_after_intake_leaves_no_staged_file(make_server):
    server = make_server(WHISPERD_FAIL_AT="intake-done")
    response = server.submit(diarize="false")
    assert response.status_code == 500
    assert response.json() == {"error": "internal server error (see the server log)"}
    assert "injected failure at intake-done" in server.log()
    no_job_and_no_upload(server)
    assert incoming(server) == []


def test_numbers_in_forms_are_ascii_digits(server):
    for index in ("²", "٣", "1²"):
        response = server.submit(diarize="false", device_index=index)
        assert response.status_code == 400, index
        assert "'device_index' must be a whole number" in response.json()["error"]
    no_job_and_no_upload(server)


# -- time limit -------------------------------------------------------------------------------------


def test_a_hanging_engine_is_stopped_by_the_limit_scaled_to_its_audio(make_server):
    server = make_server(WHISPER_JOB_TIMEOUT_BASE_SECONDS="1", WHISPER_JOB_TIMEOUT_PER_AUDIO_SECOND="1.5")
    job_id = server.submit_ok(prompt="fake:hang", diarize="false")  # 1 s of audio: 2.5 s
    status = server.wait_status(job_id, ("Failed",), timeout=30)
    assert "ran longer than its time limit (2.5 s: WHISPER_JOB_TIMEOUT_BASE_SECONDS + " \
           "WHISPER_JOB_TIMEOUT_PER_AUDIO_SECOND x 1 s of audio)" in status["data"]
    assert "whole process group was killed" in status["data"]
    (run,) = server.engine_runs()
    assert not alive(run["pid"])
    assert server.submit_ok(diarize="false")  # the next job runs


def test_the_warm_worker_job_is_stopped_by_the_scaled_limit(make_server):
    server = make_server(WHISPER_ENGINE="worker", WHISPER_KILL_GRACE_SECONDS="0.5",
                         WHISPER_JOB_TIMEOUT_BASE_SECONDS="2", WHISPER_JOB_TIMEOUT_PER_AUDIO_SECOND="1")
    job_id = server.submit_ok(prompt="fake:hang", diarize="false")
    status = server.wait_status(job_id, ("Failed",), timeout=40)
    assert "ran longer than its time limit (3 s:" in status["data"]
    after = server.submit_ok(diarize="false")
    assert server.wait_status(after, timeout=40)["status"] == "Completed"


# -- the queue ----------------------------------------------------------------------------------------


def test_a_full_queue_is_429_and_nothing_is_written(make_server):
    server = make_server(WHISPER_MAX_QUEUED_JOBS="2", FAKE_WHISPERX_SLOW_SECONDS="20")
    running = server.submit_ok(prompt="fake:slow", diarize="false")
    server.wait_status(running, ("Processing",))
    queued = [server.submit_ok(diarize="false") for _ in range(2)]
    response = server.submit(diarize="false")
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "30"
    assert "the queue is full (2 jobs waiting, WHISPER_MAX_QUEUED_JOBS=2)" in response.json()["error"]
    assert len(server.rows("SELECT id FROM jobs")) == 3
    assert incoming(server) == []
    for job_id in queued:
        assert job_id in " ".join(server.job_files())
    server.api("DELETE", f"/transcription/{queued[0]}")
    assert server.submit(diarize="false").status_code == 202  # room again


# -- upload slots -------------------------------------------------------------------------------------


def test_a_trickling_body_is_cut_and_its_slot_freed(make_server):
    server = make_server(WHISPER_UPLOAD_MIN_BYTES_PER_SECOND="2000", WHISPER_UPLOAD_RATE_WINDOW_SECONDS="1",
                         WHISPER_MAX_PENDING_UPLOADS="1")
    sock = slow_upload(server)
    try:
        for _ in range(15):  # 50 bytes a second, far below 2000
            sock.sendall(b"\1" * 10)
            time.sleep(0.2)  # the trickling client itself, not a wait
    except (BrokenPipeError, ConnectionResetError):
        pass
    status, data = read_answer(sock, timeout=5)
    sock.close()
    assert status == 408, data[:500]
    assert b"the upload was too slow" in data and b"WHISPER_UPLOAD_MIN_BYTES_PER_SECOND" in data
    no_job_and_no_upload(server)
    assert metric(server, "whisperd_uploads_cut_total") == 1
    assert server.submit(diarize="false").status_code == 202  # the one slot is free again


def test_one_address_cannot_hold_every_upload_slot(make_server):
    server = make_server(WHISPER_MAX_PENDING_UPLOADS="4", WHISPER_UPLOAD_MIN_BYTES_PER_SECOND="0")
    held = [slow_upload(server) for _ in range(2)]  # the default share: half of 4
    try:
        wait_until(lambda: len(incoming(server)) >= 2, 10, "the two slow uploads to hold their slots")
        response = server.submit(diarize="false")
        assert response.status_code == 429 and response.headers["Retry-After"] == "5"
        assert "this client address already has 2 uploads in progress" in response.json()["error"]
        body = multipart({"diarize": "false"}, "a.wav", server.default_audio.read_bytes())
        status, _, answer = raw_request(server, "POST", "/transcription", source="127.0.0.2", body=body, headers={
            "Authorization": f"Bearer {TOKEN}", "Content-Type": "multipart/form-data; boundary=b"})
        assert status == 202, answer
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: server.submit(diarize="false").status_code == 202, 5, "the slots to be given back")


# -- token failures -----------------------------------------------------------------------------------


def test_a_burst_of_bad_tokens_for_a_live_prefix_does_not_burn_hashes(make_server):
    # Two failures a minute (one every 30 s after the first two): the test's steps stay well
    # inside one refill, whatever the machine's load.
    server = make_server(WHISPER_API_ALLOW_ANY_TOKEN="false", WHISPER_AUTH_FAILURES_PER_MINUTE="2")
    alice = server.create_token("alice")
    bob = server.create_token("bob")
    prefix = alice.split("_")[1]
    assert server.api("GET", "/status", token=alice).status_code == 200
    assert metric(server, "whisperd_token_hashes_total") == 1

    wrong = f"wd_{prefix}_" + "0" * 48
    assert server.api("GET", "/status", token=wrong).status_code == 401
    assert server.api("GET", "/status", token=wrong).status_code == 401  # remembered: no second hash
    assert metric(server, "whisperd_token_hashes_total") == 2
    assert metric(server, "whisperd_auth_refused_total", why="remembered") == 1

    def attempt(_):
        response = server.api("GET", "/status", token=f"wd_{prefix}_{secrets.token_hex(24)}")
        return response.status_code, response.headers.get("Retry-After")

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(attempt, range(200)))
    statuses = [status for status, _ in answers]
    assert set(statuses) <= {401, 429}
    assert statuses.count(429) >= 195, statuses.count(429)
    assert all(after and 1 <= int(after) <= 30 for status, after in answers if status == 429)
    hashes = metric(server, "whisperd_token_hashes_total")
    assert hashes <= 2 + 1 + 1, hashes  # the allowance left, plus one refill at most: not one per request

    # The same prefix from another address: the prefix has spent its failures too.
    status, headers, _ = raw_request(server, "GET", "/status", source="127.0.0.3",
                                     headers={"Authorization": f"Bearer wd_{prefix}_{secrets.token_hex(24)}"})
    assert status == 429 and int(headers["retry-after"]) >= 1
    # This address has spent its failures, so a token never verified here waits; from another
    # address the same token is checked (one hash).
    status, _, _ = raw_request(server, "GET", "/status", headers={"Authorization": f"Bearer {bob}"})
    assert status == 429
    status, _, _ = raw_request(server, "GET", "/status", source="127.0.0.2", headers={"Authorization": f"Bearer {bob}"})
    assert status == 200
    assert metric(server, "whisperd_token_hashes_total") == hashes + 1
    # The holder of the attacked prefix, verified before, is not throttled, and a job still runs.
    assert server.api("GET", "/status", token=alice).status_code == 200
    job_id = server.submit_ok(token=alice, diarize="false")
    assert server.wait_status(job_id, token=alice)["status"] == "Completed"


# -- /status ----------------------------------------------------------------------------------------


def test_status_shows_engine_and_address_to_admins_only(make_server):
    server = make_server(WHISPER_API_ALLOW_ANY_TOKEN="false")
    alice = server.create_token("alice")
    root = server.create_token("root", "--admin")
    ordinary = server.api("GET", "/status", token=alice).json()
    assert "engine" not in ordinary
    assert set(ordinary["server"]) == {"timeout", "keepalive", "worker_number"}
    assert set(ordinary) == {"server", "processing", "resources", "security", "queue_state", "error"}
    assert ordinary["queue_state"] == {"queued_jobs": 0, "processing_jobs": 0}
    admin = server.api("GET", "/status", token=root).json()
    assert admin["engine"]["mode"] == "cli"
    assert admin["server"]["host"] == "127.0.0.1" and admin["server"]["port"] == str(server.port)


# -- webhook addresses that embed IPv4 -------------------------------------------------------------


@pytest.mark.parametrize("host", ["[::7f00:1]", "[::ffff:127.0.0.1]", "[64:ff9b::7f00:1]", "[2002:7f00:1::1]",
                                  "[2001:0:4136:e378:8000:63bf:80ff:fffe]", "[::ffff:a00:1]", "[64:ff9b::a9fe:a9fe]"])
def test_ipv6_forms_of_private_ipv4_are_refused_as_callbacks(make_server, host):
    server = make_server(WHISPER_WEBHOOK_SECRET="s3cret")
    response = server.submit(diarize="false", callback_url=f"http://{host}:8080/hook")
    assert response.status_code == 400, response.text
    assert "not allowed by WHISPER_WEBHOOK_ALLOWED_HOSTS" in response.json()["error"]
    no_job_and_no_upload(server)


# -- the newcomer token ---------------------------------------------------------------------------


def test_the_newcomer_token_goes_to_stdout_never_to_the_log_stream(make_server, tmp_path):
    server = make_server(WHISPER_API_ALLOW_ANY_TOKEN="false")
    env = {**server.env, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    script = str(REPO / "scripts" / "newcomer.sh")
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        subprocess.run([script], env=env, stdout=stdout, stderr=stderr, check=True, timeout=60,
                       start_new_session=True)  # no terminal
    token = next(line.strip() for line in out.read_text().splitlines() if line.strip().startswith("wd_"))
    assert token not in err.read_text()
    assert server.api("GET", "/status", token=token).status_code == 200

    # stdout and stderr one stream (2>&1 into a log) and no terminal: not printed at all.
    assert server.cli("token", "revoke", "newcomer").returncode == 0
    log = tmp_path / "log.txt"
    with log.open("wb") as both:
        subprocess.run([script], env=env, stdout=both, stderr=both, check=True, timeout=60, start_new_session=True)
    saved = tmp_path / "config" / "whisperd" / "newcomer-token"
    token = saved.read_text().strip()
    assert token.startswith("wd_") and token not in log.read_text() and str(saved) in log.read_text()
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert server.api("GET", "/status", token=token).status_code == 200


# -- the real engine --------------------------------------------------------------------------------


@pytest.mark.engine
@pytest.mark.parametrize("engine", ["cli", "worker"])
def test_jfk_is_transcribed_from_its_canonical_file(make_server, engine):
    assert JFK.is_file(), f"the shared fixture {JFK} is missing"
    server = make_server(WHISPER_ENGINE=engine, WHISPER_CMD=str(REPO / "whisperx.sh"),
                         WHISPER_MODELS_DIR=str(REPO / "models"), SYNC_REQUEST_TIMEOUT_SECONDS="300", RUST_LOG="info")
    # Named .mp3, holding FLAC: the probe's finding, not the name, picks the demuxer.
    response = post_file(server, "jfk.mp3", JFK.read_bytes(), timeout=300, sync="true", language="en",
                         response_format="json")
    assert response.status_code == 200, response.text
    heard = words(response.json()["text"])
    expected = words(JFK_TEXT)
    assert len(set(heard) & set(expected)) >= len(set(expected)) - 2, heard
    (row,) = server.rows("SELECT audio_seconds FROM jobs")
    assert 10.5 < row["audio_seconds"] < 11.5


# -- jobs queued before intake existed ---------------------------------------------------------------


def test_jobs_queued_by_an_older_version_pass_intake_before_they_run(make_server, tmp_path):
    server = make_server(WHISPER_STORAGE_URL="")  # older versions kept jobs in the local directories only
    server.stop()
    mp3 = tmp_path / "tone.mp3"
    ffmpeg("-f", "lavfi", "-i", "sine=d=1", str(mp3))
    legacy = {"audio.mp3": mp3.read_bytes(), "audio.m3u8": playlist(str(JFK))}
    ids = {}
    with server.db() as conn:
        for name, content in legacy.items():
            job_id = ids[name] = str(uuid.uuid4())
            directory = Path(server.env["WHISPER_TMP_FILES"]) / job_id
            directory.mkdir(parents=True)
            (directory / name).write_bytes(content)
            conn.execute("INSERT INTO jobs (id, owner, status, created_at, filename, upload_bytes, language, model,"
                         " response_format, diarize, prompt, device, device_index, warnings) VALUES"
                         " (?, 'anyone', 'Queued', '2026-01-01T00:00:00.000Z', ?, ?, 'en', 'tiny.en', 'json', 0, '',"
                         " 'cpu', '0', '[]')", (job_id, name, len(content)))
    server.restart()
    done = server.wait_status(ids["audio.mp3"])
    assert done["status"] == "Completed", done
    (run,) = server.engine_runs()
    assert run["argv"][1].endswith(f"/{ids['audio.mp3']}/audio.wav")
    refused = server.wait_status(ids["audio.m3u8"])
    assert refused["status"] == "Failed" and "hls, a playlist" in refused["data"]
