"""One warm engine per box, whatever HTTP_WORKER_NUMBER: the engine host and its clients.

With several HTTP processes, the supervisor forks one more child, the engine host: it owns the
box's only EngineWorker (its preload, idle unload, restarts with back-off, suspects run alone)
and listens on a Unix socket in the data directory (mode 0600: only the server's own user may
connect; a job line carries its HF token). Every HTTP process runs jobs through SharedEngine, an
Engine that speaks JSON lines over that socket:

  client -> host  {"op": "run", "id": ..., "job": {the worker's job line}, "timeout": s | null}
                  {"op": "stop", "id": ..., "because": "canceled" | "timeout" | "shutdown"}
  host -> client  {"event": "progress", "id": ..., "percent": 42.0, "stage": "transcribing"}
                  {"event": "segment", "id": ..., "index": n, "text": "..."}   (stream=true: segment_feed.py)
                  {"event": "result", "id": ..., "result": {EngineResult's fields}}
                  {"event": "status", "status": {...}, "healthy": [true, null]}   on connect and every STATUS_EVERY s

A client that goes away has its jobs stopped ("shutdown"); a host that goes away ends its
clients' jobs with retry and no attempt counted, and the supervisor starts it again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

from tornado.iostream import IOStream, StreamClosedError
from tornado.netutil import bind_unix_socket
from tornado.process import Subprocess
from tornado.tcpserver import TCPServer

from ..config import Config
from ..segment_feed import FEED
from ..tasks import spawn
from .base import EngineOptions, EngineResult, ProgressCallback, StartedCallback
from .worker import EngineWorker, job_message

log = logging.getLogger("whisperd.engine_host")
SOCKET_NAME = "engine.sock"
STATUS_EVERY = 0.5
MAX_LINE = 16 * 1024 * 1024
RECONNECT_SECONDS = 0.2


def socket_path(config: Config) -> str:
    """Where the engine host listens: in the node's own runtime directory (config.runtime_dir)."""
    return str(Path(config.runtime_dir) / SOCKET_NAME)


def _line(message: dict[str, Any]) -> bytes:
    return (json.dumps(message) + "\n").encode()


# --- the host ---------------------------------------------------------------------------------


class EngineHost(TCPServer):
    """Serves the box's one EngineWorker to every HTTP process."""

    def __init__(self, worker: EngineWorker) -> None:
        super().__init__(max_buffer_size=MAX_LINE)
        self.worker = worker
        self._clients: set[IOStream] = set()

    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        self._clients.add(stream)
        jobs: set[str] = set()
        self._send(stream, self._status())
        try:
            while True:
                message = json.loads(await stream.read_until(b"\n", max_bytes=MAX_LINE))
                if message.get("op") == "run":
                    jobs.add(message["id"])
                    spawn(self._run(stream, jobs, message), f"engine host: job {message['id']}")
                elif message.get("op") == "stop":
                    spawn(self.worker.stop(message["id"], message.get("because") or "canceled"), "engine host: stop")
                elif message.get("op") == "live":
                    spawn(self._live(stream, message), "engine host: live pass")
        except (StreamClosedError, json.JSONDecodeError, KeyError):
            pass
        finally:
            self._clients.discard(stream)
            stream.close()
            for job_id in list(jobs):  # its HTTP process is gone: nobody will record these results
                await self.worker.stop(job_id, "shutdown")

    async def _run(self, stream: IOStream, jobs: set[str], message: dict[str, Any]) -> None:
        job_id = message["id"]

        def progress(percent: float, stage: str = "transcribing") -> None:
            self._send(stream, {"event": "progress", "id": job_id, "percent": percent, "stage": stage})

        def segment(index: int, text: str) -> None:
            self._send(stream, {"event": "segment", "id": job_id, "index": index, "text": text})

        try:
            with FEED.listen(job_id, segment):  # the worker publishes in this (the host's) process
                result = await self.worker.run_message(job_id, message["job"], progress, message.get("timeout"))
        except Exception:  # a bug here must still answer the job
            log.exception("job %s: the engine host failed to run it", job_id)
            result = EngineResult(1, stderr_tail=["internal error in the engine host (see the server log)"])
        finally:
            jobs.discard(job_id)
        self._send(stream, {"event": "result", "id": job_id, "result": dataclasses.asdict(result)})

    async def _live(self, stream: IOStream, message: dict[str, Any]) -> None:
        """live: one realtime session's VAD or pass, forwarded to the worker's live lane."""
        try:
            answer = await self.worker.live(message["message"])
        except Exception as exc:  # the worker cannot start, or did not answer: the pass's answer
            answer = {"error": str(exc) or exc.__class__.__name__}
        self._send(stream, {"event": "live", "ref": message.get("ref"), "answer": answer})

    def _status(self) -> dict[str, Any]:
        return {"event": "status", "status": self.worker.status(), "healthy": list(self.worker.healthy())}

    def broadcast_status(self) -> None:
        status = self._status()
        for stream in list(self._clients):
            self._send(stream, status)

    @staticmethod
    def _send(stream: IOStream, message: dict[str, Any]) -> None:
        if stream.closed():
            return
        try:
            stream.write(_line(message))
        except StreamClosedError:
            pass


