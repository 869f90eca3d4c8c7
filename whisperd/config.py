"""Configuration: environment, then whisper_api.conf (TOML), then defaults; validated once."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from .urlpolicy import HostPolicy

REPO_DIR = Path(__file__).resolve().parent.parent
OUTPUT_FORMATS = ("txt", "srt", "vtt", "tsv", "json", "aud")
DEVICES = ("cuda", "cpu")
LOG_LEVELS = ("error", "warn", "info", "debug", "trace")


class ConfigError(Exception):
    """A configuration value that cannot be used; the message names the variable."""


def parse_bool(value: Any) -> bool:
    """Booleans accept true/false/1/0/yes/no/on/off in any case (and TOML booleans)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _int(minimum: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError("expected a whole number")
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ValueError("expected a whole number") from None
        if number < minimum:
            raise ValueError(f"expected a whole number >= {minimum}")
        return number

    return convert


def _float(minimum: float) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        try:
            number = float(str(value).strip())
        except ValueError:
            raise ValueError("expected a number") from None
        if number < minimum:
            raise ValueError(f"expected a number >= {minimum}")
        return number

    return convert


def _choice(*allowed: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in allowed:
            raise ValueError("expected one of " + ", ".join(allowed))
        return text

    return convert


def _text(value: Any) -> str:
    if isinstance(value, (dict, list)):
        raise ValueError("expected a string")
    return str(value)


def _optional_text(value: Any) -> str | None:
    text = _text(value).strip()
    return text or None


def _validator_spec(value: Any) -> str:
    text = _text(value).strip()
    if text and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", text):
        raise ValueError("expected module:function, e.g. mysite.auth:validate_token")
    return text


def _device_index(value: Any) -> str:
    return str(_int(0)(value))


def _host_policy(value: Any) -> str:
    text = _text(value)
    HostPolicy.parse(text)  # a bad entry stops start-up here, with the entry named
    return text


# Relative paths in the file are taken from the file's own directory, so the shipped
# configuration works from any working directory.
PATH_SETTINGS = ("WHISPER_CMD", "WHISPER_MODELS_DIR", "WHISPER_OUTPUT_DIR", "WHISPER_TMP_FILES",
                 "WHISPER_HF_TOKEN_FILE", "WHISPER_DB_PATH", "WHISPER_METRICS_DIR")

# name -> (default, converter). Every variable of the spec's table is here, with its default.
SETTINGS: dict[str, tuple[Any, Callable[[Any], Any]]] = {
    "WHISPER_CMD": ("/home/llm/whisper_api/whisperx.sh", _text),
    "WHISPER_MODELS_DIR": ("/models", _text),
    "WHISPER_OUTPUT_DIR": ("/home/llm/whisper_api/output", _text),
    "WHISPER_OUTPUT_FORMAT": ("txt", _choice(*OUTPUT_FORMATS)),
    "WHISPER_DEVICE": ("cuda", _choice(*DEVICES)),
    "WHISPER_DEVICE_INDEX": ("0", _device_index),
    "WHISPER_TMP_FILES": ("/home/llm/whisper_api/tmp", _text),
    "WHISPER_API_HOST": ("127.0.0.1", _text),
    "WHISPER_API_PORT": (8181, _int(0)),
    "WHISPER_API_TIMEOUT": (480, _int(1)),
    "WHISPER_API_KEEPALIVE": (480, _int(1)),
    "HTTP_WORKER_NUMBER": (0, _int(0)),
    "WHISPER_JOB_RETENTION_HOURS": (48.0, _float(0)),
    "WHISPER_CLEANUP_INTERVAL_HOURS": (1.0, _float(0.0001)),
    "MAX_FILE_SIZE": (536870912, _int(1)),
    "ENABLE_CONCURRENCY": (False, parse_bool),
    "MAX_CONCURRENT_JOBS": (6, _int(1)),
    "ENABLE_AUTHORIZATION": (True, parse_bool),
    "SYNC_REQUEST_TIMEOUT_SECONDS": (1800.0, _float(0)),
    "DEFAULT_SYNC_MODE": (False, parse_bool),
    "RUST_LOG": ("info", _choice(*LOG_LEVELS)),
    "HF_TOKEN": (None, _optional_text),
    "WHISPER_HF_TOKEN_FILE": ("/home/llm/whisper_api/hf_token.txt", _text),
    # Beyond the spec (documented in the README).
    "WHISPER_DB_PATH": ("", _text),  # empty: whisperd.db beside WHISPER_TMP_FILES
    "WHISPER_DEFAULT_MODEL": ("large-v3", _text),
    "WHISPER_DEFAULT_LANGUAGE": ("fr", _text),
    "WHISPER_DEFAULT_DIARIZE": (True, parse_bool),
    "WHISPER_CPU_COMPUTE_TYPE": ("int8", _text),
    "WHISPER_CUDA_COMPUTE_TYPE": ("", _text),  # empty: the engine's own default
    "WHISPER_OFFLINE": ("auto", _choice("auto", "true", "false")),
    "WHISPER_KILL_GRACE_SECONDS": (5.0, _float(0)),
    "WHISPER_JOB_TIMEOUT_SECONDS": (0.0, _float(0)),  # 0: no limit
    "WHISPER_MAX_ATTEMPTS": (3, _int(1)),
    "WHISPER_MAX_PROMPT_CHARS": (4000, _int(0)),
    "WHISPER_SHUTDOWN_GRACE_SECONDS": (10.0, _float(0)),
    # Security (docs/security.md).
    "WHISPER_API_ALLOW_ANY_TOKEN": (False, parse_bool),  # the spec's dummy check; warned at start
    "WHISPER_TOKEN_VALIDATOR": ("", _validator_spec),  # module:function, for a site's own scheme
    "WHISPER_FFPROBE": ("ffprobe", _text),
    "WHISPER_MAX_PENDING_UPLOADS": (32, _int(1)),  # uploads in flight per worker process
    "WHISPER_MIN_FREE_DISK_MB": (500, _int(0)),  # below this, uploads are refused with 507
    "WHISPER_OPENAI_MODEL": ("", _text),  # what "whisper-1" runs; empty: WHISPER_DEFAULT_MODEL
    "WHISPER_METRICS_AUTH": (False, parse_bool),  # false: /metrics answers loopback callers only
    "WHISPER_METRICS_DIR": ("", _text),  # empty: metrics/ beside the ledger
    # The warm engine (docs/warm-engine.md).
    "WHISPER_ENGINE": ("worker", _choice("worker", "cli")),
    "WHISPER_WORKER_CMD": ("", _text),  # empty: WHISPER_CMD --whisperd-worker
    "WHISPER_WORKER_MAX_MODELS": (1, _int(1)),
    "WHISPER_PRELOAD_MODEL": (True, parse_bool),
    "WHISPER_MODEL_IDLE_SECONDS": (1800.0, _float(0)),  # 0: never unload
    "WHISPER_WORKER_START_SECONDS": (120.0, _float(0.1)),
    "WHISPER_WORD_TIMES": (True, parse_bool),
    # Webhooks (docs/web.md): no secret, no callback_url accepted.
    "WHISPER_WEBHOOK_SECRET": (None, _optional_text),
    "WHISPER_WEBHOOK_ALLOWED_HOSTS": ("public", _host_policy),
    "WHISPER_WEBHOOK_MAX_ATTEMPTS": (5, _int(1)),
    "WHISPER_WEBHOOK_BACKOFF_SECONDS": (2.0, _float(0)),
    "WHISPER_WEBHOOK_TIMEOUT_SECONDS": (10.0, _float(0.1)),
}

# Never shown by repr() or in a start-up error.
SECRET_SETTINGS = ("HF_TOKEN", "WHISPER_WEBHOOK_SECRET")


@dataclass(frozen=True)
class Config:
    WHISPER_CMD: str
    WHISPER_MODELS_DIR: str
    WHISPER_OUTPUT_DIR: str
    WHISPER_OUTPUT_FORMAT: str
    WHISPER_DEVICE: str
    WHISPER_DEVICE_INDEX: str
    WHISPER_TMP_FILES: str
    WHISPER_API_HOST: str
    WHISPER_API_PORT: int
    WHISPER_API_TIMEOUT: int
    WHISPER_API_KEEPALIVE: int
    HTTP_WORKER_NUMBER: int
    WHISPER_JOB_RETENTION_HOURS: float
    WHISPER_CLEANUP_INTERVAL_HOURS: float
    MAX_FILE_SIZE: int
    ENABLE_CONCURRENCY: bool
    MAX_CONCURRENT_JOBS: int
    ENABLE_AUTHORIZATION: bool
    SYNC_REQUEST_TIMEOUT_SECONDS: float
    DEFAULT_SYNC_MODE: bool
    RUST_LOG: str
    HF_TOKEN: str | None
    WHISPER_HF_TOKEN_FILE: str
    WHISPER_DB_PATH: str
    WHISPER_DEFAULT_MODEL: str
    WHISPER_DEFAULT_LANGUAGE: str
    WHISPER_DEFAULT_DIARIZE: bool
    WHISPER_CPU_COMPUTE_TYPE: str
    WHISPER_CUDA_COMPUTE_TYPE: str
    WHISPER_OFFLINE: str
    WHISPER_KILL_GRACE_SECONDS: float
    WHISPER_JOB_TIMEOUT_SECONDS: float
    WHISPER_MAX_ATTEMPTS: int
    WHISPER_MAX_PROMPT_CHARS: int
    WHISPER_SHUTDOWN_GRACE_SECONDS: float
    WHISPER_API_ALLOW_ANY_TOKEN: bool
    WHISPER_TOKEN_VALIDATOR: str
    WHISPER_FFPROBE: str
    WHISPER_MAX_PENDING_UPLOADS: int
    WHISPER_MIN_FREE_DISK_MB: int
    WHISPER_OPENAI_MODEL: str
    WHISPER_METRICS_AUTH: bool
    WHISPER_METRICS_DIR: str
    WHISPER_ENGINE: str
    WHISPER_WORKER_CMD: str
    WHISPER_WORKER_MAX_MODELS: int
    WHISPER_PRELOAD_MODEL: bool
    WHISPER_MODEL_IDLE_SECONDS: float
    WHISPER_WORKER_START_SECONDS: float
    WHISPER_WORD_TIMES: bool
    WHISPER_WEBHOOK_SECRET: str | None
    WHISPER_WEBHOOK_ALLOWED_HOSTS: str
    WHISPER_WEBHOOK_MAX_ATTEMPTS: int
    WHISPER_WEBHOOK_BACKOFF_SECONDS: float
    WHISPER_WEBHOOK_TIMEOUT_SECONDS: float
    conf_path: str | None = None

    @property
    def max_running(self) -> int:
        """How many jobs may run at once, across every worker process."""
        return self.MAX_CONCURRENT_JOBS if self.ENABLE_CONCURRENCY else 1

    @property
    def worker_processes(self) -> int:
        cores = os.cpu_count() or 1
        wanted = self.HTTP_WORKER_NUMBER or cores
        return min(wanted, cores)

    @property
    def db_path(self) -> str:
        if self.WHISPER_DB_PATH:
            return self.WHISPER_DB_PATH
        return str(Path(self.WHISPER_TMP_FILES).resolve().parent / "whisperd.db")

    @property
    def openai_model(self) -> str:
        return self.WHISPER_OPENAI_MODEL or self.WHISPER_DEFAULT_MODEL

    @property
    def metrics_dir(self) -> str:
        if self.WHISPER_METRICS_DIR:
            return self.WHISPER_METRICS_DIR
        return str(Path(self.db_path).resolve().parent / "metrics")

    def __repr__(self) -> str:  # secrets must never reach a log through repr()
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in SECRET_SETTINGS:
            if shown.get(name):
                shown[name] = "<set>"
        return f"Config({shown})"


def _read_conf(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    return data


def load(environ: Mapping[str, str] | None = None, conf_path: str | None = None) -> Config:
    """Build the Config: environment first, then the TOML file, then the defaults."""
    environ = os.environ if environ is None else environ
    explicit = conf_path or environ.get("WHISPER_API_CONF")
    path = Path(explicit) if explicit else REPO_DIR / "whisper_api.conf"
    file_values: dict[str, Any] = {}
    if path.is_file() or explicit:
        file_values = _read_conf(path)
    values: dict[str, Any] = {}
    for name, (default, convert) in SETTINGS.items():
        if name in environ:
            raw, origin = environ[name], "environment"
        elif name in file_values:
            raw, origin = file_values[name], str(path)
        else:
            values[name] = default
            continue
        try:
            values[name] = convert(raw)
            if name in PATH_SETTINGS and origin != "environment" and values[name]:
                values[name] = str((path.parent / values[name]).resolve()) if not Path(values[name]).is_absolute() else values[name]
        except ValueError as exc:
            shown = "<hidden>" if name in SECRET_SETTINGS else repr(raw)
            raise ConfigError(f"{name}={shown} (from {origin}): {exc}") from None
    return Config(**values, conf_path=str(path) if path.is_file() else None)
