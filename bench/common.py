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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


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


class Whisperd:
    """`python whisperd.py` (the real entry point) with its own data directory and env config."""

    def __init__(self, root: Path, engine: Path, env: dict[str, str] | None = None,
                 wrap: list[str] | None = None) -> None:
        self.root = root
        self.port = free_port()
        self.engine_log = root / "engine-starts.log"
        models = root / "models" / "tiny.en"
        models.mkdir(parents=True, exist_ok=True)
        (models / "model.bin").write_bytes(b"noop")
        conf = root / "whisper_api.conf"
        conf.write_text("# benchmark: everything comes from the environment\n")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("WHISPER", "HF_"))}
        self.env.update({
            "WHISPER_API_CONF": str(conf),
            "WHISPER_API_HOST": "127.0.0.1",
            "WHISPER_API_PORT": str(self.port),
            "WHISPER_CMD": str(engine),
            "WHISPER_MODELS_DIR": str(root / "models"),
            "WHISPER_TMP_FILES": str(root / "tmp"),
            "WHISPER_OUTPUT_DIR": str(root / "output"),
            "WHISPER_DB_PATH": str(root / "whisperd.db"),
            "WHISPER_HF_TOKEN_FILE": str(root / "hf_token.txt"),
            "WHISPER_DEFAULT_MODEL": "tiny.en",
            "WHISPER_DEFAULT_LANGUAGE": "en",
            "WHISPER_DEFAULT_DIARIZE": "false",
            "WHISPER_DEVICE": "cpu",
            "WHISPER_OFFLINE": "true",
            "HTTP_WORKER_NUMBER": "1",
            "RUST_LOG": "warn",  # an info line per request would be part of what we measure
            "FAKE_WHISPERX_LOG": str(self.engine_log),
        })
        self.env.update(env or {})
        self.wrap = wrap or []
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Whisperd":
        # A real (admin) API token, as deployed: each request pays the ledger lookup that checks it.
        created = subprocess.run(
            [sys.executable, str(REPO / "whisperd.py"), "token", "create", "--name", f"bench{self.port}", "--admin"],
            cwd=REPO, env=self.env, capture_output=True, text=True, check=True)
        self.token = created.stdout.split()[-1]
        self.auth = {"Authorization": f"Bearer {self.token}"}
        self.log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, *self.wrap, str(REPO / "whisperd.py")], cwd=REPO, env=self.env,
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_http(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 60)
            self.log.close()

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


    def wait_status(self, job_id: str, wanted: str, timeout: float = 30.0,
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


def probe_ms(path: Path, runs: int = 10) -> float:
    """Median wall time of the server's own upload check (whisperd.probe: ffprobe) on one file."""
    from whisperd import probe

    def once() -> float:
        start = time.perf_counter()
        probe.probe("ffprobe", path)
        return 1000 * (time.perf_counter() - start)

    return round(median([once() for _ in range(runs)]), 1)


def wav_header(data_bytes: int, rate: int = 16000) -> bytes:
    """A 16-bit mono PCM WAV header: with any bytes after it, the file passes the server's ffprobe check."""
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", data_bytes))


def small_upload(audio: bytes, **fields: str) -> tuple[bytes, str]:
    head, tail, ctype = multipart(fields, "clip.wav", len(audio))
    return head + audio + tail, ctype
