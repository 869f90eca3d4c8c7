"""Runs inside the WhisperX engine venv: where one CLI job's time goes, measured in one warm process.

    <engine venv>/bin/python -I bench/engine_probe.py MODEL_DIR AUDIO REPEATS
prints one JSON line: seconds to import whisperx.asr, to load the model, the first
transcription, and the median of REPEATS more with the model already loaded. The calls and
options are the CLI's own for a job the server sends (cpu, int8, a language, no alignment).
"""

import json
import statistics
import sys
import time

t0 = time.perf_counter()
import whisperx  # noqa: E402
import whisperx.asr  # noqa: E402  (the CLI's heavy import: torch, pyannote, transformers)

t1 = time.perf_counter()
model_dir, audio_path, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = whisperx.asr.load_model(model_dir, device="cpu", compute_type="int8", language="en")
t2 = time.perf_counter()


def transcribe() -> float:
    start = time.perf_counter()
    audio = whisperx.load_audio(audio_path)
    result = model.transcribe(audio, batch_size=8, language="en")  # the CLI's default batch size
    assert result["segments"], "no transcript"
    return time.perf_counter() - start


first = transcribe()
warm = [transcribe() for _ in range(repeats)]
print(json.dumps({"import_s": t1 - t0, "load_model_s": t2 - t1, "first_transcribe_s": first,
                  "warm_transcribe_s": statistics.median(warm)}))
