#!/usr/bin/env python3
"""Benchmark of a long recording end to end: two hours of speech and silence through HTTP, real
WhisperX (tiny.en, warm engine, CPU), with the server's memory, the progress and the result size.

Usage: /work/main/.venv/bin/python bench/long_recording.py [--minutes 120] [--via tus|multipart] [--vad silero|pyannote]
       /work/main/.venv/bin/python bench/long_recording.py --upload-only-mib 512
The audio is made here with espeak-ng and sox (a minute of sentences and pauses, repeated).
--upload-only-mib: only a tus upload of that many MiB (the fake engine), for the server's peak memory.
Prints the figures; bench/results/long-recording.txt keeps the run written down in docs/large-media.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from conftest import Server  # noqa: E402  the test harness's real-server launcher
from bench.common import cpu_seconds, machine, rss_kib  # noqa: E402
from whisperd import config  # noqa: E402

SENTENCES = [
    "Good morning everyone, let us start the weekly planning meeting.",
    "The first item on the agenda is the budget for the next quarter.",
    "We shipped the new release on Tuesday and the feedback has been positive.",
    "Please send me the figures before the end of the week.",
    "The customer asked whether the service can handle recordings of two hours.",
    "Let us take a short break and continue in ten minutes.",
]


def make_audio(directory: Path, minutes: float) -> tuple[Path, str]:
    """About a minute of espeak-ng sentences with pauses between them, repeated to `minutes`; the
    file and its script."""
    parts = []
    for number, sentence in enumerate(SENTENCES):
        wav = directory / f"s{number}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(wav), sentence], check=True)
        padded = directory / f"p{number}.wav"
        # Speech, then 4 s of silence: a meeting has pauses, and WhisperX's VAD cuts on them.
        subprocess.run(["sox", str(wav), "-r", "16000", "-c", "1", "-b", "16", str(padded), "pad", "0", "4"], check=True)
        parts.append(str(padded))
    block = directory / "block.wav"
    subprocess.run(["sox", *parts, str(block)], check=True)
    block_seconds = float(subprocess.run(["soxi", "-D", str(block)], capture_output=True, text=True, check=True).stdout)
    repeats = max(0, round(minutes * 60 / block_seconds) - 1)
    out = directory / "long.flac"
    subprocess.run(["sox", str(block), str(out), "repeat", str(repeats)], check=True)
    return out, " ".join(SENTENCES * (repeats + 1))


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def wer(reference: str, hypothesis: str, band: int = 400) -> float:
    """Word error rate: the edit distance over the reference's words, computed within `band` words
    of the diagonal (10,000 words a side: the full table would be 10^8 cells in Python). A distance
    that needs a wider band is over-counted, never under-counted."""
    ref, hyp = words(reference), words(hypothesis)
    far = len(ref) + len(hyp)
    previous = {j: j for j in range(0, min(len(hyp), band) + 1)}
    for i, r in enumerate(ref, 1):
        current = {}
        for j in range(max(0, i - band), min(len(hyp), i + band) + 1):
            if j == 0:
                current[j] = i
                continue
            current[j] = min(previous.get(j, far) + 1, current.get(j - 1, far) + 1,
                             previous.get(j - 1, far) + (r != hyp[j - 1]))
        previous = current
    return previous.get(len(hyp), far) / max(1, len(ref))


def tus_upload(server: Server, path: Path, chunk: int = 8 * 2**20) -> str:
    """The file through /uploads in PATCHes of `chunk` bytes; returns the upload id."""
    size = path.stat().st_size
    meta = "filename " + base64.b64encode(path.name.encode()).decode()
    created = server.api("POST", "/uploads", headers={"Tus-Resumable": "1.0.0", "Upload-Length": str(size),
                                                       "Upload-Metadata": meta})
    assert created.status_code == 201, created.text
    location = created.headers["Location"]
    offset = 0
    with path.open("rb") as handle:
        while offset < size:
            data = handle.read(chunk)
            answer = server.api("PATCH", location, data=data, headers={
                "Tus-Resumable": "1.0.0", "Upload-Offset": str(offset),
                "Content-Type": "application/offset+octet-stream"})
            assert answer.status_code == 204, answer.text
            offset = int(answer.headers["Upload-Offset"])
    return location.rstrip("/").rsplit("/", 1)[1]


def upload_only(mib: int) -> str:
    """A tus upload of `mib` MiB in 8 MiB PATCHes: the HTTP process's peak memory and the rate."""
    with tempfile.TemporaryDirectory(prefix="bench-tus-") as tmp:
        root = Path(tmp)
        big = root / "big.wav"
        with big.open("wb") as out:
            out.write(b"RIFF" + b"\0" * 4092)
            for _ in range(mib):
                out.write(b"\0" * 2**20)
        server = Server(root / "srv", {"MAX_FILE_SIZE": str(2**31), "ENABLE_AUTHORIZATION": "false"})
        server.root.mkdir(parents=True, exist_ok=True)
        server.start()
        try:
            before = rss_kib(server.proc.pid)
            peak = [before]
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.05):
                    peak[0] = max(peak[0], rss_kib(server.proc.pid))

            thread = threading.Thread(target=sample, daemon=True)
            thread.start()
            started = time.perf_counter()
            tus_upload(server, big)
            took = time.perf_counter() - started
            stop.set()
            thread.join()
        finally:
            server.stop()
    return (f"tus upload of {mib} MiB in 8 MiB PATCHes: {mib / took:.0f} MiB/s; HTTP process RSS "
            f"{before / 1024:.0f} MiB before, peak {peak[0] / 1024:.0f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upload-only-mib", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=120.0)
    parser.add_argument("--via", choices=("tus", "multipart"), default="tus")
    parser.add_argument("--vad", choices=("silero", "pyannote"), default="silero", help="WHISPER_VAD of the server")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "long-recording.txt"))
    args = parser.parse_args()
    if args.upload_only_mib:
        print(upload_only(args.upload_only_mib))
        return 0
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    host = machine()
    say(f"bench/long_recording.py --minutes {args.minutes:g} --via {args.via} --vad {args.vad}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {host['cores']} cores ({host['cpu']}), "
        f"{host['ram_gib']} GiB, load average {host['load_avg_1m_at_start']:.1f} at the start; "
        "tiny.en, warm engine worker, CPU, int8")
    with tempfile.TemporaryDirectory(prefix="bench-long-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        audio, script = make_audio(root, args.minutes)
        seconds = float(subprocess.run(["soxi", "-D", str(audio)], capture_output=True, text=True).stdout)
        say(f"audio: {seconds / 3600:.2f} h of espeak-ng speech and silence, {audio.stat().st_size / 2**20:.1f} MiB FLAC, "
            f"made in {time.perf_counter() - started:.0f} s")
        server = Server(root / "srv", {
            "WHISPER_ENGINE": "worker", "WHISPER_CMD": str(REPO / "whisperx.sh"),
            "WHISPER_MODELS_DIR": str(REPO / "models"), "ENABLE_AUTHORIZATION": "false", "RUST_LOG": "info",
            "WHISPER_DEFAULT_DIARIZE": "false", "MAX_FILE_SIZE": str(2**30), "WHISPER_VAD": args.vad,
        })
        server.root.mkdir(parents=True, exist_ok=True)
        server.start()
        try:
            deadline = time.monotonic() + 600
            while server.api("GET", "/status").json()["engine"]["loaded_models"] == []:
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.5)
            engine_pid = server.api("GET", "/status").json()["engine"]["pid"]
            peaks = {"server": 0, "engine": 0, "engine_cpu": 0.0}
            stop = threading.Event()
            cpu_before = cpu_seconds(engine_pid)

            def sample() -> None:
                while not stop.wait(0.2):
                    peaks["server"] = max(peaks["server"], rss_kib(server.proc.pid))
                    peaks["engine"] = max(peaks["engine"], rss_kib(engine_pid))
                    try:
                        peaks["engine_cpu"] = cpu_seconds(engine_pid) - cpu_before
                    except (OSError, IndexError):
                        pass

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            server_before = rss_kib(server.proc.pid)
            t0 = time.perf_counter()
            if args.via == "tus":
                upload_id = tus_upload(server, audio)
                response = server.api("POST", "/transcription", files={"upload": (None, upload_id)},
                                      data={"response_format": "json", "diarize": "false"})
            else:
                response = server.submit(audio, response_format="json", diarize="false", timeout=600)
            assert response.status_code == 202, response.text
            job_id = response.json()["job_id"]
            uploaded = time.perf_counter() - t0
            say(f"upload ({args.via}): {uploaded:.1f} s")
            progress: list[tuple[float, float | None, str | None]] = []
            while True:
                body = server.status(job_id).json()
                if body["status"] in ("Completed", "Failed"):
                    break
                if body["status"] == "Processing":
                    point = (time.perf_counter() - t0, body.get("progress"), body.get("stage"))
                    if not progress or point[1:] != progress[-1][1:]:
                        progress.append(point)
                time.sleep(2)
            took = time.perf_counter() - t0
            assert body["status"] == "Completed", body
            result = server.api("GET", f"/transcription/{job_id}/result", timeout=120)
            stop.set()
            sampler.join()
            assert result.status_code == 200, result.text
            data = result.json()
            spoken = " ".join(segment.get("text", "") for segment in data.get("segments", []))
            say(f"job: Completed in {took:.0f} s wall for {seconds:.0f} s of audio "
                f"({seconds / took:.1f}x real time; load average {os.getloadavg()[0]:.1f} at the end); engine CPU {peaks['engine_cpu']:.0f} s "
                f"({seconds / max(peaks['engine_cpu'], 1):.1f}x real time per CPU second)")
            stages: dict[str, list[str]] = {}
            for t, p, stage in progress:
                stages.setdefault(stage or "?", []).append(f"{p or 0:.0f}%@{t:.0f}s")
            say(f"progress: {len(progress)} distinct (stage, percent) values seen while Processing (polled every 2 s)")
            for stage, moves in stages.items():
                shown = moves if len(moves) <= 8 else moves[:4] + ["..."] + moves[-3:]
                say(f"  {stage}: {len(moves)} values: " + ", ".join(shown))
            done = [line.split("worker done in ", 1)[1] for line in server.log().splitlines() if "worker done in " in line]
            if done:  # the engine's own stage times: the audio read, VAD and transcription, word times, the rest
                say(f"engine's stage times (s): {done[-1]}")
            say(f"server RSS: {server_before / 1024:.0f} MiB before, peak {peaks['server'] / 1024:.0f} MiB "
                f"(the HTTP process; the file streamed to disk)")
            say(f"engine worker RSS: peak {peaks['engine'] / 1024:.0f} MiB")
            limit = config.load(environ={}, conf_path=os.devnull).job_timeout(seconds)
            say(f"job time limit by default (WHISPER_JOB_TIMEOUT_BASE_SECONDS + _PER_AUDIO_SECOND x its audio): "
                f"{limit:.0f} s, {limit / took:.0f}x what it took")
            say(f"result: {len(result.content) / 1024:.0f} KiB JSON body, {len(data.get('segments', []))} segments, "
                f"{len(spoken.encode()) / 1024:.0f} KiB of segment text, {len(spoken.split())} words")
            say(f"word error rate against the script ({len(words(script))} words): {wer(script, spoken):.3f}")
        finally:
            server.stop()
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(json.dumps({"written": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
