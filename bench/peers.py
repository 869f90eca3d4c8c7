"""The baselines: a raw loopback socket server and the FastAPI + UploadFile stack peers use for
uploads (both write what they receive to a new file in $BENCH_UPLOAD_DIR, like whisperd does),
and a bare Tornado handler for the status reads.
  python -m bench.peers raw PORT               the ceiling: read the socket, write the bytes, no parsing
  python -m uvicorn bench.peers:app ...        FastAPI/Starlette's UploadFile (python-multipart)
  python -m bench.peers hello PORT             Tornado answering a constant JSON: the floor under whisperd's GETs
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from pathlib import Path

CHUNK = 1024 * 1024


def _dest() -> Path:
    return Path(os.environ["BENCH_UPLOAD_DIR"]) / uuid.uuid4().hex


def serve_raw(port: int) -> None:
    """One connection at a time: headers, then Content-Length bytes to disk with recv_into, then 200."""
    listener = socket.create_server(("127.0.0.1", port))
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    while True:
        conn, _ = listener.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data:
                    break
                head += data
            header, _, body = head.partition(b"\r\n\r\n")
            length = 0
            for line in header.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                with open(_dest(), "wb") as out:
                    out.write(body)
                    left = length - len(body)
                    while left > 0:
                        n = conn.recv_into(view, min(CHUNK, left))
                        if not n:
                            break
                        out.write(view[:n])
                        left -= n
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")


try:
    from fastapi import FastAPI, File, UploadFile
except ImportError:  # only the raw server is needed where FastAPI is not installed
    app = None
else:
    app = FastAPI()

    @app.post("/transcription")
    async def transcription(file: UploadFile = File(...)) -> dict:
        # The careful peer: stream the spooled upload to its own file in 1 MiB reads,
        # never `await file.read()` whole.
        size = 0
        with open(_dest(), "wb") as out:
            while chunk := await file.read(CHUNK):
                out.write(chunk)
                size += len(chunk)
        return {"bytes": size}


def serve_hello(port: int) -> None:
    import asyncio

    from tornado.web import Application, RequestHandler

    class Hello(RequestHandler):
        def get(self, *_args) -> None:
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish('{"status": "Completed"}')

        def options(self, *_args) -> None:
            self.finish()

    async def main() -> None:
        Application([(r"/.*", Hello)], log_function=lambda _handler: None).listen(port, "127.0.0.1")
        await asyncio.Event().wait()

    asyncio.run(main())


if __name__ == "__main__":
    {"raw": serve_raw, "hello": serve_hello}[sys.argv[1]](int(sys.argv[2]))
