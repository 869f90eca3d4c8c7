"""Which Whisper models this server can run: CTranslate2 directories under WHISPER_MODELS_DIR.

A model's abilities are read from its own files, not guessed from its name: Whisper's English-only
checkpoints have a 51864-token vocabulary and the multilingual ones 51865 or more (large-v3 adds
<|yue|>), the rule CTranslate2 and faster-whisper use themselves. The languages a multilingual
model knows are its <|xx|> tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .languages import AUTO, WHISPER_LANGUAGES

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_LANGUAGE_TOKEN = re.compile(r"^<\|([a-z]{2,3})\|>$")
MULTILINGUAL_VOCABULARY = 51865
TASKS = ("transcribe", "translate")


def is_valid_name(name: str) -> bool:
    """A model name becomes part of a path: letters, digits, dot, dash, underscore; no '..'."""
    return bool(_NAME.match(name)) and ".." not in name


def local_model_dir(models_dir: str, name: str) -> Path | None:
    """The model's own directory when it holds a CTranslate2 model (nothing to download)."""
    if not is_valid_name(name):
        return None
    candidate = Path(models_dir) / name
    return candidate if (candidate / "model.bin").is_file() else None


def installed_models(models_dir: str) -> list[str]:
    root = Path(models_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if is_valid_name(p.name) and (p / "model.bin").is_file())


@dataclass(frozen=True)
class ModelInfo:
    name: str
    multilingual: bool
    languages: tuple[str, ...]  # the codes it can transcribe, sorted
    size_bytes: int | None  # on disk; None for a model not installed here
    judged_by: str  # "vocabulary" (its files) or "name" (no vocabulary to read)

    @property
    def can_translate(self) -> bool:
        return self.multilingual

    def abilities(self) -> str:
        """What it can do, in words, for an error message."""
        if self.multilingual:
            return f"{self.name} is multilingual: {len(self.languages)} languages, transcribe and translate"
        return f"{self.name} is an English-only model: it transcribes English only and cannot translate"


def _vocabulary(directory: Path) -> list[str] | None:
    text_file = directory / "vocabulary.txt"
    if text_file.is_file():
        lines = text_file.read_text(encoding="utf-8").split("\n")
        return lines[:-1] if lines and lines[-1] == "" else lines
    json_file = directory / "vocabulary.json"
    if json_file.is_file():
        tokens = json.loads(json_file.read_text(encoding="utf-8"))
        return tokens if isinstance(tokens, list) else None
    return None


_CACHE: dict[tuple[str, int, int], tuple[bool, tuple[str, ...]]] = {}


def _judge_vocabulary(directory: Path) -> tuple[bool, tuple[str, ...]] | None:
    for name in ("vocabulary.txt", "vocabulary.json"):
        try:
            stat = (directory / name).stat()
        except OSError:
            continue
        key = (str(directory / name), stat.st_mtime_ns, stat.st_size)
        if key not in _CACHE:
            tokens = _vocabulary(directory) or []
            multilingual = len(tokens) >= MULTILINGUAL_VOCABULARY
            found = {m.group(1) for m in map(_LANGUAGE_TOKEN.match, tokens) if m} & WHISPER_LANGUAGES
            _CACHE[key] = (multilingual, tuple(sorted(found)) if multilingual else ("en",))
        return _CACHE[key]
    return None


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def model_info(models_dir: str, name: str) -> ModelInfo:
    """What a model can do; one not installed here (downloaded by name) is judged by its name."""
    directory = local_model_dir(models_dir, name)
    judged = _judge_vocabulary(directory) if directory is not None else None
    if judged is not None:
        multilingual, languages = judged
        return ModelInfo(name, multilingual, languages, _size(directory), "vocabulary")
    # No vocabulary to read: Whisper's English-only checkpoints are the *.en ones.
    multilingual = not name.endswith(".en")
    languages = tuple(sorted(WHISPER_LANGUAGES)) if multilingual else ("en",)
    return ModelInfo(name, multilingual, languages, _size(directory) if directory else None, "name")


def refusal(info: ModelInfo, language: str, task: str) -> str | None:
    """Why this model cannot do what a job asks (language 'auto' = detect), or None."""
    if task == "translate" and not info.can_translate:
        return f"model '{info.name}' cannot translate: {info.abilities()}; choose a multilingual model"
    if language != AUTO and language not in info.languages:
        if not info.multilingual:
            return (f"model '{info.name}' cannot transcribe language '{language}': {info.abilities()}; "
                    f"choose a multilingual model or language en")
        return f"model '{info.name}' does not know language '{language}'"
    return None


def catalog(models_dir: str, loaded: list[str] | set[str]) -> list[dict]:
    """Each installed model with what it can do, its size on disk and whether the engine holds it now."""
    entries = []
    for name in installed_models(models_dir):
        info = model_info(models_dir, name)
        entries.append({
            "name": name,
            "multilingual": info.multilingual,
            "languages": list(info.languages),
            "tasks": list(TASKS) if info.can_translate else ["transcribe"],
            "size_bytes": info.size_bytes,
            "loaded": name in loaded,
        })
    return entries
