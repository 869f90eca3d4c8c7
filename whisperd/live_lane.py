"""The engine worker's live lane: voice activity and short transcription passes for realtime sessions.

Runs inside the engine venv beside engine_worker.py (stdlib, numpy, onnxruntime, faster-whisper;
nothing of the server). Live work never queues behind batch jobs: it has threads of its own (one
for voice activity, one for transcription passes) and the model gets one CTranslate2 replica more
than the batch slots (engine_worker.LIVE_REPLICAS), so a live pass runs beside a batch chunk on the
same loaded weights instead of waiting for it. Protocol (JSON lines, as the worker's):

  in   {"op": "live_vad", "ref": r, "session": s, "pcm": base64 16 kHz mono s16le}
       {"op": "live_pass", "ref": r, <model spec>, "language": ..., "prompt": ..., "prefix": ...,
        "final": bool, "pcm": base64 16 kHz mono s16le}
       {"op": "live_end", "session": s}
       {"op": "live_detect", "ref": r, <model spec>, "path": 16 kHz WAV, "languages": [...]}
  out  {"event": "live", "ref": r, "probs": [p, ...]}       one speech probability per 32 ms frame
       {"event": "live", "ref": r, "text": "...", "seconds": s}
       {"event": "live", "ref": r, "language": "de", "probability": p}
       {"event": "live", "ref": r, "error": "one line"}

live_detect serves the OpenAI route's `languages` field: language detection on the first 30 s,
its choice limited to the languages given (it shares the pass thread: short, and ahead of batch).
"""

from __future__ import annotations

import base64
import os
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

FRAME = 512  # Silero's frame at 16 kHz: 32 ms
CONTEXT = 64  # samples of the previous frame the model sees with each frame


class _VadState:
    """One session's streaming Silero state: the recurrent state, the last context, leftover samples."""

    def __init__(self, np) -> None:
        self.h = np.zeros((1, 1, 128), dtype="float32")
        self.c = np.zeros((1, 1, 128), dtype="float32")
        self.context = np.zeros(CONTEXT, dtype="float32")
        self.rest = np.zeros(0, dtype="float32")


class LiveLane:
    def __init__(self, models, emit, model_key, short_reason) -> None:
        self.models = models
        self.emit = emit
        self.model_key = model_key
        self.short_reason = short_reason
        self._vad_session = None
        self._states: dict[str, _VadState] = {}
        self._lock = threading.Lock()
        self._vad = ThreadPoolExecutor(max_workers=1, thread_name_prefix="live-vad")
        self._passes = ThreadPoolExecutor(max_workers=1, thread_name_prefix="live-pass")

    def submit(self, message: dict) -> None:
        op = message.get("op")
        if op == "live_vad":
            self._vad.submit(self._answer, self._speech_probs, message)
        elif op == "live_pass":
            self._passes.submit(self._answer, self._transcribe, message)
        elif op == "live_detect":
            self._passes.submit(self._answer, self._detect, message)
        elif op == "live_end":
            with self._lock:
                self._states.pop(str(message.get("session")), None)

    def _answer(self, work, message: dict) -> None:
        try:
            self.emit(event="live", ref=message.get("ref"), **work(message))
        except Exception as exc:  # one pass's failure is that pass's answer; the lane lives on
            traceback.print_exc()
            self.emit(event="live", ref=message.get("ref"), error=self.short_reason(exc))

    @staticmethod
    def _samples(message: dict):
        import numpy as np

        raw = base64.b64decode(message.get("pcm") or "")
        return np.frombuffer(raw[:len(raw) - len(raw) % 2], np.int16).astype(np.float32) / 32768.0

    def _speech_probs(self, message: dict) -> dict:
        import numpy as np

        if self._vad_session is None:
            self._vad_session = _silero()
        with self._lock:
            state = self._states.setdefault(str(message.get("session")), _VadState(np))
        audio = np.concatenate([state.rest, self._samples(message)])
        usable = len(audio) - len(audio) % FRAME
        state.rest = audio[usable:]
        if not usable:
            return {"probs": []}
        frames = audio[:usable].reshape(-1, FRAME)
        contexts = np.concatenate([state.context[None, :], frames[:-1, -CONTEXT:]], 0)
        state.context = frames[-1, -CONTEXT:].copy()
        batch = np.concatenate([contexts, frames], 1).astype(np.float32)
        out, state.h, state.c = self._vad_session.run(None, {"input": batch, "h": state.h, "c": state.c})
        return {"probs": [round(float(p), 3) for p in np.asarray(out).reshape(-1)]}

    def _transcribe(self, message: dict) -> dict:
        started = time.perf_counter()
        audio = self._samples(message)
        key = self.model_key(message)
        base = self.models.acquire(key)
        try:
            language = message.get("language") or None
            if key.model.rstrip("/").endswith(".en"):
                language = "en"
            final = bool(message.get("final"))
            # Partials decode greedily at temperature 0 (they are checked by the next pass anyway);
            # the final pass decodes as a batch job does (beam 5 unless the server says otherwise, the
            # fallback temperatures).
            segments, _info = base.model.transcribe(
                audio, language=language, task=message.get("task") or "transcribe",
                beam_size=int(message.get("beam") or 5) if final else 1,
                temperature=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0] if final else 0.0,
                initial_prompt=message.get("prompt") or None, prefix=message.get("prefix") or None,
                condition_on_previous_text=False, vad_filter=False, without_timestamps=True,
                hotwords=message.get("hotwords") or None)
            text = "".join(segment.text for segment in segments).strip()
        finally:
            self.models.release(key)
        return {"text": text, "seconds": round(time.perf_counter() - started, 3)}

    def _detect(self, message: dict) -> dict:
        allowed = [str(code) for code in message.get("languages") or []]
        key = self.model_key(message)
        base = self.models.acquire(key)
        try:
            whisper = base.model
            if not whisper.model.is_multilingual:
                if "en" in allowed:
                    return {"language": "en", "probability": 1.0}
                raise ValueError("this model knows English only, which is not among 'languages'")
            _language, _probability, ranked = whisper.detect_language(_read_wav_head(message["path"]))
        finally:
            self.models.release(key)
        best = max(((code, prob) for code, prob in ranked if code in allowed), key=lambda pair: pair[1],
                   default=None)
        if best is None:
            raise ValueError("none of 'languages' is a language this model detects")
        return {"language": best[0], "probability": round(float(best[1]), 4)}


def _read_wav_head(path: str, seconds: float = 30.0):
    """The first `seconds` of a 16 kHz mono 16-bit WAV (the server's canonical audio) as float32."""
    import wave

    import numpy as np

    with wave.open(path, "rb") as reader:
        if (reader.getnchannels(), reader.getsampwidth(), reader.getframerate()) != (1, 2, 16000):
            raise ValueError("the audio is not the server's canonical 16 kHz mono WAV")
        data = reader.readframes(int(16000 * seconds))
    return np.frombuffer(data[:len(data) - len(data) % 2], np.int16).astype(np.float32) / 32768.0


def _silero():
    """faster-whisper's own Silero VAD v6 (in its wheel: nothing downloaded), one thread."""
    import onnxruntime
    from faster_whisper.utils import get_assets_path

    options = onnxruntime.SessionOptions()
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = 1
    options.log_severity_level = 4
    path = os.path.join(get_assets_path(), "silero_vad_v6.onnx")
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"], sess_options=options)
