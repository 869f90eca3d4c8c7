"""Fetch by URL: the media a client names with `url=`, streamed to disk behind the SSRF guard.

The request goes through Tornado's TCPClient with urlpolicy's CheckingResolver, so the address
the socket connects to is the one the policy checked (DNS rebinding), for the first request and
for each of at most MAX_REDIRECTS redirects, whose URLs are checked again as if a client had sent
them. The body goes to disk chunk by chunk and stops at MAX_FILE_SIZE (or the caller's lower
limit). Three clocks: connect, silence between two reads, and the whole fetch; and the uploads'
rate floor (ratefloor.py), so that a server trickling a byte now and then cannot hold the
request's upload slot for the whole fetch time. Whoever calls fetch() owns the directory and
removes it on any error: nothing here is left behind by the caller's cleanup.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urljoin, urlsplit

from tornado import httputil
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.iostream import StreamClosedError
from tornado.tcpclient import TCPClient

from .errors import Kind, ServiceError
from .config import Config
from .jobfiles import UPLOAD_NAME, display_name
from .integers import BadInteger, strict_int
from .ratefloor import RateFloor
from .urlpolicy import CheckingResolver, HostPolicy, PolicyError, check_url, resolve_checked

log = logging.getLogger("whisperd.fetch")
MAX_REDIRECTS = 5
MAX_HEADER_BYTES = 64 * 1024
FIELD = "url"
CREDENTIALS_HINT = "put a token the media's server accepts in the URL's query instead, or upload the file"


class FetchError(ServiceError):
    """The fetch did not give us a file: the Kind of refusal and a message that says why."""


def fetch_policy(config: Config) -> HostPolicy:
    """Public addresses, plus WHISPER_FETCH_ALLOWED_HOSTS: the same HostPolicy webhooks use."""
    return HostPolicy.parse(config.WHISPER_FETCH_ALLOWED_HOSTS, setting="WHISPER_FETCH_ALLOWED_HOSTS",
                            subject="url", public=True)


def shown(url: str) -> str:
    """scheme://host:port/path, for messages and logs: a query may carry the media server's token."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path or '/'}"


class _Body(httputil.HTTPMessageDelegate):
    """Receives one response: the status and headers, and (for a 200 only) the body into a file."""

    def __init__(self, sink: BinaryIO, url: str, stream, max_bytes: int, limit_name: str,
                 rate: RateFloor) -> None:
        self.max_bytes = max_bytes
        self.limit_name = limit_name
        self.rate = rate
        self.declared: int | None = None
        self.sink = sink
        self.url = url
        self.stream = stream
        self.error: FetchError | None = None
        self.code = 0
        self.headers = httputil.HTTPHeaders()
        self.received = 0
        self.last_read = asyncio.get_running_loop().time()

    def headers_received(self, start_line, headers) -> None:  # type: ignore[override]
        self.last_read = asyncio.get_running_loop().time()
        self.code = start_line.code
        self.headers = headers
        length = headers.get("Content-Length")
        if length is None:
            return
        try:
            self.declared = strict_int(length, "Content-Length")
        except BadInteger:
            self._stop(FetchError(Kind.UPSTREAM_FAILED, f"the media's server sent a Content-Length that is not a number "
                                       f"({length[:40]!r}) for {shown(self.url)}"))
            return
        if self.code == 200 and self.declared > self.max_bytes:
            self._stop(FetchError(Kind.TOO_LARGE, f"the media at {shown(self.url)} is {length} bytes, larger than "
                                       f"{self.limit_name} ({self.max_bytes} bytes)"))
        elif self.code == 200:
            self.rate.declared = self.declared

    def data_received(self, chunk: bytes) -> None:  # type: ignore[override]
        self.last_read = asyncio.get_running_loop().time()
        if self.code != 200 or self.error is not None:
            return  # a redirect's or an error's body: not ours to keep
        self.received += len(chunk)
        self.rate.add(len(chunk))
        if self.received > self.max_bytes:
            self._stop(FetchError(Kind.TOO_LARGE, f"the media at {shown(self.url)} is larger than {self.limit_name} "
                                       f"({self.max_bytes} bytes); the fetch was stopped there"))
            return
        try:
            self.sink.write(chunk)  # small sequential writes, as for uploads
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            self._stop(FetchError(Kind.STORAGE_FULL if full else Kind.INTERNAL, "the server's upload disk is full; try again later" if full
                                  else f"could not write the fetched media: {exc.strerror}"))

    def _stop(self, error: FetchError) -> None:
        # Raising here would be logged by Tornado as an uncaught error: hang up instead, and
        # let _get() raise the reason once the read ends.
        self.error = error
        self.stream.close()


