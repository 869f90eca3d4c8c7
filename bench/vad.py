#!/usr/bin/env python3
"""Benchmark of voice activity detection: long espeak talks through the service (warm engine,
tiny.en, sync) with WHISPER_VAD=silero and =pyannote, against faster-whisper's
BatchedInferencePipeline with its own Silero VAD on the same file, model, batch size, threads and
word-timestamp setting (both sides with --word-times, neither without: the service's word times
cost ~11 s of a 10-minute talk that a baseline without them never pays), all in one run. Prints
wall times, the ratio service(silero) / faster-whisper (goal <= 1.3) and the word error rate of each against the script (goal: silero no higher than pyannote).

Usage: /work/main/.venv/bin/python bench/vad.py [--minutes 10] [--rounds 2] [--word-times] [--vads silero]
                                                 [--second-minutes 0] [--out bench/results/vad.txt]
Rounds alternate the service and the baseline so that both see the same machine. The talks are
made here with espeak-ng and sox: distinct sentences with pauses of 0.3 to 2.5 s between them.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from bench.common import machine  # noqa: E402
from bench.warm_engine import venv_python  # noqa: E402
from harness import JFK, Server  # noqa: E402  the test harness's real-server launcher

BATCH_SIZE = 8  # the service's default (WhisperX's --batch_size)
THREADS = 4  # the warm engine's cpu_threads when jobs do not share the cores (the CLI's default)

SENTENCES = """Good morning everyone, and thank you for coming to this talk about offline transcription.
Today I want to explain how a small server can turn long recordings into text.
The first step is to check every upload, because a media file is really a program for the decoder.
We only accept containers that hold their own audio, and we never follow a playlist.
Then the audio is decoded once into sixteen kilohertz mono samples.
Voice activity detection finds the parts of the recording where somebody speaks.
Those parts are merged into chunks of at most thirty seconds.
Each chunk is sent to the speech model in a batch with its neighbours.
The model writes the words, and the server keeps the timing of every segment.
On a laptop without a graphics card, a tiny model is fast enough for meetings.
On a server with a large graphics card, the large model runs many times faster than real time.
The queue keeps every job safe, even when the power goes out in the middle of the night.
When the job is finished, the client downloads the transcript and the files are removed.
Questions from the audience are welcome at the end of the session.
Let us look at the numbers from last week, which were measured on this machine.
A ten minute file took about twenty seconds before we changed the detector.
The new detector runs on the processor and needs no download at all.
That matters for hospitals and courts, where the network is closed on purpose.
Finally, remember that a benchmark measures one machine on one afternoon.
Thank you very much for your attention, and have a pleasant evening.""".splitlines()

VOICES = {"a": ("en-us", "150"), "b": ("en-gb+m3", "140")}

FASTER_WHISPER = r"""
import sys, time
from faster_whisper import BatchedInferencePipeline, WhisperModel
from faster_whisper.audio import decode_audio
model = WhisperModel(sys.argv[1], device="cpu", compute_type="int8", cpu_threads=int(sys.argv[3]))
pipeline = BatchedInferencePipeline(model)
print("ready", flush=True)
for line in sys.stdin:
    started = time.perf_counter()
    audio = decode_audio(sys.argv[2])
    segments, _ = pipeline.transcribe(audio, batch_size=int(sys.argv[4]), language="en",
                                      word_timestamps=sys.argv[5] == "true")
    text = " ".join(s.text.strip() for s in segments)
    print("took", time.perf_counter() - started, text, flush=True)
