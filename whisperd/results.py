"""A finished job's result: WhisperX's JSON (the canonical copy) and the response built from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .formats import render


class EngineOutputError(Exception):
    """The engine ended without a usable result; the message is the job's failure reason."""


def load_engine_result(output_dir: Path) -> dict[str, Any]:
    found = sorted(output_dir.glob("*.json")) if output_dir.is_dir() else []
    if not found:
        raise EngineOutputError("the engine exited without writing a result")
    try:
        result = json.loads(found[0].read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineOutputError(f"the engine wrote a result that is not valid JSON ({exc.__class__.__name__})") from None
    segments = result.get("segments") if isinstance(result, dict) else None
    if not isinstance(segments, list) or not all(_is_segment(s) for s in segments):
        raise EngineOutputError("the engine wrote a result without a valid list of segments")
    return result


def write_engine_result(output_dir: Path, result: dict[str, Any]) -> None:
    (path,) = sorted(output_dir.glob("*.json"))[:1]
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)


def _is_segment(segment: Any) -> bool:
    return (
        isinstance(segment, dict)
        and isinstance(segment.get("text"), str)
        and isinstance(segment.get("start"), (int, float))
        and isinstance(segment.get("end"), (int, float))
    )


def build_response(result: dict[str, Any], response_format: str, warnings: list[str]) -> dict[str, Any]:
    """The spec's {text, language, segments}; `warnings` only when something was skipped."""
    segments = []
    for segment in result["segments"]:
        item = {"start": segment["start"], "end": segment["end"], "text": segment["text"]}
        if "speaker" in segment:
            item["speaker"] = segment["speaker"]
        segments.append(item)
    response: dict[str, Any] = {
        "text": render(result, response_format),
        "language": result.get("language"),
        "segments": segments,
    }
    if "speakers" in result:  # diarized: who was found, in order of first appearance
        response["speakers"] = list(result["speakers"])
    if warnings:
        response["warnings"] = warnings
    return response
