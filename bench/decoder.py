#!/usr/bin/env python3
"""Benchmark of intake's decoding: what a 30 s 44.1 kHz mp3 and a 30 s 44.1 kHz WAV add to the no-op
engine's sequential run, probed and decoded by ffprobe+ffmpeg processes (WHISPER_DECODER=ffmpeg,
before) and by the warm PyAV decoder (=pyav, after), in one run, beside a 16 kHz mono WAV (copied,
nothing decoded) of the same length.

Usage: /work/main/.venv/bin/python bench/decoder.py [--jobs 40] [--out bench/results/decoder.txt] [--decoders pyav]
Each row is bench 4's sequential queue (bench/scheduling.py: 5 warm-up jobs, then `--jobs` queued at
once; the engine alone run the same number of times in the same run is the baseline). "added by
decoding" is the row's service overhead per job minus the 16 kHz WAV's of the same round (goal <= 15 ms),
the median of `--rounds` rounds (the load of a shared machine moves from one row to the next); the
warm decoder's own CPU time a file is measured in this process too, a figure the load moves less.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

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


def decode_cpu_ms(path: Path, out: Path, runs: int = 15) -> float:
    """CPU time of the warm decoder's own work on one file (its probe, then its decode), in this
    process: what the decoder costs whatever the load, unlike the rows' wall-clock figures."""
    import av

    sys.path.insert(0, str(REPO / "whisperd"))
    import decoder_worker  # noqa: E402  the worker's own functions, as its process runs them
    from whisperd.intake import FORMATS

    av.logging.set_level(av.logging.PANIC)
    times = []
    for _ in range(runs):
        began = time.process_time()
        probed = decoder_worker.probe(av, {"path": str(path), "formats": FORMATS})
        decoder_worker.decode(av, {"path": str(path), "out": str(out), "demuxer": probed["demuxer"],
                                   "formats": FORMATS, "max_frames": None})
        times.append(1000 * (time.process_time() - began))
    return median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decoders", default="ffmpeg,pyav",
                        help="the rows to run, of ffmpeg,pyav (pyav alone: a quick before/after of the warm decoder)")
    args = parser.parse_args()
    started = time.monotonic()
    info = machine()  # the load average at the start
    names = ("44.1 kHz mp3", "44.1 kHz WAV")
    decoders = args.decoders.split(",")
    runs: dict[tuple[str, str], list[dict]] = {}
    added: dict[tuple[str, str], list[float]] = {}
    cpu: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-decoder-") as tmp:
        work = Path(tmp)
        engine = write_noop_engine(work)
        files = {"16 kHz mono WAV (copied)": "c.wav", "44.1 kHz mp3": "m.mp3", "44.1 kHz WAV": "w.wav"}
        audio = {
            "16 kHz mono WAV (copied)": made(work, "c.wav", "-ar", "16000", "-ac", "1"),
            "44.1 kHz mp3": made(work, "m.mp3", "-ar", "44100", "-ac", "2"),
            "44.1 kHz WAV": made(work, "w.wav", "-ar", "44100", "-ac", "2"),
        }
        for name in names:
            cpu[name] = decode_cpu_ms(work / files[name], work / "out.wav")
        # Rounds of the copied WAV and every row back to back: the load of a shared machine moves
        # between rounds, so each row is judged against the baseline of its own round (the median).
        for number in range(args.rounds):
            # A directory a round: throughput() keeps a row's server (and its ledger) under it.
            here = work / f"round-{number}"
            here.mkdir()
            base = throughput(here, engine, args.jobs, 1, audio["16 kHz mono WAV (copied)"])
            runs.setdefault(("16 kHz mono WAV (copied)", "-"), []).append(base)
            for name in names:
                for decoder in decoders:
                    row = throughput(here, engine, args.jobs, 1, audio[name], {"WHISPER_DECODER": decoder})
                    runs.setdefault((name, decoder), []).append(row)
                    added.setdefault((name, decoder), []).append(row["overhead_ms_per_job"] - base["overhead_ms_per_job"])
    lines = [f"bench/decoder.py --jobs {args.jobs} --rounds {args.rounds}, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: "
             f"{info['cores']} cores, {info['cpu']}; load average {info['load_avg_1m_at_start']:.1f} at the start, "
             f"{os.getloadavg()[0]:.1f} at the end; {args.jobs} sequential jobs a row a round, no-op engine, 30 s of "
             f"audio each; medians of {args.rounds} rounds; {time.monotonic() - started:.0f} s",
             f"{'upload':26} {'decoder':7} {'jobs/s':>7} {'overhead/job':>13} {'added by decoding':>18} "
             f"{'(each round)':>22} {'intake alone':>13}"]
    for (name, decoder), row_runs in runs.items():
        def mid(key: str) -> float:
            return median(run[key] for run in row_runs)
        rounds = "" if decoder == "-" else " ".join(f"{value:+.0f}" for value in added[(name, decoder)])
        lines.append(f"{name:26} {decoder:7} {mid('jobs_per_s'):7.1f} {mid('overhead_ms_per_job'):10.1f} ms "
                     f"{'' if decoder == '-' else f'{median(added[(name, decoder)]):+.1f} ms':>18} {rounds:>22} "
                     f"{mid('intake_ms_per_upload'):10.1f} ms")
    lines.append("warm decoder's own CPU a file (decoder_worker.py's probe and decode in one process, median of 15): "
                 + ", ".join(f"{name} {value:.1f} ms" for name, value in cpu.items()))
    lines.append("goal: the warm decoder's rows add at most 15 ms a job")
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
