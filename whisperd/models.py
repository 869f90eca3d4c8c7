"""Which Whisper models this server can run: CTranslate2 directories under WHISPER_MODELS_DIR."""

from __future__ import annotations

import re
from pathlib import Path

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


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
