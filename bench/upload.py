"""#1 Upload path: a big multipart POST to whisperd, to a raw socket server and to FastAPI + UploadFile.

The client sends the file with sendfile(2) (the kernel copies it), so it costs the servers
little CPU on 2 shared cores; every server writes the body to a new file on the same disk.
Throughput = file size / (first byte sent .. response read); RSS growth = peak VmRSS of the
server process during the upload minus VmRSS just before it; CPU = the server process's user +
system time per MiB, which a busy machine does not inflate as it does wall time.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from .common import (prune_profile, REPO, RssSampler, Whisperd, cpu_seconds, free_port, median, multipart, intake_ms, stop_process,
                     wait_http, wav_header)

MIB = 1024 * 1024


def make_file(path: Path, size: int) -> Path:
    # A 16 kHz WAV header over random bytes (the server copies such samples as they are), like compressed
    # audio: the multipart parser's boundary search sees '\r' at the rate a real upload has.
    header = wav_header(size - 44)
    with open(path, "wb") as out:
        out.write(header)
        out.write(os.urandom(MIB - len(header)))
        for _ in range(size // MIB - 1):
            out.write(os.urandom(MIB))
    return path


def post_file(port: int, path: Path, fields: dict[str, str], token: str = "none") -> tuple[float, int]:
    """(seconds, HTTP status) for one multipart POST of `path` as the field `file`."""
    size = path.stat().st_size
    head, tail, ctype = multipart(fields, "big.flac", size)
    request = (
        f"POST /transcription HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(head) + size + len(tail)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock, open(path, "rb") as body:
        start = time.perf_counter()
        sock.sendall(request + head)
        sock.sendfile(body)
        sock.sendall(tail)
        reply = b""
        while b"\r\n\r\n" not in reply:
            data = sock.recv(65536)
            if not data:
                break
            reply += data
        elapsed = time.perf_counter() - start
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0
    return elapsed, status


def measure(pid: int, port: int, path: Path, repeats: int, fields: dict[str, str], sink: Path,
            token: str = "none") -> dict:
    seconds, growth, cpu = [], [], []
    for _ in range(repeats):
        cpu_before = cpu_seconds(pid)
        with RssSampler(pid) as rss:
            elapsed, status = post_file(port, path, fields, token)
        cpu.append(cpu_seconds(pid) - cpu_before)
        if status not in (200, 202):
            raise RuntimeError(f"upload answered HTTP {status}")
        seconds.append(elapsed)
        growth.append(rss.growth_mib)
        shutil.rmtree(sink, ignore_errors=True)  # free the disk (and page cache) between runs
        sink.mkdir(parents=True, exist_ok=True)
    size_mib = path.stat().st_size / MIB
    return {"mib_per_s": round(size_mib / median(seconds), 1), "rss_growth_mib": round(max(growth), 1),
            "cpu_ms_per_mib": round(1000 * median(cpu) / size_mib, 2), "seconds": [round(s, 3) for s in seconds]}


def _peer(kind: str, work: Path, repeats: int, files: list[Path]) -> dict:
    sink = work / f"{kind}-sink"
    sink.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # TMPDIR: Starlette spools uploads over 1 MiB to a temporary file; keep it on the same disk.
    env = {**os.environ, "BENCH_UPLOAD_DIR": str(sink), "TMPDIR": str(sink)}
    if kind == "raw":
        argv = [sys.executable, "-m", "bench.peers", "raw", str(port)]
    else:
        argv = [sys.executable, "-m", "uvicorn", "bench.peers:app", "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning", "--no-access-log"]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, start_new_session=True)
    try:
        wait_http(port, proc=proc)
        return {f.name: measure(proc.pid, port, f, repeats, {}, sink) for f in files}
    finally:
        stop_process(proc)


def _whisperd(work: Path, engine: Path, repeats: int, files: list[Path]) -> dict:
    root = work / "whisperd"
    root.mkdir(parents=True, exist_ok=True)
    fields = {"diarize": "false", "response_format": "json"}
    # 512 MiB of 16 kHz samples is 4.7 hours: over the default limit, which is not what is measured here.
    with Whisperd(root, engine, {"WHISPER_MAX_AUDIO_SECONDS": "0"}) as server:
        sink = root / "tmp"  # each job's upload lands here; cleared between runs like the others
        return {f.name: measure(server.proc.pid, server.port, f, repeats, fields, sink, server.token) for f in files}


def profile(work: Path, engine: Path, path: Path, out: Path) -> None:
    """One upload to whisperd under pyinstrument; the text report goes to `out`."""
    root = work / "whisperd-profile"
    root.mkdir(parents=True, exist_ok=True)
    wrap = ["-m", "pyinstrument", "-r", "text", "--show-all", "-o", str(out)]
    with Whisperd(root, engine, {"WHISPER_MAX_AUDIO_SECONDS": "0"}, wrap=wrap) as server:
        post_file(server.port, path, {"diarize": "false", "response_format": "json"}, server.token)
        time.sleep(0.5)  # let the noop job finish so the profile is of the upload, not a shutdown
    prune_profile(out, 0.02)


def run(work: Path, engine: Path, quick: bool, do_profile: bool = True) -> dict:
    sizes = [16] if quick else [16, 512]
    repeats = 3
    files = [make_file(work / f"upload-{mib}mib.bin", mib * MIB) for mib in sizes]
    result = {
        # whisperd takes each upload in (intake.py) before queueing it: part of its time below.
        "intake_ms": {f.name: intake_ms(f) for f in files},
        "whisperd": _whisperd(work, engine, repeats, files),
        "raw_socket": _peer("raw", work, repeats, files),
        "fastapi_uploadfile": _peer("fastapi", work, repeats, files),
    }
    if do_profile:
        profile(work, engine, files[-1], REPO / "bench" / "results" / "upload-profile.txt")
    for f in files:
        f.unlink()
    return {"sizes_mib": sizes, "repeats": repeats, **result}
