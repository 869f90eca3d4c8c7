#!/usr/bin/env python3
"""Benchmark of intake's decoding: what a 30 s 44.1 kHz mp3 and a 30 s 44.1 kHz WAV add to the no-op
engine's sequential run, probed and decoded by ffprobe+ffmpeg processes (WHISPER_DECODER=ffmpeg,
before) and by the warm PyAV decoder (=pyav, after), in one run, beside a 16 kHz mono WAV (copied,
nothing decoded) of the same length.

Usage: /work/main/.venv/bin/python bench/decoder.py [--jobs 40] [--out bench/results/decoder.txt]
Each row is bench 4's sequential queue (bench/scheduling.py: 5 warm-up jobs, then `--jobs` queued at
once; the engine alone run the same number of times in the same run is the baseline). "added by
decoding" is the row's service overhead per job minus the 16 kHz WAV's (goal <= 15 ms).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from bench.common import machine, write_noop_engine  # noqa: E402
from bench.scheduling import throughput  # noqa: E402


def made(work: Path, name: str, *args: str) -> bytes:
    path = work / name
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "sine=d=30:f=440", *args, "-y",
                    str(path)], check=True)
    return path.read_bytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    started = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-decoder-") as tmp:
        work = Path(tmp)
        engine = write_noop_engine(work)
        audio = {
            "16 kHz mono WAV (copied)": made(work, "c.wav", "-ar", "16000", "-ac", "1"),
            "44.1 kHz mp3": made(work, "m.mp3", "-ar", "44100", "-ac", "2"),
            "44.1 kHz WAV": made(work, "w.wav", "-ar", "44100", "-ac", "2"),
        }
        base = throughput(work, engine, args.jobs, 1, audio["16 kHz mono WAV (copied)"])
        rows.append(("16 kHz mono WAV (copied)", "-", base))
        for name in ("44.1 kHz mp3", "44.1 kHz WAV"):
            for decoder in ("ffmpeg", "pyav"):
                rows.append((name, decoder, throughput(work, engine, args.jobs, 1, audio[name],
                                                       {"WHISPER_DECODER": decoder})))
    info = machine()
    lines = [f"bench/decoder.py, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: {info['cores']} cores, "
             f"{info['cpu']}; load average at start {info['load_avg_1m_at_start']:.1f}; {args.jobs} sequential jobs "
             f"a row, no-op engine, 30 s of audio each; {time.monotonic() - started:.0f} s",
             f"{'upload':26} {'decoder':7} {'jobs/s':>7} {'overhead/job':>13} {'added by decoding':>18} "
             f"{'intake alone':>13}"]
    for name, decoder, row in rows:
        added = row["overhead_ms_per_job"] - base["overhead_ms_per_job"]
        lines.append(f"{name:26} {decoder:7} {row['jobs_per_s']:7.1f} {row['overhead_ms_per_job']:10.1f} ms "
                     f"{'' if decoder == '-' else f'{added:+.1f} ms':>18} {row['intake_ms_per_upload']:10.1f} ms")
    lines.append("goal: the warm decoder's rows add at most 15 ms a job")
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
