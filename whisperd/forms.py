"""The form fields of POST /transcription, checked and completed with the configured defaults."""

from __future__ import annotations

from dataclasses import dataclass

from .config import DEVICES, MAX_BATCH_SIZE, OUTPUT_FORMATS, Config, parse_bool
from .fetch import CREDENTIALS_HINT, FIELD
from .languages import AUTO, WHISPER_LANGUAGES
from .models import TASKS, installed_models, is_valid_name, local_model_dir, model_info, refusal
from .errors import Kind, ServiceError
from .integers import integer_input
from .speakers import SPEAKER_FIELDS, parse_speaker_counts
from .urlpolicy import PolicyError, check_url

FIELDS = (
    "file", "language", "model", "diarize", "prompt", "hf_token", "response_format",
    "device", "device_index", "sync", "callback_url", "task",
    "batch_size",  # WhisperX's --batch_size for this job (issue 28); empty: the device's default
    "upload", "url",  # instead of file: a finished resumable upload's id, or a URL to fetch (issue 17)
    *SPEAKER_FIELDS,  # min_speakers, max_speakers, num_speakers (speakers.py, issue 27)
)


@dataclass
class JobRequest:
    language: str
    model: str
    diarize: bool
    prompt: str
    hf_token: str | None
    response_format: str
    device: str
    device_index: str
    sync: bool
    callback_url: str | None = None
    task: str = "transcribe"
    upload: str | None = None  # a finished tus upload's id
    url: str | None = None  # media to fetch
    speakers: dict[str, int] | None = None  # min/max/num speakers for diarization
    batch_size: int | None = None  # None: the device's default (WHISPER_DEVICES' =N, else WHISPER_BATCH_SIZE)


def _bool(fields: dict[str, str], name: str, default: bool) -> bool:
    if name not in fields or fields[name].strip() == "":
        return default
    try:
        return parse_bool(fields[name])
    except ValueError:
        raise ServiceError(Kind.INVALID, f"'{name}' must be true or false (also 1/0, yes/no), got {fields[name][:40]!r}") from None


def _closed(fields: dict[str, str], name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = fields.get(name, "").strip().lower() or default
    if value not in allowed:
        raise ServiceError(Kind.INVALID, f"'{name}' must be one of {', '.join(allowed)}, got {value[:40]!r}")
    return value


def cli_cannot_translate(config: Config, language: str, task: str) -> str | None:
    """WhisperX 3.8.6's command line drops --task unless --language is given (its load_model builds the
    translating tokenizer only for a known language, and transcribe() then defaults to transcribing),
    so through the CLI engine a translation needs the spoken language; the warm worker detects it."""
    if task == "translate" and language == AUTO and config.WHISPER_ENGINE == "cli":
        return ("translating speech of unknown language needs the warm engine (WHISPER_ENGINE=worker): "
                "the WhisperX command line this server runs translates only when told the spoken language; "
                "send 'language'")
    return None


def parse_job_request(fields: dict[str, str], config: Config, offline: bool) -> JobRequest:
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ServiceError(Kind.INVALID, f"unknown form field '{unknown[0]}'; the fields are: {', '.join(FIELDS)}")

    language = fields.get("language", "").strip().lower() or config.WHISPER_DEFAULT_LANGUAGE
    if language != AUTO and language not in WHISPER_LANGUAGES:
        raise ServiceError(Kind.INVALID, f"'language' must be a Whisper language code such as en, fr, de (or 'auto'), got {language[:40]!r}")

    model = fields.get("model", "").strip() or config.WHISPER_DEFAULT_MODEL
    if not is_valid_name(model):
        raise ServiceError(Kind.INVALID, "'model' may contain only letters, digits, '.', '-' and '_' (no '..')")
    if offline and local_model_dir(config.WHISPER_MODELS_DIR, model) is None:
        have = ", ".join(installed_models(config.WHISPER_MODELS_DIR)) or "none"
        raise ServiceError(Kind.INVALID, f"model '{model}' is not installed and this server cannot download models; installed: {have}")

    task = _closed(fields, "task", "transcribe", TASKS)
    why_not = refusal(model_info(config.WHISPER_MODELS_DIR, model), language, task) or \
        cli_cannot_translate(config, language, task)
    if why_not:
        raise ServiceError(Kind.INVALID, why_not)

    prompt = fields.get("prompt", "")
    if len(prompt) > config.WHISPER_MAX_PROMPT_CHARS:
        raise ServiceError(Kind.INVALID, f"'prompt' is longer than {config.WHISPER_MAX_PROMPT_CHARS} characters")

    device_index = fields.get("device_index", "").strip() or config.WHISPER_DEVICE_INDEX
    device_number = integer_input(device_index, "'device_index'", maximum=999)

    batch_text = fields.get("batch_size", "").strip()
    batch_size = integer_input(batch_text, "'batch_size'", maximum=MAX_BATCH_SIZE, minimum=1) if batch_text else None

    callback_url = fields.get("callback_url", "").strip() or None
    if callback_url is not None:
        if not config.WHISPER_WEBHOOK_SECRET:
            raise ServiceError(Kind.INVALID, "this server sends no webhooks (WHISPER_WEBHOOK_SECRET is not set); "
                                   "leave out 'callback_url' and poll the status URL")
        try:
            check_url(callback_url)
        except PolicyError as exc:
            raise ServiceError(Kind.INVALID, str(exc)) from None

    upload = fields.get("upload", "").strip() or None
    url = fields.get("url", "").strip() or None
    if upload is not None and url is not None:
        raise ServiceError(Kind.INVALID, "give one source of audio: 'file', 'upload' or 'url', not several")
    if url is not None:
        if not config.WHISPER_FETCH_ENABLED:
            raise ServiceError(Kind.INVALID, "this server does not fetch URLs (WHISPER_FETCH_ENABLED=false); upload the file "
                                   "instead ('file', or a resumable upload at /uploads)")
        try:
            check_url(url, FIELD, CREDENTIALS_HINT)
        except PolicyError as exc:
            raise ServiceError(Kind.INVALID, str(exc)) from None

    return JobRequest(
        language=language,
        model=model,
        diarize=_bool(fields, "diarize", config.WHISPER_DEFAULT_DIARIZE),
        prompt=prompt,
        hf_token=fields.get("hf_token", "").strip() or None,
        response_format=_closed(fields, "response_format", config.WHISPER_OUTPUT_FORMAT, OUTPUT_FORMATS),
        device=_closed(fields, "device", config.WHISPER_DEVICE, DEVICES),
        device_index=str(device_number),
        sync=_bool(fields, "sync", config.DEFAULT_SYNC_MODE),
        callback_url=callback_url,
        task=task,
        upload=upload,
        url=url,
        speakers=parse_speaker_counts(fields),
        batch_size=batch_size,
    )
