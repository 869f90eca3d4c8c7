"""OpenAI Realtime transcription events: what a client may send, what the server answers.

Two shapes of the same session: GA (`session.update` with `session.type = "transcription"`,
`audio.input.{format, transcription, turn_detection, noise_reduction}`) and the older beta
(`transcription_session.update` with `input_audio_format`, `input_audio_transcription`,
`turn_detection`, `input_audio_noise_reduction`). A session answers in the shape it was last
configured with (GA until a beta update arrives, or beta from the start when the client sent
`OpenAI-Beta: realtime=v1`).
"""

from __future__ import annotations

import copy
import dataclasses
import secrets
from typing import Any

from .turns import DEFAULTS

GA_FORMATS = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}
GA_OF = {v: k for k, v in GA_FORMATS.items()}
BETA_FORMATS = ("pcm16", "g711_ulaw", "g711_alaw")
NOISE_TYPES = ("near_field", "far_field")
# OpenAI's transcription models: each stands for the model whisper-1 runs here.
OPENAI_MODELS = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "gpt-4o-transcribe-latest",
                 "gpt-4o-mini-transcribe-2025-12-15", "gpt-realtime-whisper")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


class EventError(Exception):
    """A bad client event: answered with an `error` event; the session goes on."""

    def __init__(self, message: str, code: str, param: str | None = None,
                 error_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.type = error_type


def error_event(exc: EventError, event_id: str | None) -> dict[str, Any]:
    return {"type": "error", "event_id": new_id("event"),
            "error": {"type": exc.type, "code": exc.code, "message": exc.message, "param": exc.param,
                      "event_id": event_id}}


@dataclasses.dataclass
class Settings:
    format: str = "pcm16"
    model: str = "whisper-1"
    language: str | None = None
    prompt: str = ""
    turn_detection: dict[str, Any] | None = dataclasses.field(
        default_factory=lambda: {"type": "server_vad", **DEFAULTS})
    noise_reduction: dict[str, Any] | None = None
    include: list[str] | None = None
    shape: str = "ga"  # or "beta"


def _expect(value: Any, kinds: tuple[type, ...], param: str, what: str) -> Any:
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise EventError(f"Invalid type for '{param}': expected {what}, got {type(value).__name__}.",
                         "invalid_type", param)
    return value


def _optional_str(value: Any, param: str) -> str | None:
    if value is None:
        return None
    return _expect(value, (str,), param, "a string")


def _transcription(value: Any, param: str, into: Settings) -> None:
    if value is None:
        return
    _expect(value, (dict,), param, "an object")
    if "model" in value:
        model = _expect(value["model"], (str,), f"{param}.model", "a string").strip()
        if not model:
            raise EventError(f"'{param}.model' must not be empty", "invalid_value", f"{param}.model")
        into.model = model
    if "language" in value:
        language = _optional_str(value["language"], f"{param}.language")
        into.language = (language or "").strip().lower() or None
    if "prompt" in value:
        into.prompt = _optional_str(value["prompt"], f"{param}.prompt") or ""


def _turn_detection(value: Any, param: str, into: Settings) -> None:
    if value is None:
        into.turn_detection = None
        return
    _expect(value, (dict,), param, "an object or null")
    kind = value.get("type", "server_vad")
    if kind != "server_vad":
        raise EventError(f"'{param}.type' {str(kind)[:40]!r} is not supported here: use server_vad or null "
                         "(semantic_vad needs a language model this server does not run)",
                         "unsupported_turn_detection", f"{param}.type")
    merged = dict(into.turn_detection or {"type": "server_vad", **DEFAULTS})
    for name, kinds, what, low, high in (("threshold", (int, float), "a number", 0.0, 1.0),
                                         ("prefix_padding_ms", (int,), "an integer", 0, 10_000),
                                         ("silence_duration_ms", (int,), "an integer", 0, 10_000)):
        if name in value and value[name] is not None:
            number = _expect(value[name], kinds, f"{param}.{name}", what)
            if not low <= number <= high:
                raise EventError(f"'{param}.{name}' must be from {low} to {high}; got {number}",
                                 "invalid_value", f"{param}.{name}")
            merged[name] = number
    merged["type"] = "server_vad"
    into.turn_detection = merged


def _noise(value: Any, param: str, into: Settings) -> None:
    if value is None:
        into.noise_reduction = None
        return
    _expect(value, (dict,), param, "an object or null")
    kind = value.get("type")
    if kind not in NOISE_TYPES:
        raise EventError(f"'{param}.type' must be near_field or far_field", "invalid_value", f"{param}.type")
    into.noise_reduction = {"type": kind}


def _include(value: Any, param: str, into: Settings) -> None:
    if value is None:
        into.include = None
        return
    _expect(value, (list,), param, "an array")
    into.include = [str(item) for item in value]


def apply_update(event: dict[str, Any], current: Settings) -> Settings:
    """The settings after `session.update` / `transcription_session.update`; EventError leaves
    `current` as it was (an update applies whole or not at all)."""
    session = event.get("session")
    _expect(session, (dict,), "session", "an object")
    new = copy.deepcopy(current)
    if event["type"] == "transcription_session.update":
        new.shape = "beta"
        if "input_audio_format" in session:
            fmt = _expect(session["input_audio_format"], (str,), "session.input_audio_format", "a string")
            if fmt not in BETA_FORMATS:
                raise EventError(f"unsupported input_audio_format {fmt[:40]!r}: use pcm16, g711_ulaw or g711_alaw",
                                 "unsupported_audio_format", "session.input_audio_format")
            new.format = fmt
        _transcription(session.get("input_audio_transcription"), "session.input_audio_transcription", new)
        if "turn_detection" in session:
            _turn_detection(session["turn_detection"], "session.turn_detection", new)
        if "input_audio_noise_reduction" in session:
            _noise(session["input_audio_noise_reduction"], "session.input_audio_noise_reduction", new)
        if "include" in session:
            _include(session["include"], "session.include", new)
        return new
    new.shape = "ga"
    if "type" in session and session["type"] != "transcription":
        raise EventError(f"this endpoint runs transcription sessions only: 'session.type' must be "
                         f"\"transcription\", got {str(session['type'])[:40]!r}", "invalid_value", "session.type")
    audio = session.get("audio")
    if audio is not None:
        _expect(audio, (dict,), "session.audio", "an object")
        audio_in = audio.get("input")
        if audio_in is not None:
            _expect(audio_in, (dict,), "session.audio.input", "an object")
            if "format" in audio_in and audio_in["format"] is not None:
                fmt = _expect(audio_in["format"], (dict,), "session.audio.input.format", "an object")
                kind = fmt.get("type")
                if kind not in GA_FORMATS:
                    raise EventError(f"unsupported audio format {str(kind)[:40]!r}: use audio/pcm (24000 Hz), "
                                     "audio/pcmu or audio/pcma", "unsupported_audio_format",
                                     "session.audio.input.format.type")
                if kind == "audio/pcm" and fmt.get("rate", 24000) != 24000:
                    raise EventError("audio/pcm is taken at 24000 Hz only (OpenAI's rate)",
                                     "unsupported_audio_format", "session.audio.input.format.rate")
                new.format = GA_FORMATS[kind]
            _transcription(audio_in.get("transcription"), "session.audio.input.transcription", new)
            if "turn_detection" in audio_in:
                _turn_detection(audio_in["turn_detection"], "session.audio.input.turn_detection", new)
            if "noise_reduction" in audio_in:
                _noise(audio_in["noise_reduction"], "session.audio.input.noise_reduction", new)
    if "include" in session:
        _include(session["include"], "session.include", new)
    return new


def session_object(session_id: str, settings: Settings, expires_at: int) -> dict[str, Any]:
    """The session as session.created / .updated (GA) or transcription_session.* (beta) show it."""
    transcription = {"model": settings.model, "language": settings.language, "prompt": settings.prompt}
    if settings.shape == "beta":
        return {"id": session_id, "object": "realtime.transcription_session", "expires_at": expires_at,
                "input_audio_format": settings.format, "input_audio_transcription": transcription,
                "turn_detection": settings.turn_detection, "input_audio_noise_reduction": settings.noise_reduction,
                "include": settings.include}
    fmt = {"type": GA_OF[settings.format]}
    if settings.format == "pcm16":
        fmt["rate"] = 24000
    return {"id": session_id, "object": "realtime.transcription_session", "type": "transcription",
            "expires_at": expires_at, "include": settings.include,
            "audio": {"input": {"format": fmt, "transcription": transcription,
                                "turn_detection": settings.turn_detection,
                                "noise_reduction": settings.noise_reduction}}}


def session_event(kind: str, session_id: str, settings: Settings, expires_at: int) -> dict[str, Any]:
    """`created` or `updated`, named for the session's shape."""
    prefix = "transcription_session" if settings.shape == "beta" else "session"
    return {"type": f"{prefix}.{kind}", "event_id": new_id("event"),
            "session": session_object(session_id, settings, expires_at)}