async def serve_host(config: Config, offline: bool, path: str) -> int:
    """The engine host's life: bind, start the worker, serve until SIGTERM, stop the worker."""
    from . import worker_threads

    Subprocess.initialize()  # the worker's exit needs SIGCHLD
    if config.devices:  # one warm worker per device, behind the same host
        from .devices import DeviceEngines
        worker = DeviceEngines(config, offline, config.devices, config.slots_per_device, worker_threads(config))
    else:
        worker = EngineWorker(config, offline, config.max_running, worker_threads(config))
    host = EngineHost(worker)
    host.add_socket(bind_unix_socket(path, mode=0o600))
    worker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("engine host serving the box's one engine worker on %s", path)
    while not stop.is_set():
        host.broadcast_status()
        try:
            await asyncio.wait_for(stop.wait(), STATUS_EVERY)
        except asyncio.TimeoutError:
            pass
    host.stop()
    await worker.close()
    try:
        os.unlink(path)
    except OSError:
        pass
    Subprocess.uninitialize()
    return 0


# --- the client -------------------------------------------------------------------------------


class SharedEngine:
    """An HTTP process's handle on the box's engine host (an Engine)."""

    mode = "worker"

    def __init__(self, config: Config, path: str) -> None:
        self.config = config
        self.path = path
        self.times_words = config.WHISPER_WORD_TIMES
        self._stream: IOStream | None = None
        self._connected = asyncio.Event()
        self._results: dict[str, asyncio.Future] = {}
        self._progress: dict[str, ProgressCallback | None] = {}
        self._status: dict[str, Any] = {"mode": "worker", "state": "starting", "pid": None, "loaded_models": [],
                                        "running_jobs": 0, "restarts": 0, "reason": None}
        self._healthy: tuple[bool, str | None] = (True, None)
        self._task: asyncio.Task | None = None
        self._closed = False
        self._live: dict[int, asyncio.Future] = {}  # live: answers from the host's live lane, by ref
        self._live_refs = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._keep_connected())

    async def _keep_connected(self) -> None:
        while not self._closed:
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                stream = IOStream(sock, max_buffer_size=MAX_LINE)
                await stream.connect(self.path)
            except (OSError, StreamClosedError):
                await asyncio.sleep(RECONNECT_SECONDS)
                continue
            self._stream = stream
            self._connected.set()
            try:
                while True:
                    self._on_message(json.loads(await stream.read_until(b"\n", max_bytes=MAX_LINE)))
            except (StreamClosedError, json.JSONDecodeError):
                pass
            self._connected.clear()
            self._stream = None
            stream.close()
            self._status = {**self._status, "state": "restarting", "pid": None,
                            "reason": "the engine host ended; it is being started again"}
            for future in list(self._live.values()):
                if not future.done():
                    future.set_result({"error": "the engine host ended"})
            for job_id, future in list(self._results.items()):
                if not future.done():  # the host died under it: not the job's doing
                    future.set_result(EngineResult(None, stderr_tail=["the engine host ended while running the job"],
                                                   retry=True, charge=False))
            if not self._closed:
                log.warning("lost the engine host at %s; reconnecting", self.path)
                await asyncio.sleep(RECONNECT_SECONDS)

    def _on_message(self, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == "status":
            self._status = {**message["status"], "shared": True}
            healthy, reason = message.get("healthy") or (True, None)
            self._healthy = (bool(healthy), reason)
            return
        if event == "live":
            future = self._live.get(message.get("ref"))
            if future is not None and not future.done():
                future.set_result(message.get("answer") or {"error": "no answer"})
            return
        job_id = message.get("id")
        if event == "segment" and job_id in self._results:
            FEED.publish(job_id, int(message.get("index") or 0), str(message.get("text") or ""))
        elif event == "progress":
            callback = self._progress.get(job_id)
            if callback is not None:
                outcome = callback(float(message.get("percent", 0)), str(message.get("stage") or "transcribing"))
                if asyncio.iscoroutine(outcome):
                    spawn(outcome, "progress callback")
        elif event == "result":
            future = self._results.get(job_id)
            if future is not None and not future.done():
                known = {f.name for f in dataclasses.fields(EngineResult)}
                future.set_result(EngineResult(**{k: v for k, v in message["result"].items() if k in known}))

    async def run(self, job_id: str, opts: EngineOptions, on_progress: ProgressCallback | None = None,
                  on_started: StartedCallback | None = None, timeout: float | None = None) -> EngineResult:
        future = asyncio.get_running_loop().create_future()
        self._results[job_id] = future
        self._progress[job_id] = on_progress
        try:
            limit = self.config.WHISPER_WORKER_START_SECONDS
            connected = asyncio.ensure_future(self._connected.wait())
            await asyncio.wait([connected, future], timeout=limit, return_when=asyncio.FIRST_COMPLETED)
            connected.cancel()
            if future.done():  # stopped while waiting for the host
                return future.result()
            if not self._connected.is_set():
                return EngineResult(127, stderr_tail=[f"the engine host did not answer within "
                                                      f"WHISPER_WORKER_START_SECONDS ({limit:g} s)"])
            self._write({"op": "run", "id": job_id, "job": job_message(self.config, opts), "timeout": timeout})
            return await future
        finally:
            self._results.pop(job_id, None)
            self._progress.pop(job_id, None)

    async def stop(self, job_id: str, because: str) -> None:
        future = self._results.get(job_id)
        if future is None or future.done():
            return
        if self._stream is None:  # not sent yet
            future.set_result(EngineResult(None, killed_because=because))
            return
        self._write({"op": "stop", "id": job_id, "because": because})

    async def live(self, message: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """live: a realtime session's VAD or pass, on the box's one engine (through the host)."""
        if not self._connected.is_set():
            await asyncio.wait_for(self._connected.wait(), self.config.WHISPER_WORKER_START_SECONDS)
        self._live_refs += 1
        ref = self._live_refs
        future = asyncio.get_running_loop().create_future()
        self._live[ref] = future
        try:
            self._write({"op": "live", "ref": ref, "message": message})
            return await asyncio.wait_for(future, timeout)
        finally:
            self._live.pop(ref, None)

    def _write(self, message: dict[str, Any]) -> None:
        if self._stream is None:
            return
        try:
            self._stream.write(_line(message))
        except StreamClosedError:
            pass  # the reader notices and ends the jobs

    def status(self) -> dict[str, Any]:
        return dict(self._status)

    def healthy(self) -> tuple[bool, str | None]:
        return self._healthy

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        if self._stream is not None:
            self._stream.close()
