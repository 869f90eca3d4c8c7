#!/usr/bin/env python3
"""Benchmark of the warm engine: jfk.flac N times through HTTP with WHISPER_ENGINE=worker and =cli,
and the pure in-process `model.transcribe` of the same file with the model already loaded.

Usage: /work/main/.venv/bin/python bench/warm_engine.py [--jobs 10] [--cli-jobs N]
The three run round robin (one of each per round) so a machine whose load changes treats them
alike. Prints the three per-job medians and the ratios (worker / in-process, cli / worker).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness import JFK, Server  # noqa: E402  the shared real-server launcher

IN_PROCESS = r"""
import sys, time
import whisperx
from whisperx.audio import load_audio
model = whisperx.load_model(sys.argv[1], device="cpu", compute_type="int8", language="en")
print("ready", flush=True)
for _ in sys.stdin:
    audio = load_audio(sys.argv[2])
    started = time.perf_counter()
    model.transcribe(audio, batch_size=8)
    print("took", time.perf_counter() - started, flush=True)
"""


def venv_python() -> str:
    """The engine venv's interpreter, found by whisperx.sh's rule."""
    if os.environ.get("WHISPERX_VENV"):
        return os.environ["WHISPERX_VENV"].rstrip("/") + "/bin/python"
    digest = hashlib.sha256((REPO / "engine-requirements.txt").read_bytes()).hexdigest()[:12]
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return str(data / "whisperd" / f"engine-{digest}" / "bin" / "python")


def peak_rss_mb(pid: int | None) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, TypeError):
        return None
    return None


def start_server(engine: str, root: Path) -> Server:
    server = Server(root / engine, {
        "WHISPER_ENGINE": engine, "WHISPER_CMD": str(REPO / "whisperx.sh"),
        "WHISPER_MODELS_DIR": str(REPO / "models"), "SYNC_REQUEST_TIMEOUT_SECONDS": "600",
        "ENABLE_AUTHORIZATION": "false", "RUST_LOG": "info",
    })
    server.root.mkdir(parents=True, exist_ok=True)
    server.start()
    if engine == "worker":  # the one-time start and preload are not what a job costs
        deadline = time.monotonic() + 300
        while server.api("GET", "/status").json()["engine"]["loaded_models"] == []:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.2)
    return server


def _answer(process: subprocess.Popen, word: str) -> str:
    """The baseline's next line starting with `word` (WhisperX logs to stdout too)."""
    for line in process.stdout:
        if line.startswith(word):
            return line
    raise RuntimeError("the in-process baseline ended early")


def http_job(server: Server) -> float:
    started = time.perf_counter()
    response = server.submit(JFK, sync="true", diarize="false", timeout=600)
    took = time.perf_counter() - started
    assert response.status_code == 200 and "fellow Americans" in response.json()["text"], response.text
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--cli-jobs", type=int, default=None, help="CLI jobs (default: --jobs; each costs ~9 s)")
    args = parser.parse_args()
    cli_jobs = args.jobs if args.cli_jobs is None else args.cli_jobs
    pure: list[float] = []
    worker: list[float] = []
    cli: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-warm-") as tmp:
        root = Path(tmp)
        baseline = subprocess.Popen([venv_python(), "-c", IN_PROCESS, str(REPO / "models" / "tiny.en"), str(JFK)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    text=True, bufsize=1)
        servers = {engine: start_server(engine, root) for engine in ("worker", "cli")}
        try:
            _answer(baseline, "ready")
            # Round robin, so that the three see the same machine: the load here comes and goes.
            for number in range(max(args.jobs, cli_jobs)):
                if number < args.jobs:
                    baseline.stdin.write("go\n")
                    baseline.stdin.flush()
                    pure.append(float(_answer(baseline, "took").split()[1]))
                    worker.append(http_job(servers["worker"]))
                if number < cli_jobs:
                    cli.append(http_job(servers["cli"]))
                print(f"  round {number + 1}: in-process {pure[-1]:.3f}  worker {worker[-1]:.3f}"
                      + (f"  cli {cli[-1]:.3f}" if number < cli_jobs else ""), file=sys.stderr, flush=True)
            worker_rss = peak_rss_mb(servers["worker"].api("GET", "/status").json()["engine"]["pid"])
            inside = [ast.literal_eval(line.split("worker done in ", 1)[1])
                      for line in servers["worker"].log().splitlines() if "worker done in " in line]
        finally:
            for server in servers.values():
                server.stop()
            baseline.stdin.close()
            baseline.wait(30)
    median = statistics.median
    print(f"jfk.flac, back to back, round robin; medians in s/job ({len(pure)} in-process, {len(worker)} worker, "
          f"{len(cli)} cli):")
    print(f"  in-process model.transcribe (model loaded): {median(pure):.3f}  (min {min(pure):.3f})")
    print(f"  worker through HTTP (sync):                 {median(worker):.3f}  (min {min(worker):.3f})"
          + (f"  worker peak RSS {worker_rss:.0f} MB" if worker_rss else ""))
    if cli:
        print(f"  cli through HTTP (sync):                    {median(cli):.3f}  (min {min(cli):.3f})")
    if inside:
        print("  inside the worker, medians: " + ", ".join(
            f"{name} {median(job[name] for job in inside):.3f}" for name in inside[-1]))
    print(f"worker / in-process = {median(worker) / median(pure):.2f} (goal <= 1.3)")
    if cli:
        print(f"cli / worker        = {median(cli) / median(worker):.1f} (goal >= 6)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
