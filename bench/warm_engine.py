#!/usr/bin/env python3
"""Benchmark of the warm engine: jfk.flac N times through HTTP with WHISPER_ENGINE=worker and =cli,
and the pure in-process `model.transcribe` of the same file with the model already loaded.

Usage: /work/main/.venv/bin/python bench/warm_engine.py [--jobs 10] [--skip-cli]
Prints the three per-job times and the ratios (worker / in-process, cli / worker).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from conftest import JFK, Server  # noqa: E402  the test harness's real-server launcher

IN_PROCESS = r"""
import json, sys, time
import whisperx
from whisperx.audio import load_audio
model = whisperx.load_model(sys.argv[1], device="cpu", compute_type="int8", language="en")
times = []
for _ in range(int(sys.argv[3])):
    audio = load_audio(sys.argv[2])
    started = time.perf_counter()
    model.transcribe(audio, batch_size=8)
    times.append(time.perf_counter() - started)
print(json.dumps(times))
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


def through_http(engine: str, jobs: int, root: Path) -> tuple[list[float], float | None]:
    server = Server(root / engine, {
        "WHISPER_ENGINE": engine, "WHISPER_CMD": str(REPO / "whisperx.sh"),
        "WHISPER_MODELS_DIR": str(REPO / "models"), "SYNC_REQUEST_TIMEOUT_SECONDS": "600",
        "ENABLE_AUTHORIZATION": "false", "RUST_LOG": "warn",
    })
    server.root.mkdir(parents=True, exist_ok=True)
    server.start()
    try:
        if engine == "worker":  # the one-time start and preload are not what a job costs
            deadline = time.monotonic() + 300
            while server.api("GET", "/status").json()["engine"]["loaded_models"] == []:
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.2)
        times = []
        for _ in range(jobs):
            started = time.perf_counter()
            response = server.submit(JFK, sync="true", diarize="false", timeout=600)
            times.append(time.perf_counter() - started)
            assert response.status_code == 200 and "fellow Americans" in response.json()["text"], response.text
        pid = server.api("GET", "/status").json()["engine"].get("pid")
        return times, peak_rss_mb(pid)
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--skip-cli", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-warm-") as tmp:
        root = Path(tmp)
        pure = json.loads(subprocess.run([venv_python(), "-c", IN_PROCESS, str(REPO / "models" / "tiny.en"), str(JFK),
                                          str(args.jobs)], capture_output=True, text=True, check=True).stdout
                          .strip().splitlines()[-1])
        worker, worker_rss = through_http("worker", args.jobs, root)
        cli = [] if args.skip_cli else through_http("cli", args.jobs, root)[0]
    median = statistics.median
    print(f"jfk.flac, {args.jobs} jobs back to back, medians (s/job):")
    print(f"  in-process model.transcribe (model loaded): {median(pure):.3f}   (min {min(pure):.3f})")
    print(f"  worker through HTTP:                        {median(worker):.3f}   (min {min(worker):.3f})"
          + (f", worker peak RSS {worker_rss:.0f} MB" if worker_rss else ""))
    if cli:
        print(f"  cli through HTTP:                           {median(cli):.3f}   (min {min(cli):.3f})")
    print(f"worker / in-process = {median(worker) / median(pure):.2f} (goal <= 1.3)")
    if cli:
        print(f"cli / worker        = {median(cli) / median(worker):.1f} (goal >= 6)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
