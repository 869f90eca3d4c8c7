"""Speakers on the server side: the speaker-count form fields, reference samples, and OpenAI's diarized_json.

The engine finds the speakers (engine_diarize.py); this module checks what a client asks of it
and shapes what it found for OpenAI's gpt-4o-transcribe-diarize answer.
"""

from __future__ import annotations

import base64
import binascii
import re
import string
from typing import Any

from .errors import Kind, ServiceError

SPEAKER_FIELDS = ("min_speakers", "max_speakers", "num_speakers")
MAX_SPEAKERS = 15  # senko's spectral clustering looks for at most 15 (its max_num_spks)
MAX_REFERENCES = 4  # as OpenAI's known_speaker_references
REFERENCE_SECONDS = (2.0, 10.0)  # OpenAI's bounds for a reference sample
VOICE_SECONDS = (2.0, 30.0)  # an enrolled voice's sample (POST /voices)
MAX_NAME_CHARS = 64
_DATA_URL = re.compile(r"^data:([a-z0-9.+/-]*)(;[a-z0-9=.+-]*)*?;base64,", re.IGNORECASE)


def parse_speaker_counts(fields: dict[str, str]) -> dict[str, int]:
    """min_speakers / max_speakers / num_speakers as whole numbers 1..15 that agree; ServiceError(400)."""
    counts: dict[str, int] = {}
    for name in SPEAKER_FIELDS:
        raw = fields.get(name, "").strip()
        if not raw:
            continue
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_SPEAKERS:
            raise ServiceError(Kind.INVALID, f"'{name}' must be a whole number from 1 to {MAX_SPEAKERS}, got {raw[:40]!r}")
        counts[name] = int(raw)
    low, high = counts.get("min_speakers"), counts.get("max_speakers")
    if low and high and low > high:
        raise ServiceError(Kind.INVALID, f"'min_speakers' ({low}) is more than 'max_speakers' ({high})")
    fixed = counts.get("num_speakers")
    if fixed and ((low and fixed < low) or (high and fixed > high)):
        raise ServiceError(Kind.INVALID, f"'num_speakers' ({fixed}) is outside min_speakers..max_speakers")
    return counts


def check_name(name: str, field: str = "name") -> str:
    """A speaker's name as given, trimmed: 1-64 printable characters."""
    name = name.strip()
    if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise ServiceError(Kind.INVALID, f"'{field}' must be 1 to {MAX_NAME_CHARS} printable characters")
    return name


def decode_data_url(value: str, field: str) -> bytes:
    """The bytes of a base64 data URL (data:audio/wav;base64,...); ServiceError(400) for anything else."""
    value = value.strip()
    match = _DATA_URL.match(value)
    if not match:
        raise ServiceError(Kind.INVALID, f"'{field}' entries must be data URLs (data:audio/...;base64,...)")
    try:
        data = base64.b64decode(value[match.end():], validate=True)
    except (binascii.Error, ValueError):
        raise ServiceError(Kind.INVALID, f"'{field}' holds a data URL that is not valid base64") from None
    if not data:
        raise ServiceError(Kind.INVALID, f"'{field}' holds an empty data URL")
    return data


def letters(count: int) -> list[str]:
    """A, B, ... Z, AA, AB, ...: OpenAI's labels for speakers it cannot name."""
    out = []
    for index in range(count):
        label, n = "", index
        while True:
            label = string.ascii_uppercase[n % 26] + label
            n = n // 26 - 1
            if n < 0:
                break
        out.append(label)
    return out


def diarized_json(result: dict[str, Any], duration: float, task: str = "transcribe") -> dict[str, Any]:
    """OpenAI's diarized_json (gpt-4o-transcribe-diarize) from WhisperX's JSON with speakers: named
    speakers keep their names, the others become A, B, ... in order of first appearance."""
    segments = result["segments"]
    found = list(result.get("speakers") or [])
    for segment in segments:
        speaker = segment.get("speaker")
        if speaker is not None and speaker not in found:
            found.append(speaker)
    unnamed = [s for s in found if re.fullmatch(r"SPEAKER_\d+", s)]
    label = dict(zip(unnamed, letters(len(unnamed))))
    out = []
    for index, segment in enumerate(segments):
        speaker = segment.get("speaker")
        out.append({
            "id": f"seg_{index}",
            "type": "transcript.text.segment",
            "start": float(segment["start"]),
            "end": float(segment["end"]),
            "text": segment["text"].strip(),
            # A segment no speaker overlapped (none found at all): the first letter, as one voice.
            "speaker": label.get(speaker, speaker) if speaker is not None else "A",
        })
    return {
        "duration": round(float(duration), 3),
        "task": task,
        "text": " ".join(s["text"] for s in out if s["text"]),
        "segments": out,
        "usage": {"type": "duration", "seconds": round(float(duration), 3)},
    }
