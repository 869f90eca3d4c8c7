"""What every benchmark shares: the machine's description, a whisperd server, RSS sampling, percentiles."""

from __future__ import annotations

import http.client
import json
import os
import platform
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path.insert(0, str(REPO / "tests"))
from harness import Server  # noqa: E402  the launcher the tests use too: one way to start a server


def machine() -> dict:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
    return {
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_avg_1m_at_start": os.getloadavg()[0],
    }


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); exact for the small samples used here."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    return statistics.median(values)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_kib(pid: int) -> int:
    """Resident memory of one process (VmRSS), in KiB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far: unlike wall time, not inflated by a busy machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Peak RSS of a process while a block runs, sampled every 5 ms on a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = rss_kib(pid)
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_kib(self.pid))

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_kib(self.pid))

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.before) / 1024


def wait_http(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("OPTIONS", "/status")
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answered on port {port} within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def write_noop_engine(directory: Path) -> Path:
    """bench/noop_engine.py with this interpreter in its shebang (-I -S: the cheapest Python start)."""
    body = (BENCH / "noop_engine.py").read_text().split("\n", 1)[1]
    path = directory / "noop_whisperx"
    path.write_text(f"#!{sys.executable} -IS\n{body}")
    path.chmod(0o755)
    return path


class Whisperd(Server):
    """The shared launcher (tests/harness.py) configured as deployed: a real admin API token that
    every request pays the ledger check of, quiet logs, and the no-op engine as the CLI engine."""

    def __init__(self, root: Path, engine: Path, env: dict[str, str] | None = None,
                 wrap: list[str] | None = None) -> None:
        super().__init__(root, {
            "WHISPER_CMD": str(engine),
            "WHISPER_ENGINE": "cli",  # the no-op engine is a CLI stand-in: it cannot be a warm worker
            "WHISPER_API_ALLOW_ANY_TOKEN": "false",
            "WHISPER_DEFAULT_DIARIZE": "false",
            "RUST_LOG": "warn",  # an info line per request would be part of what we measure
            "FAKE_WHISPERX_LOG": str(root / "engine-starts.log"),
            **(env or {}),
        }, wrap)
        self.engine_log = root / "engine-starts.log"
        self.token = ""
        self.auth: dict[str, str] = {}

    def start(self, wait: bool = True) -> "Whisperd":
        self.token = self.create_token(f"bench{self.port}", "--admin")
        self.auth = {"Authorization": f"Bearer {self.token}"}
        super().start(wait)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        return super().stop(sig, timeout)

    def __enter__(self) -> "Whisperd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def engine_starts(self) -> list[float]:
        """time.time() of every noop engine's first instruction, in start order."""
        if not self.engine_log.exists():
            return []
        return [float(line) for line in self.engine_log.read_text().split()]

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, conn: http.client.HTTPConnection | None = None):
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=body, headers={**self.auth, **(headers or {})})
        response = conn.getresponse()
        data = response.read()
        if own:
            conn.close()
        return response.status, json.loads(data) if data else None

    def wait_job(self, job_id: str, wanted: str, timeout: float = 30.0,
                 conn: http.client.HTTPConnection | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.request("GET", f"/transcription/{job_id}", conn=conn)[1].get("status") == wanted:
                return
            time.sleep(0.005)
        raise RuntimeError(f"job {job_id} did not reach {wanted} within {timeout:.0f} s")


def multipart(fields: dict[str, str], filename: str, file_size: int, boundary: str = "whisperd-bench-boundary"):
    """(head, tail, content type) of a multipart body whose file part is `file_size` bytes sent in between."""
    head = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    )
    head += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head, tail, f"multipart/form-data; boundary={boundary}"


def intake_ms(path: Path, decoder: str = "auto", runs: int = 10) -> float:
    """Median wall time of the server's own intake (whisperd.intake: the fast WAV copy, the warm
    decoder, or ffprobe and an ffmpeg decode) on one file, outside the server."""
    from types import SimpleNamespace

    from whisperd.intake import Intake

    config = SimpleNamespace(WHISPER_FFPROBE="ffprobe", WHISPER_FFMPEG="ffmpeg", WHISPER_MAX_AUDIO_SECONDS=0.0,
                             WHISPER_DECODER=decoder, WHISPER_DECODER_MEMORY_MB=1024)

    def once() -> float:
        with tempfile.TemporaryDirectory(prefix="bench-intake-") as out:
            start = time.perf_counter()
            Intake(config).accept_sync(path, Path(out))
            return 1000 * (time.perf_counter() - start)

    return round(median([once() for _ in range(runs)]), 1)


def wav_header(data_bytes: int, rate: int = 16000) -> bytes:
    """A 16-bit mono PCM WAV header: any bytes after it are samples; at 16 kHz the server copies them
    as they are, at any other rate it probes and decodes them."""
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", data_bytes))


def small_upload(audio: bytes, **fields: str) -> tuple[bytes, str]:
    head, tail, ctype = multipart(fields, "clip.wav", len(audio))
    return head + audio + tail, ctype


PROFILER = ["-m", "pyinstrument", "-r", "text", "--show-all", "-o"]  # + the report's path


def prune_profile(report: Path, share: float) -> None:
    """Keep the header and the frames that took at least `share` of the total (a node's children
    are never larger than it, so the tree stays whole); --show-all's full tree is 1,000+ lines."""
    lines = report.read_text().splitlines()
    kept, total = [], None
    for line in lines:
        numbers = [w for w in line.split() if w.replace(".", "", 1).isdigit() and "." in w]
        if total is None or not numbers:
            kept.append(line)
            if total is None and numbers and "<module>" in line:
                total = float(numbers[0])
        elif float(numbers[0]) >= share * total:
            kept.append(line)
    report.write_text("\n".join(kept) + "\n")
