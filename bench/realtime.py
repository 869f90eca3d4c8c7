"""Live sessions on the real engine: espeak speech streamed at real-time pace over /v1/realtime.

Scenarios, each in the same run on the same server (tiny.en, warm engine):
  one     1 session
  four    4 sessions at once
  batch   1 session while a batch job of the same speech (x3, ~3 min) runs
Per scenario: end of each utterance (in the audio: the end of its espeak-ng clip, and the end of
its voice, ~0.35 s earlier: espeak ends a clip with quiet) to its `completed` (p50/p95), time from the
first speech sent to the first delta, the session's lag over time (whisperd.session.lag: first,
max, last), and the word error rate of the live transcript next to the batch transcript's of the
same file (POST /v1/audio/transcriptions). Goals (issue 26): completed within 1.0 s of the end
of speech at p95 for one session; lag bounded (last <= max of the first half + 1 s) everywhere;
live WER within 0.05 of batch.

    .venv/bin/python bench/realtime.py            # 60 s of speech
    .venv/bin/python bench/realtime.py --quick    # 20 s, scenarios one and batch only
    .venv/bin/python bench/realtime.py --seconds 30 --compare 3   # one session, early final off vs on
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

from common import REPO, machine, pct  # noqa: E402  (puts tests/ on sys.path)
from harness import TOKEN, Server  # noqa: E402
from realtime_client import Live  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Every morning the baker opens his shop before the sun comes up.",
    "Children played football in the park until it started to rain.",
    "The train to the city leaves from platform four at nine o'clock.",
    "She wrote a long letter to her grandmother about the summer holiday.",
    "Our team finished the project two days before the deadline.",
    "The museum shows paintings from many different countries and centuries.",
    "He forgot his umbrella on the bus and got wet walking home.",
    "A small boat sailed slowly across the calm blue lake.",
    "The doctor told him to drink more water and sleep eight hours.",
    "We planted tomatoes and beans in the garden behind the house.",
    "The library will be closed on Monday for repairs to the roof.",
    "Please remember to switch off the lights when you leave the room.",
    "The old bridge was built more than two hundred years ago.",
    "Music filled the hall as the orchestra began to play.",
    "They bought fresh bread, cheese and apples at the market.",
]
GAP_SECONDS = 1.2  # silence between sentences: server VAD ends a turn after 500 ms


def build_speech(directory: Path, seconds: float) -> tuple[Path, list[tuple[float, float, str, float]]]:
    """A mono 24 kHz WAV of sentences with gaps, and each sentence's (start, end of its clip, text,
    end of its voice)."""
    frames = bytearray()
    spans = []
    rate = 24000
    index = 0
    while len(frames) / (2 * rate) < seconds:
        text = SENTENCES[index % len(SENTENCES)]
        index += 1
        part = directory / f"s{index}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(part), text], check=True)
        pcm = subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(part), "-ar", str(rate), "-ac", "1",
                              "-f", "s16le", "-"], check=True, capture_output=True).stdout
        start = len(frames) / (2 * rate)
        frames += pcm
        # espeak-ng ends each clip with ~0.35 s of quiet: the voice's own end is the last sample above 1%.
        samples = memoryview(pcm).cast("h")
        loud = next((i for i in range(len(samples) - 1, -1, -1) if abs(samples[i]) > 328), 0)
        spans.append((start, len(frames) / (2 * rate), text, start + (loud + 1) / rate))
        frames += b"\0\0" * int(GAP_SECONDS * rate)
    path = directory / "speech.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(bytes(frames))
    return path, spans


def wer(reference: str, hypothesis: str) -> float:
    import jiwer

    clean = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                           jiwer.Strip(), jiwer.ReduceToListOfListOfWords()])
    return jiwer.wer(reference, hypothesis, reference_transform=clean, hypothesis_transform=clean)


async def session(port: int, pcm: bytes, spans: list[tuple[float, float, str, float]]) -> dict:
    live = await Live.connect(port)
    await live.send({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 24000}, "transcription": {"model": "whisper-1", "language": "en"},
        "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                           "silence_duration_ms": 500}}}}})
    await live.wait_for("session.updated")
    sent_from = time.monotonic()
    await live.stream(pcm, chunk_seconds=0.1, pace=1.0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (
            len(live.of("conversation.item.input_audio_transcription.completed"))
            + len(live.of("conversation.item.input_audio_transcription.failed"))
            < len(live.of("input_audio_buffer.committed")) or not live.of("input_audio_buffer.committed")):
        await asyncio.sleep(0.1)
    live.close()
    completed = live.of("conversation.item.input_audio_transcription.completed")
    # Each completed against the sentence whose end is nearest before the turn's end.
    stops = {e["item_id"]: e["audio_end_ms"] / 1000 for e in live.of("input_audio_buffer.speech_stopped")}
    latencies = []
    after_voice = []  # from the last audible sample of the sentence
    after_stop = []  # from the server VAD's end of turn (speech_stopped sent) to completed
    stopped_at = {e["item_id"]: e["_at"] for e in live.of("input_audio_buffer.speech_stopped")}
    for event in completed:
        if event["item_id"] in stopped_at:
            after_stop.append(event["_at"] - stopped_at[event["item_id"]])
        stop = stops.get(event["item_id"])
        if stop is None:
            continue
        # The sentence whose end is nearest the turn's end (the VAD may end a turn a little before
        # the synthesizer's trailing quiet, or after the silence it waits for).
        speech_end, voice_end = min(((end, voice) for _, end, _, voice in spans), key=lambda ends: abs(ends[0] - stop))
        if abs(speech_end - stop) < GAP_SECONDS:
            latencies.append(event["_at"] - (sent_from + speech_end))
            after_voice.append(event["_at"] - (sent_from + voice_end))
    deltas = live.of("conversation.item.input_audio_transcription.delta")
    lags = [e["lag_seconds"] for e in live.of("whisperd.session.lag")]
    return {"latencies": latencies, "after_voice": after_voice, "after_stop": after_stop, "first_delta": (deltas[0]["_at"] - (sent_from + spans[0][0])) if deltas else None,
            "lags": lags, "text": " ".join(e["transcript"] for e in completed),
            "skipped": live.of("whisperd.session.lag")[-1]["partial_passes_skipped"] if lags else None,
            "speculated": [live.of("whisperd.session.lag")[-1].get(k) for k in
                           ("final_passes_speculated", "speculative_finals_used")] if lags else None,
            "errors": [e["error"]["code"] for e in live.of("error")]}


def summary(name: str, results: list[dict], reference: str) -> dict:
    latencies = [x for r in results for x in r["latencies"]]
    lags = [r["lags"] for r in results if r["lags"]]
    firsts = [r["first_delta"] for r in results if r["first_delta"] is not None]
    out = {
        "scenario": name, "sessions": len(results),
        "completed_after_speech_end_s": {"p50": round(pct(latencies, 50), 2), "p95": round(pct(latencies, 95), 2),
                                         "n": len(latencies)} if latencies else None,
        "completed_after_voice_end_s": {"p50": round(pct(after_voice, 50), 2), "p95": round(pct(after_voice, 95), 2)}
        if (after_voice := [x for r in results for x in r["after_voice"]]) else None,
        "completed_after_speech_stopped_s": {"p50": round(pct(after_stop, 50), 2), "p95": round(pct(after_stop, 95), 2)}
        if (after_stop := [x for r in results for x in r["after_stop"]]) else None,
        # each session's utterances in order, so that a tail can be traced to its utterance
        "completed_after_speech_end_each_s": [[round(x, 2) for x in r["latencies"]] for r in results],
        "first_delta_s": round(statistics.median(firsts), 2) if firsts else None,
        "lag_s": [{"first": lag[0], "max": max(lag), "last": lag[-1]} for lag in lags],
        "lag_bounded": all(lag[-1] <= max(lag[:max(1, len(lag) // 2)]) + 1.0 for lag in lags),
        "wer": [round(wer(reference, r["text"]), 3) for r in results],
        "partial_passes_skipped": [r["skipped"] for r in results],
        "final_passes_speculated_used": [r["speculated"] for r in results],
        "errors": [r["errors"] for r in results if r["errors"]],
    }
    return out


def start_server(root: Path, final_beam: int, **env: str) -> Server:
    server = Server(root, {
        "WHISPER_CMD": str(REPO / "whisperx.sh"), "WHISPER_MODELS_DIR": str(REPO / "models"),
        "WHISPER_ENGINE": "worker", "WHISPER_OPENAI_MODEL": "tiny.en", "WHISPER_PRELOAD_MODEL": "true",
        "WHISPER_REALTIME_MAX_LAG_SECONDS": "120", "WHISPER_REALTIME_FINAL_BEAM": str(final_beam),
        "MAX_FILE_SIZE": "100000000", "RUST_LOG": "info", **env,
    }).start()
    deadline = time.monotonic() + 180
    while not server.api("GET", "/status").json()["engine"]["loaded_models"]:
        if time.monotonic() > deadline:
            server.stop()
            raise SystemExit("the engine did not load tiny.en in 180 s")
        time.sleep(0.5)
    return server


def compare(args, work: Path, speech: Path, spans, pcm: bytes, reference: str) -> dict:
    """--compare N: one session at a time on two servers, WHISPER_REALTIME_EARLY_FINAL=false (the
    baseline: the final pass starts when the turn ends) and =true, alternating, N sessions each, so
    that both sides meet the same load on the shared machine."""
    servers = {}
    report = {"final_beam": args.final_beam, "machine": machine(), "speech_seconds": round(len(pcm) / 48000, 1),
              "utterances": len(spans), "compare_rounds": args.compare}
    try:
        for mode in ("false", "true"):
            servers[mode] = start_server(work / f"server-{mode}", args.final_beam, WHISPER_REALTIME_EARLY_FINAL=mode)
        with speech.open("rb") as audio:
            batch = servers["true"].api("POST", "/v1/audio/transcriptions", files={"file": ("speech.wav", audio)},
                                        data={"model": "whisper-1", "language": "en"}, timeout=600).json()
        report["batch"] = {"wer": round(wer(reference, batch["text"]), 3)}
        results: dict[str, list[dict]] = {"false": [], "true": []}
        loads = []
        for _ in range(args.compare):
            for mode in ("false", "true"):
                results[mode].append(asyncio.run(session(servers[mode].port, pcm, spans)))
                loads.append(round(os.getloadavg()[0], 2))
    finally:
        for server in servers.values():
            server.stop()
    report["load_avg_1m_after_each_session"] = loads
    report["scenarios"] = [summary("one, early final off (baseline)", results["false"], reference),
                           summary("one", results["true"], reference)]
    base, new = (report["scenarios"][i]["completed_after_speech_stopped_s"] for i in (0, 1))
    report["p95_speech_stopped_to_completed_ratio"] = round(new["p95"] / base["p95"], 2) if base and new else None
    one = report["scenarios"][1]
    report["goals"] = {
        "p95_completed_within_1s_one_session": bool(one["completed_after_speech_end_s"]
                                                    and one["completed_after_speech_end_s"]["p95"] <= 1.0),
        "p95_completed_within_1s_of_voice_end_one_session": bool(one["completed_after_voice_end_s"]
                                                                 and one["completed_after_voice_end_s"]["p95"] <= 1.0),
        "lag_bounded_everywhere": all(s["lag_bounded"] for s in report["scenarios"]),
        "live_wer_within_0.05_of_batch": all(w <= report["batch"]["wer"] + 0.05
                                             for s in report["scenarios"] for w in s["wer"]),
    }
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 s of speech; scenarios one and batch only")
    parser.add_argument("--seconds", type=float, help="length of the speech file (default 60, quick 20)")
    parser.add_argument("--final-beam", type=int, default=5, help="WHISPER_REALTIME_FINAL_BEAM (default 5)")
    parser.add_argument("--compare", type=int, metavar="N",
                        help="instead of the scenarios: N single sessions each on WHISPER_REALTIME_EARLY_FINAL=false "
                             "and =true servers, alternating (a baseline in the same run)")
    parser.add_argument("--out", type=Path, help="also write the report there (bench/results/realtime.json is what "
                                                 "bench/report.py puts in docs/performance.md)")
    args = parser.parse_args()
    seconds = args.seconds or (20.0 if args.quick else 60.0)
    work = Path(tempfile.mkdtemp(prefix="whisperd-bench-live-"))
    speech, spans = build_speech(work, seconds)
    reference = " ".join(text for _, _, text, _ in spans)
    with wave.open(str(speech)) as reader:
        pcm = reader.readframes(reader.getnframes())
    if args.compare:
        report = compare(args, work, speech, spans, pcm, reference)
        report["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
        print(json.dumps(report, indent=2))
        if args.out:
            args.out.write_text(json.dumps(report, indent=2) + "\n")
        return 0
    long_batch = work / "long.wav"  # the speech three times: a batch job that outlasts a session
    subprocess.run(["ffmpeg", "-loglevel", "error", "-stream_loop", "2", "-i", str(speech), "-ar", "16000",
                    str(long_batch)], check=True)
    server = start_server(work / "server", args.final_beam)
    report = {"final_beam": args.final_beam, "machine": machine(), "speech_seconds": round(len(pcm) / 48000, 1), "utterances": len(spans)}
    try:
        started = time.monotonic()
        with speech.open("rb") as audio:
            batch = server.api("POST", "/v1/audio/transcriptions", files={"file": ("speech.wav", audio)},
                               data={"model": "whisper-1", "language": "en"}, timeout=600).json()
        report["batch"] = {"seconds": round(time.monotonic() - started, 2), "wer": round(wer(reference, batch["text"]), 3)}
        report["scenarios"] = []
        report["scenarios"].append(summary("one", [asyncio.run(session(server.port, pcm, spans))], reference))
        if not args.quick:
            async def four():
                return await asyncio.gather(*(session(server.port, pcm, spans) for _ in range(4)))

            report["scenarios"].append(summary("four", asyncio.run(four()), reference))
        job = server.api("POST", "/transcription", files={"file": ("long.wav", long_batch.read_bytes())},
                         data={"language": "en"}).json()["job_id"]
        while server.api("GET", f"/transcription/{job}").json()["status"] == "Queued":
            time.sleep(0.2)
        beside = summary("beside_batch", [asyncio.run(session(server.port, pcm, spans))], reference)
        beside["batch_job_status_at_end"] = server.api("GET", f"/transcription/{job}").json()["status"]
        report["scenarios"].append(beside)
    finally:
        server.stop()
    one = report["scenarios"][0]
    report["goals"] = {
        "p95_completed_within_1s_one_session": bool(one["completed_after_speech_end_s"]
                                                    and one["completed_after_speech_end_s"]["p95"] <= 1.0),
        # The same, counted from the voice's last audible sample rather than the clip's end.
        "p95_completed_within_1s_of_voice_end_one_session": bool(one["completed_after_voice_end_s"]
                                                                 and one["completed_after_voice_end_s"]["p95"] <= 1.0),
        "lag_bounded_everywhere": all(s["lag_bounded"] for s in report["scenarios"]),
        "live_wer_within_0.05_of_batch": all(w <= report["batch"]["wer"] + 0.05
                                             for s in report["scenarios"] for w in s["wer"]),
    }
    report["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
