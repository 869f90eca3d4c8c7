"""Fetch by URL (`url=`): a local http.server on 127.0.0.1 that the server allow-lists, the refused
forms (proved refused before any connection or lookup), size limits, broken and stalled fetches.
Every request in this file goes to 127.0.0.1; the refused addresses are never contacted."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import REPO, free_port, make_wav
from whisperd import urlpolicy
from whisperd.errors import Kind
from whisperd.fetch import FetchError, MediaFetcher
from whisperd.urlpolicy import PolicyError

AUDIT_SITE = REPO / "tests" / "audit_site"
LIMIT = 300_000


class Media:
    """An HTTP server on 127.0.0.1 with the answers the tests need, logging every request path."""

    def __init__(self, root: Path) -> None:
        self.audio = make_wav(root / "served.wav").read_bytes()
        self.paths: list[str] = []
        self.port = free_port()
        media = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 (http.server's naming)
                media.paths.append(self.path)
                route = self.path.split("?")[0]
                if route == "/audio.wav":
                    self._send(200, media.audio, "audio/wav")
                elif route == "/page.html":
                    self._send(200, b"<html><body>not audio</body></html>" * 50, "text/html")
                elif route == "/big.wav":
                    self._send(200, media.audio + b"\0" * LIMIT, "audio/wav")
                elif route == "/big-chunked.wav":
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    piece = b"\0" * 50_000
                    try:
                        for _ in range(LIMIT // len(piece) + 3):
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        self.wfile.write(b"0\r\n\r\n")
                    except OSError:
                        pass  # the fetcher hung up at the limit
                elif route == "/broken.wav":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(media.audio)))
                    self.end_headers()
                    self.wfile.write(media.audio[:5000])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                elif route == "/stall.wav":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(media.audio)))
                    self.end_headers()
                    self.wfile.write(media.audio[:5000])
                    self.wfile.flush()
                    time.sleep(4)
                    self.close_connection = True
                elif route.startswith("/hop/"):
                    left = int(route.rsplit("/", 1)[1])
                    self._redirect(f"/hop/{left - 1}" if left > 0 else "/audio.wav")
                elif route == "/to":
                    self._redirect(self.path.split("?target=", 1)[1])
                elif route == "/missing":
                    self._send(404, b"no", "text/plain")
                else:
                    self._send(500, b"?", "text/plain")

            def _send(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

            def _redirect(self, location: str) -> None:
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def media(tmp_path):
    served = Media(tmp_path)
    yield served
    served.httpd.shutdown()


@pytest.fixture
def fetching(make_server, tmp_path):
    """A server that may fetch from 127.0.0.1 only (besides public addresses, which no test uses)."""
    audit = tmp_path / "socket-audit.log"
    server = make_server(WHISPER_FETCH_ALLOWED_HOSTS="127.0.0.1", MAX_FILE_SIZE=str(LIMIT),
                         WHISPER_FETCH_READ_TIMEOUT_SECONDS="1", WHISPERD_TEST_AUDIT=str(audit),
                         PYTHONPATH=str(AUDIT_SITE))
    server.audit = audit
    return server


def submit_url(server, url: str, **fields):
    parts = {"url": (None, url), **{k: (None, str(v)) for k, v in fields.items()}}
    return server.api("POST", "/transcription", files=parts)


def no_jobs_no_files(server) -> None:
    assert server.rows("SELECT count(*) AS n FROM jobs")[0]["n"] == 0
    assert server.job_files() == [], server.job_files()


def test_a_url_becomes_a_job_async_and_sync(fetching, media):
    response = submit_url(fetching, media.url("/audio.wav?token=secret-in-query"), language="en")
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert fetching.wait_status(job_id)["status"] == "Completed"
    assert fetching.job_audio(job_id) == media.audio
    row = fetching.rows("SELECT filename, upload_bytes FROM jobs WHERE id=?", (job_id,))[0]
    assert (row["filename"], row["upload_bytes"]) == ("audio.wav", len(media.audio))
    assert "secret-in-query" not in fetching.log()
    synced = submit_url(fetching, media.url("/hop/2"), sync="true")  # three redirects, then the audio
    assert synced.status_code == 200 and "text" in synced.json(), synced.text
    assert media.paths[-4:] == ["/hop/2", "/hop/1", "/hop/0", "/audio.wav"]


def test_refused_forms_are_400_before_any_connection_or_lookup(fetching, media):
    port = media.port
    refused = {
        f"http://127.0.0.2:{port}/audio.wav": "WHISPER_FETCH_ALLOWED_HOSTS",
        f"http://[::1]:{port}/audio.wav": "WHISPER_FETCH_ALLOWED_HOSTS",
        "http://169.254.169.254/latest/meta-data/": "WHISPER_FETCH_ALLOWED_HOSTS",
        "http://[::ffff:169.254.169.254]/latest/meta-data/": "WHISPER_FETCH_ALLOWED_HOSTS",
        f"http://2130706433:{port}/audio.wav": "dotted-decimal",
        f"http://0177.0.0.1:{port}/audio.wav": "dotted-decimal",
        f"http://0x7f.0.0.1:{port}/audio.wav": "dotted-decimal",
        "http://10.0.0.1/audio.wav": "WHISPER_FETCH_ALLOWED_HOSTS",
        "file:///etc/passwd": "http:// or https://",
        f"ftp://127.0.0.1:{port}/audio.wav": "http:// or https://",
        "gopher://127.0.0.1/": "http:// or https://",
        f"http://user:pw@127.0.0.1:{port}/audio.wav": "user:password@",
        "http:///audio.wav": "no host",
    }
    for url, words in refused.items():
        response = submit_url(fetching, url)
        assert response.status_code == 400, (url, response.text)
        assert words in response.json()["error"], (url, response.json())
        assert "pw" not in response.json()["error"]
    assert media.paths == []
    assert fetching.rows("SELECT count(*) AS n FROM jobs")[0]["n"] == 0
    # The audit hook is live: the one allowed fetch shows up as a connect to 127.0.0.1.
    allowed = submit_url(fetching, media.url("/audio.wav"))
    assert allowed.status_code == 202, allowed.text
    seen = fetching.audit.read_text()
    assert f"socket.connect ('127.0.0.1', {port})" in seen, seen
    for needle in ("169.254", "127.0.0.2", "2130706433", "0177", "0x7f", "10.0.0.1", "::1", "etc/passwd"):
        assert needle not in seen, (needle, seen)


def test_redirects_are_checked_again_and_limited(fetching, media):
    port = media.port
    for target, words in ((f"http://127.0.0.2:{port}/audio.wav", "127.0.0.2"),
                          (f"http://[::1]:{port}/audio.wav", "::1"),
                          ("http://169.254.169.254/latest/", "169.254.169.254"),
                          ("file:///etc/passwd", "http:// or https://")):
        response = submit_url(fetching, media.url(f"/to?target={target}"))
        assert response.status_code == 400 and words in response.json()["error"], response.text
    too_many = submit_url(fetching, media.url("/hop/5"))  # six redirects
    assert too_many.status_code == 400 and "more than 5 redirects" in too_many.json()["error"]
    seen = fetching.audit.read_text()
    assert "169.254" not in seen and "127.0.0.2" not in seen and "'::1'" not in seen, seen
    no_jobs_no_files(fetching)


def test_non_audio_too_large_broken_stalled_and_missing(fetching, media):
    outcomes = {
        "/page.html": (415, "not audio"),
        "/big.wav": (413, "MAX_FILE_SIZE"),
        "/big-chunked.wav": (413, "MAX_FILE_SIZE"),
        "/broken.wav": (502, "broke"),
        "/stall.wav": (504, "WHISPER_FETCH_READ_TIMEOUT_SECONDS"),
        "/missing": (400, "HTTP 404"),
    }
    for path, (status, words) in outcomes.items():
        response = submit_url(fetching, media.url(path))
        assert response.status_code == status and words in response.json()["error"], (path, response.text)
    no_jobs_no_files(fetching)


def test_one_source_only_and_url_with_a_file(fetching, media):
    audio = make_wav(fetching.root / "a.wav")
    both = fetching.api("POST", "/transcription", files={"file": ("a.wav", audio.read_bytes()),
                                                         "url": (None, media.url("/audio.wav"))})
    assert both.status_code == 400 and "one source" in both.json()["error"]
    assert media.paths == []
    no_jobs_no_files(fetching)


# -- in process: the guard refuses before a socket is opened, rebinding included ------------------


class _Config:
    WHISPER_FETCH_ALLOWED_HOSTS = ""  # public addresses only
    MAX_FILE_SIZE = LIMIT
    WHISPER_FETCH_CONNECT_TIMEOUT_SECONDS = 2.0
    WHISPER_FETCH_READ_TIMEOUT_SECONDS = 2.0
    WHISPER_FETCH_TIMEOUT_SECONDS = 5.0
    WHISPER_UPLOAD_MIN_BYTES_PER_SECOND = 65536  # the defaults: a fetch is held to the uploads' rate floor
    WHISPER_UPLOAD_RATE_WINDOW_SECONDS = 30.0


_AUDIT: list[tuple[str, object]] = []
_AUDITING = threading.Event()


def _audit(event, args):
    if _AUDITING.is_set() and event in ("socket.connect", "socket.getaddrinfo"):
        _AUDIT.append((event, args[1] if event == "socket.connect" else args[0]))


sys.addaudithook(_audit)  # hooks cannot be removed; it records only while a test asks


def test_in_process_refusals_make_no_connection_and_rebinding_is_caught(monkeypatch, tmp_path):
    class Rebinding:
        """Public at the submission check, loopback when the connection resolves (DNS rebinding)."""
        calls = 0

        async def resolve(self, host, port, family=socket.AF_UNSPEC):
            Rebinding.calls += 1
            address = "93.184.216.34" if Rebinding.calls == 1 else "127.0.0.2"
            return [(socket.AF_INET, (address, port))]

        def close(self):
            pass

    fetcher = MediaFetcher(_Config())

    async def scenario():
        for url in ("http://169.254.169.254/latest/meta-data/", "http://2130706433/", "http://0177.0.0.1/",
                    "http://[::1]/", "http://127.0.0.1/", "file:///etc/passwd"):
            with pytest.raises(PolicyError):
                await fetcher.check(url)
            with pytest.raises(PolicyError):
                await fetcher.fetch(url, tmp_path / "refused")
        monkeypatch.setattr(urlpolicy, "DefaultLoopResolver", Rebinding)
        await fetcher.check("http://media.example.test/a.wav")  # public at submission
        with pytest.raises(PolicyError) as caught:
            await fetcher.fetch("http://media.example.test/a.wav", tmp_path / "rebound")
        assert "resolves to 127.0.0.2" in str(caught.value)

    _AUDITING.set()
    try:
        asyncio.run(scenario())
    finally:
        _AUDITING.clear()
    assert Rebinding.calls == 2
    assert _AUDIT == [], _AUDIT  # no connect, no real lookup: every refusal came first
    assert not any((tmp_path / "rebound").glob("*")) and not any((tmp_path / "refused").glob("*"))


def test_in_process_fetch_errors_are_fetch_errors(tmp_path, media):
    class Loopback(_Config):
        WHISPER_FETCH_ALLOWED_HOSTS = "127.0.0.1"

    fetcher = MediaFetcher(Loopback())

    async def scenario():
        path, size, name = await fetcher.fetch(media.url("/hop/1"), tmp_path / "ok")
        assert path.read_bytes() == media.audio and size == len(media.audio) and name == "audio.wav"
        with pytest.raises(FetchError) as too_big:
            await fetcher.fetch(media.url("/big-chunked.wav"), tmp_path / "big")
        assert too_big.value.kind is Kind.TOO_LARGE

    asyncio.run(scenario())