"""


def make_talk(directory: Path, name: str, minutes: float) -> tuple[Path, str]:
    """A talk of distinct sentences with varied pauses; returns the file and its script."""
    voice, speed = VOICES[name]
    rng = random.Random(name)
    parts, script, seconds = [], [], 0.0
    clips = {}
    for number, sentence in enumerate(SENTENCES):
        wav = directory / f"{name}{number}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", speed, "-w", str(wav), sentence], check=True)
        clips[number] = wav
    index = 0
    while seconds < minutes * 60:
        number = index % len(SENTENCES)
        pause = rng.choice((0.3, 0.6, 1.0, 1.5, 2.5))
        padded = directory / f"{name}p{index}.wav"
        subprocess.run(["sox", str(clips[number]), "-r", "16000", "-c", "1", "-b", "16", str(padded),
                        "pad", "0", str(pause)], check=True)
        seconds += float(subprocess.run(["soxi", "-D", str(padded)], capture_output=True, text=True,
                                        check=True).stdout)
        parts.append(str(padded))
        script.append(SENTENCES[number])
        index += 1
    out = directory / f"talk-{name}.flac"
    subprocess.run(["sox", *parts, str(out)], check=True)
    return out, " ".join(script)


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def wer(reference: str, hypothesis: str) -> float:
    ref, hyp = words(reference), words(hypothesis)
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h))
        previous = current
    return previous[-1] / max(1, len(ref))


def start_service(root: Path, vad: str, word_times: bool) -> Server:
    server = Server(root / vad, {
        "WHISPER_ENGINE": "worker", "WHISPER_CMD": str(REPO / "whisperx.sh"), "WHISPER_VAD": vad,
        # Like with like: the baseline's batch size and word-timestamp setting, and one job at a
        # time, so that the warm engine takes THREADS (4) CPU threads as the baseline does.
        "WHISPER_BATCH_SIZE": str(BATCH_SIZE), "WHISPER_WORD_TIMES": "true" if word_times else "false",
        "ENABLE_CONCURRENCY": "false",
        "WHISPER_MODELS_DIR": str(REPO / "models"), "WHISPER_DEFAULT_MODEL": "tiny.en",
        "WHISPER_DEVICE": "cpu", "SYNC_REQUEST_TIMEOUT_SECONDS": "1200", "ENABLE_AUTHORIZATION": "false",
        "WHISPER_MAX_AUDIO_SECONDS": "36000", "RUST_LOG": "info",
    })
    server.root.mkdir(parents=True, exist_ok=True)
    server.start()
    deadline = time.monotonic() + 300
    while server.api("GET", "/status").json()["engine"]["loaded_models"] == []:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    service_job(server, JFK)  # untimed: the VAD model's first load is not what a job costs
    return server


def service_job(server: Server, audio: Path) -> tuple[float, str]:
    started = time.perf_counter()
    response = server.submit(audio, sync="true", diarize="false", model="tiny.en", language="en", timeout=1200)
    took = time.perf_counter() - started
    assert response.status_code == 200, response.text
    return took, response.json()["text"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the timed talk")
    parser.add_argument("--second-minutes", type=float, default=5.0, help="length of a second talk, another voice (WER only; 0: none)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--word-times", action="store_true",
                        help="word timestamps on both sides (the service's default); off on both without it")
    parser.add_argument("--vads", default="silero,pyannote", help="the service's WHISPER_VAD values to run")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-vad-") as tmp:
        root = Path(tmp)
        talks = {"a": make_talk(root, "a", args.minutes)}
        if args.second_minutes > 0:
            talks["b"] = make_talk(root, "b", args.second_minutes)
        talk, script = talks["a"]
        baseline = subprocess.Popen([venv_python(), "-c", FASTER_WHISPER, str(REPO / "models" / "tiny.en"), str(talk),
                                     str(THREADS), str(BATCH_SIZE), "true" if args.word_times else "false"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True, bufsize=1)
        vads = [vad for vad in args.vads.split(",") if vad]
        times: dict[str, list[float]] = {"faster-whisper": [], **{vad: [] for vad in vads}}
        texts: dict[tuple[str, str], str] = {}
        try:
            assert baseline.stdout.readline().startswith("ready")
            for vad in vads:
                server = start_service(root, vad, args.word_times)
                try:
                    for number in range(args.rounds if vad == "silero" else 1):
                        baseline.stdin.write("go\n")
                        baseline.stdin.flush()
                        answer = baseline.stdout.readline().split(" ", 2)
                        times["faster-whisper"].append(float(answer[1]))
                        texts[("faster-whisper", "a")] = answer[2] if len(answer) > 2 else ""
                        took, texts[(vad, "a")] = service_job(server, talk)
                        times[vad].append(took)
                        print(f"  {vad} round {number + 1}: service {took:.2f} s, faster-whisper "
                              f"{times['faster-whisper'][-1]:.2f} s", file=sys.stderr, flush=True)
                    for name, (audio, _) in talks.items():
                        if name != "a":
                            texts[(vad, name)] = service_job(server, audio)[1]
                finally:
                    server.stop()
        finally:
            baseline.stdin.close()
            baseline.wait(30)
    median = statistics.median
    info = machine()
    say(f"bench/vad.py, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}: {info.get('cores')} cores, "
        f"{info.get('cpu')}; load average at start {info.get('load_avg_1m_at_start')}; tiny.en int8 on the CPU, batch {BATCH_SIZE}, "
        f"{THREADS} threads, word timestamps {'on' if args.word_times else 'off'} on both sides; "
        f"{time.monotonic() - started:.0f} s")
    say(f"talk a: {args.minutes:g} min espeak-ng en-us -s 150; talk b: {args.second_minutes:g} min en-gb+m3 -s 140")
    fw, silero = median(times["faster-whisper"]), median(times["silero"])
    say(f"  faster-whisper BatchedInferencePipeline (own Silero VAD, model loaded): {fw:.2f} s "
        f"(runs {', '.join(f'{t:.2f}' for t in times['faster-whisper'])})")
    for vad in vads:
        say(f"  service, warm engine, sync, WHISPER_VAD={vad}: {median(times[vad]):.2f} s "
            f"(runs {', '.join(f'{t:.2f}' for t in times[vad])})")
    say(f"  service(silero) / faster-whisper = {silero / fw:.2f} (goal <= 1.3)")
    if "pyannote" in times:
        say(f"  service(pyannote) / service(silero) = {median(times['pyannote']) / silero:.2f}")
    for name, (_, script_text) in talks.items():
        row = [f"{who} {wer(script_text, texts[(who, name)]):.3f}" for who in ("silero", "pyannote", "faster-whisper")
               if (who, name) in texts]
        say(f"  WER talk {name} ({len(words(script_text))} words): " + ", ".join(row))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