class MediaFetcher:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.policy = fetch_policy(config)
        self.max_bytes = config.MAX_FILE_SIZE
        self.connect_timeout = config.WHISPER_FETCH_CONNECT_TIMEOUT_SECONDS
        self.read_timeout = config.WHISPER_FETCH_READ_TIMEOUT_SECONDS
        self.total_timeout = config.WHISPER_FETCH_TIMEOUT_SECONDS
        self._tcp = TCPClient(resolver=CheckingResolver(policy=self.policy))

    async def check(self, url: str) -> None:
        """At submission, before anything connects: PolicyError when the URL may not be fetched."""
        _scheme, host, port = check_url(url, FIELD, CREDENTIALS_HINT)
        try:
            await resolve_checked(self.policy, host, port)
        except OSError as exc:
            raise PolicyError(str(exc)) from None

    async def fetch(self, url: str, directory: Path, max_bytes: int | None = None,
                    limit_name: str = "MAX_FILE_SIZE") -> tuple[Path, int, str]:
        """Download into directory/upload; (path, bytes, display name) or FetchError/PolicyError.

        max_bytes (named limit_name in refusals): the caller's own limit, below MAX_FILE_SIZE."""
        if max_bytes is None or max_bytes > self.max_bytes:
            max_bytes, limit_name = self.max_bytes, "MAX_FILE_SIZE"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total_timeout
        directory.mkdir(parents=True, exist_ok=True)
        for hop in range(MAX_REDIRECTS + 1):
            check_url(url, FIELD, CREDENTIALS_HINT)  # a redirect's target too
            name = unquote(urlsplit(url).path.rsplit("/", 1)[-1]) or "download"
            path = directory / UPLOAD_NAME  # the name's extension decides nothing (intake.py)
            try:
                with path.open("wb") as sink:
                    body = await self._get(url, sink, deadline, max_bytes, limit_name)
            except BaseException:
                path.unlink(missing_ok=True)  # refused, broken, cancelled: no partial file stays
                raise
            if body.code in (301, 302, 303, 307, 308):
                path.unlink(missing_ok=True)
                location = body.headers.get("Location")
                if not location:
                    raise FetchError(Kind.UPSTREAM_FAILED, f"{shown(url)} answered HTTP {body.code} without a Location")
                if hop == MAX_REDIRECTS:
                    raise FetchError(Kind.INVALID, f"url: more than {MAX_REDIRECTS} redirects, starting at {shown(url)}")
                url = urljoin(url, location.strip())
                continue
            if body.code != 200:
                path.unlink(missing_ok=True)
                kind = Kind.INVALID if 400 <= body.code < 500 else Kind.UPSTREAM_FAILED
                raise FetchError(kind, f"the media's server answered HTTP {body.code} for {shown(url)}")
            if body.received == 0:
                path.unlink(missing_ok=True)
                raise FetchError(Kind.INVALID, f"the media at {shown(url)} is empty")
            return path, body.received, display_name(name)
        raise AssertionError("unreachable")

    async def _get(self, url: str, sink: BinaryIO, deadline: float, max_bytes: int, limit_name: str) -> _Body:
        loop = asyncio.get_running_loop()
        scheme, host, port = check_url(url, FIELD, CREDENTIALS_HINT)
        tls = ssl.create_default_context() if scheme == "https" else None
        connect_for = min(self.connect_timeout, deadline - loop.time())
        if connect_for <= 0:
            raise FetchError(Kind.TIMED_OUT, f"fetching the media took longer than WHISPER_FETCH_TIMEOUT_SECONDS "
                                  f"({self.total_timeout:g} s)")
        try:
            stream = await self._tcp.connect(host, port, ssl_options=tls, timeout=connect_for,
                                             max_buffer_size=4 * 1024 * 1024)
        except PolicyError:
            raise
        except asyncio.TimeoutError:
            raise FetchError(Kind.TIMED_OUT, f"could not connect to {shown(url)} within {connect_for:g} s") from None
        except (OSError, StreamClosedError, ssl.SSLError) as exc:
            raise FetchError(Kind.UPSTREAM_FAILED, f"could not connect to {shown(url)}: {_why(exc)}") from None
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection = HTTP1Connection(stream, True, HTTP1ConnectionParameters(
            no_keep_alive=True, max_header_size=MAX_HEADER_BYTES, max_body_size=2 * self.max_bytes + 1,
            decompress=False, chunk_size=256 * 1024))
        slow: list[str] = []

        def too_slow(got: int) -> None:  # the media's server trickles: it must not hold an upload slot
            slow.append(f"the media's server at {shown(url)} sent {rate.message(got)}; the fetch was stopped")
            stream.close()

        rate = RateFloor(self.config, too_slow)
        body = _Body(sink, url, stream, max_bytes, limit_name, rate)
        headers = httputil.HTTPHeaders({"Host": parts.netloc, "User-Agent": "whisperd-fetch/1",
                                        "Accept": "audio/*, video/*, */*;q=0.5", "Accept-Encoding": "identity",
                                        "Connection": "close"})
        timed_out: str | None = None
        try:
            connection.write_headers(httputil.RequestStartLine("GET", target, "HTTP/1.1"), headers)
            connection.finish()
            rate.start()
            reading = asyncio.ensure_future(connection.read_response(body))
            while not reading.done():
                now = loop.time()
                idle_left = body.last_read + self.read_timeout - now
                total_left = deadline - now
                if idle_left <= 0 or total_left <= 0:
                    timed_out = (f"no data from {shown(url)} for {self.read_timeout:g} s "
                                 "(WHISPER_FETCH_READ_TIMEOUT_SECONDS)" if idle_left <= 0 else
                                 f"fetching the media took longer than WHISPER_FETCH_TIMEOUT_SECONDS "
                                 f"({self.total_timeout:g} s)")
                    stream.close()
                    break
                await asyncio.wait([reading], timeout=min(idle_left, total_left))
            try:
                complete = await reading
            except StreamClosedError:
                complete = False
        except (OSError, StreamClosedError, httputil.HTTPInputError) as exc:
            if body.error is not None:
                raise body.error from None
            if slow:
                raise FetchError(Kind.TIMED_OUT, slow[0]) from None
            raise FetchError(Kind.UPSTREAM_FAILED, f"fetching {shown(url)} broke: {_why(exc)}") from None
        except asyncio.CancelledError:
            stream.close()
            raise
        finally:
            rate.stop()
            stream.close()
        if body.error is not None:
            raise body.error
        if slow:
            raise FetchError(Kind.TIMED_OUT, slow[0])
        if timed_out:
            raise FetchError(Kind.TIMED_OUT, timed_out)
        if not complete or not body.code:
            raise FetchError(Kind.UPSTREAM_FAILED, f"fetching {shown(url)} broke: the connection ended before the whole "
                                  f"response came ({body.received} bytes received)")
        return body


def _why(exc: BaseException) -> str:
    real = getattr(exc, "real_error", None) or exc
    return (getattr(real, "strerror", None) or str(real) or real.__class__.__name__)[:200]
