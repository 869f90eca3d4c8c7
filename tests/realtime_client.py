"""A raw OpenAI Realtime transcription client for tests and bench/ (Tornado's WebSocket client).

Imports nothing of whisperd and nothing of pytest."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import time
from typing import Any

from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClosedError, websocket_connect

TONE_RATE = 24000


def tone(seconds: float, rate: int = TONE_RATE, amplitude: int = 8000) -> bytes:
    """pcm16 mono: loud enough for the fake engine's voice activity (and words: one per 0.5 s)."""
    return b"".join(struct.pack("<h", int(amplitude * math.sin(2 * math.pi * 440 * i / rate)))
                    for i in range(int(seconds * rate)))


def silence(seconds: float, rate: int = TONE_RATE) -> bytes:
    return b"\0\0" * int(seconds * rate)


class Live:
    """One session: events received are kept in order, with the monotonic time each arrived."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.events: list[dict[str, Any]] = []
        self.closed = asyncio.get_running_loop().create_future()
        self._new = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, port: int, token: str | None = "test-token-123", query: str = "intent=transcription",
                      subprotocols: list[str] | None = None, headers: dict[str, str] | None = None) -> "Live":
        all_headers = dict(headers or {})
        if token is not None and subprotocols is None:
            all_headers["Authorization"] = f"Bearer {token}"
        request = HTTPRequest(f"ws://127.0.0.1:{port}/v1/realtime?{query}", headers=all_headers)
        conn = await websocket_connect(request, subprotocols=subprotocols)
        return cls(conn)

    async def _read(self) -> None:
        while True:
            message = await self.conn.read_message()
            if message is None:
                self.closed.set_result((self.conn.close_code, self.conn.close_reason))
                self._new.set()
                return
            event = json.loads(message)
            event["_at"] = time.monotonic()
            self.events.append(event)
            self._new.set()

    async def send(self, event: dict[str, Any] | str | bytes) -> None:
        await self.conn.write_message(event if isinstance(event, (str, bytes)) else json.dumps(event),
                                      binary=isinstance(event, bytes))

    async def append(self, pcm: bytes) -> None:
        await self.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()})

    async def stream(self, pcm: bytes, chunk_seconds: float = 0.1, pace: float = 1.0, rate: int = TONE_RATE,
                     width: int = 2) -> None:
        """Send in chunks; pace 1.0 is real time, 4.0 four times faster."""
        step = int(chunk_seconds * rate) * width
        started = time.monotonic()
        for index, offset in enumerate(range(0, len(pcm), step)):
            if self.closed.done():
                return  # the server ended the session (a limit): the test looks at why
            try:
                await self.append(pcm[offset:offset + step])
            except WebSocketClosedError:
                return
            due = started + (index + 1) * chunk_seconds / pace
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["type"] == kind]

    async def wait_for(self, kind: str, count: int = 1, timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.of(kind)) < count:
            if self.closed.done():
                raise AssertionError(f"closed {self.closed.result()} before {count} {kind}; got {self.kinds()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {count} {kind} within {timeout} s; got {self.kinds()}")
            self._new.clear()
            try:
                await asyncio.wait_for(self._new.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        return self.of(kind)

    async def wait_closed(self, timeout: float = 20.0) -> tuple[int | None, str | None]:
        return await asyncio.wait_for(asyncio.shield(self.closed), timeout)

    def kinds(self) -> list[str]:
        return [event["type"] for event in self.events]

    def close(self) -> None:
        self.conn.close()
        self._reader.cancel()
