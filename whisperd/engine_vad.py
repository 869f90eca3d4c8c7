"""Voice activity detection for WhisperX's chunking, offline: Silero from faster-whisper's wheel, or pyannote.

Engine side (runs in the engine venv: stdlib + WhisperX; nothing from the server package), used by
both the warm engine (engine_worker.py) and the per-job CLI entry (engine_cli.py).

WhisperX's own `vad_method="silero"` fetches the model with `torch.hub.load('snakers4/silero-vad')`,
which needs the network. faster-whisper's wheel already carries Silero's ONNX model
(`faster_whisper/assets/silero_vad_v6.onnx`) and a NumPy driver for it (`get_speech_timestamps`),
so `OfflineSilero` is a WhisperX `Vad` that runs that one: `load_model(..., vad_model=...)` takes
it, and WhisperX's own `merge_chunks` still builds the chunks it transcribes.

The three knobs mean the same under both methods:
- `vad_onset`: speech starts where the speech probability rises to it (Silero's `threshold`);
- `vad_offset`: speech ends where it falls below it (Silero's `neg_threshold`, its hysteresis);
- `chunk_size`: no speech region longer than it (Silero's `max_speech_duration_s`), and WhisperX
  merges regions into chunks of at most that many seconds.
The rest are faster-whisper's own defaults (a region ends after 2 s of silence, 400 ms of padding
each side): on long espeak talks they kept the word error rate at pyannote's (bench/vad.py), where
the batched pipeline's 160 ms did a little worse.
"""

from __future__ import annotations

METHODS = ("silero", "pyannote")
DEFAULT_METHOD = "silero"
SAMPLE_RATE = 16000


def vad_options(onset: float = 0.5, offset: float = 0.363, chunk_size: float = 30) -> dict:
    """WhisperX's vad_options, as its CLI builds them."""
    return {"chunk_size": chunk_size, "vad_onset": onset, "vad_offset": offset}


def offline_silero_class():
    """The Vad subclass (imported lazily: whisperx.vads pulls in pyannote.core and pandas)."""
    from whisperx.diarize import Segment
    from whisperx.vads.vad import Vad

    class OfflineSilero(Vad):
        """Silero VAD from faster-whisper's bundled ONNX model: no download, no torch."""

        def __init__(self, **kwargs) -> None:
            super().__init__(kwargs["vad_onset"])
            self.vad_onset = float(kwargs["vad_onset"])
            offset = kwargs.get("vad_offset")
            # Silero's hysteresis needs end <= start; a larger offset would end speech at once.
            self.vad_offset = min(float(offset), self.vad_onset) if offset is not None else None
            self.chunk_size = float(kwargs["chunk_size"])
            from faster_whisper.vad import get_vad_model

            get_vad_model()  # load the ONNX session now (cached), not inside the first job

        def __call__(self, audio, **kwargs):
            from faster_whisper.vad import VadOptions, get_speech_timestamps

            if audio["sample_rate"] != SAMPLE_RATE:
                raise ValueError("Only 16000Hz sample rate is allowed")
            options = VadOptions(threshold=self.vad_onset, neg_threshold=self.vad_offset,
                                 max_speech_duration_s=self.chunk_size)
            found = get_speech_timestamps(audio["waveform"], options, sampling_rate=SAMPLE_RATE)
            return [Segment(item["start"] / SAMPLE_RATE, item["end"] / SAMPLE_RATE, "UNKNOWN") for item in found]

        @staticmethod
        def preprocess_audio(audio):
            return audio  # faster-whisper's driver takes the float32 NumPy samples as they are

        @staticmethod
        def merge_chunks(segments, chunk_size, onset: float = 0.5, offset=None):
            if not segments:
                return []  # no speech: WhisperX's own merge would fail on an empty list
            return Vad.merge_chunks(segments, chunk_size, onset, offset)

    return OfflineSilero


def make_vad(method: str, device: str = "cpu", device_index: int = 0, options: dict | None = None):
    """A VAD model for `load_model(..., vad_model=...)`: `method` is "silero" or "pyannote"."""
    options = {**vad_options(), **(options or {})}
    if method == "silero":
        return offline_silero_class()(**options)
    if method == "pyannote":
        import torch
        from whisperx.vads import Pyannote

        where = f"cuda:{device_index}" if device == "cuda" else device
        return Pyannote(torch.device(where), token=None, **options)
    raise ValueError(f"Invalid vad_method: {method} (expected one of {', '.join(METHODS)})")


def install_offline_silero() -> None:
    """Make WhisperX's own `vad_method="silero"` (its CLI's `--vad_method silero`) use OfflineSilero."""
    import whisperx.asr
    import whisperx.vads

    cls = offline_silero_class()
    whisperx.asr.Silero = cls
    whisperx.vads.Silero = cls
