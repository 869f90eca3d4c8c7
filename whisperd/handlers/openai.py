"""OpenAI-compatible API: POST /v1/audio/transcriptions and /v1/audio/translations, GET /v1/models,
with OpenAI's error shape.

A transcription or translation here is an ordinary whisperd job (same upload path, queue, ledger,
owner and deletion after delivery); only the request fields and the answer's shape differ.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from .. import capabilities
from ..errors import Kind, ServiceError
from ..formats import render
from ..forms import cli_cannot_translate
from ..jobs import Job
from ..languages import AUTO, LANGUAGE_NAMES, WHISPER_LANGUAGES
from ..intake import Intake, IntakeError
from ..models import catalog, installed_models, local_model_dir, model_info, refusal
from ..segment_feed import FEED
from ..speakers import MAX_REFERENCES, REFERENCE_SECONDS, check_name, decode_data_url, diarized_json
from .base import BaseHandler
from .multipart_upload import MultipartUploadHandler, deliver

log = logging.getLogger("whisperd.http")

ALIAS = "whisper-1"
GRANULARITIES_FIELD = "timestamp_granularities[]"
NAMES_FIELD = "known_speaker_names[]"
REFERENCES_FIELD = "known_speaker_references[]"
# A reference sample as a data URL: 10 s of 48 kHz stereo 16-bit WAV is 2.6 MB in base64.
REFERENCE_FIELD_BYTES = 3 * 1024 * 1024
# keywords / languages: OpenAI's newer fields; the official client sends lists as name[] parts.
LIST_FIELDS = ("keywords[]", "keywords", "languages[]", "languages")
FIELDS = ("file", "model", "language", "prompt", "response_format", "temperature",
          GRANULARITIES_FIELD, "timestamp_granularities", "stream",
          # gpt-4o-transcribe-diarize's (issue 27): chunking_strategy is accepted and left to the
          # server (its "auto"); the client sends an object as chunking_strategy[type] etc.
          "chunking_strategy", NAMES_FIELD, REFERENCES_FIELD) + LIST_FIELDS
# OpenAI's translations take no language (the speech's is detected) and give no word times.
TRANSLATION_FIELDS = ("file", "model", "prompt", "response_format", "temperature", "stream") + LIST_FIELDS
STREAM_KEEPALIVE_SECONDS = 5.0
STREAM_BATCH_SIZE = 1  # a stream=true job's batch size on the warm engine (see post())
# format -> (engine format rendered, Content-Type); json and verbose_json are built here.
PLAIN_FORMATS = {
    "text": ("txt", "text/plain; charset=utf-8"),
    "srt": ("srt", "application/x-subrip; charset=utf-8"),
    "vtt": ("vtt", "text/vtt; charset=utf-8"),
}
RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt", "diarized_json")
# What the job row records as its format, for a later GET /transcription/<id>/result.
JOB_FORMAT = {"json": "json", "verbose_json": "json", "text": "txt", "srt": "srt", "vtt": "vtt",
              "diarized_json": "json"}
# OpenAI's error types by status; the client library picks its exception class from the status.
ERROR_TYPES = {401: "invalid_request_error", 403: "permission_error", 404: "invalid_request_error",
               413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 503: "server_error", 504: "server_error"}


class OpenAIError(ServiceError):
    """A ServiceError that also names the offending parameter and a machine-readable code."""

    def __init__(self, kind: Kind, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(kind, message, headers=headers)
        self.param = param
        self.code = code


class OpenAIErrorsMixin(BaseHandler):
    def error_body(self, message: str, exc: BaseException | None) -> dict[str, Any]:
        status = self.get_status()
        code = getattr(exc, "code", None)
        if status == 401:
            code = code or "invalid_api_key"
        error_type = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return {"error": {"message": message, "type": error_type, "param": getattr(exc, "param", None), "code": code}}


class OpenAIModelsHandler(OpenAIErrorsMixin):
    def get(self) -> None:
        config = self.service.config
        models = catalog(config.WHISPER_MODELS_DIR, self.service.engine_status()["loaded_models"])
        # Beyond OpenAI's four fields (clients keep what they do not know): what each model can do,
        # its size on disk, whether the engine holds it now; whisper-1 names the models it runs.
        data = [{"id": ALIAS, "object": "model", "created": 0, "owned_by": "whisperd",
                 "transcriptions_model": config.openai_model, "translations_model": config.openai_translate_model}]
        for entry in models:
            data.append({"id": entry["name"], "object": "model", "created": 0, "owned_by": "whisperd",
                         **{k: v for k, v in entry.items() if k != "name"}})
        self.send_json({"object": "list", "data": data})


class OpenAITranscriptionHandler(OpenAIErrorsMixin, MultipartUploadHandler):
    allowed_methods = ("OPTIONS", "POST")
    repeatable_fields = frozenset({GRANULARITIES_FIELD, NAMES_FIELD, REFERENCES_FIELD, *LIST_FIELDS})
    # The samples share the body's allowance (the file's limit plus the form's), so an oversized
    # file is still refused by its Content-Length before a byte is read.
    field_limits = {REFERENCES_FIELD: REFERENCE_FIELD_BYTES}
    task = "transcribe"
    fields = FIELDS

    async def post(self) -> None:
        if not self.upload_pending:
            return
        form = self.received_form()
        try:
            request = self._parse(form.fields, form.lists.get(GRANULARITIES_FIELD, []))
            known = self._known_speakers(form.lists, request)
            request.update(keywords_and_languages(self, form.lists, request))
        except OpenAIError as exc:
            self.refuse(exc)
        media = await self.take_in(form)
        if media is None:
            return  # the client left while its file was taken in
        if request["languages"] and request["language"] == AUTO:
            try:
                request["language"] = await detect_among(self, media.canonical_path, request)
            except OpenAIError as exc:
                self.refuse(exc)
        diarize = request["response_format"] == "diarized_json"
        if diarize:
            references = []
            for index, (name, data) in enumerate(known):
                path = await self._take_in_reference(form, index, data)
                if path is None:
                    return  # the client left meanwhile
                references.append((name, path))
            self.stage_speakers({}, references)
        new_job = self.new_job(
            form, media, language=request["language"], model=request["model"],
            response_format=JOB_FORMAT[request["response_format"]], diarize=diarize,
            prompt=request["prompt"], device=self.service.config.WHISPER_DEVICE,
            device_index=self.service.config.WHISPER_DEVICE_INDEX, task=self.task,
            temperature=request["temperature"],
            # stream=true on the warm engine: one chunk a batch, so each chunk's text goes out as soon
            # as it is decoded instead of with the batch of up to WHISPER_BATCH_SIZE chunks it is in.
            batch_size=STREAM_BATCH_SIZE if request["stream"] and self.service.config.WHISPER_ENGINE == "worker"
            else None,
        )
        job = await self.submit(new_job, None)
        log.info("job %s accepted (OpenAI API, %s): %s, %d bytes", job.id, self.task, job.filename, job.upload_bytes)
        if request["stream"]:
            await stream_transcript(self, job)
            return
        ended = await self.service.wait_finished(job.id, self.service.config.SYNC_REQUEST_TIMEOUT_SECONDS or None,
                                                 known=job)  # an outage meanwhile ends in the 504 below
        if ended is None or not ended.finished:
            # OpenAI's API has no "come back later"; the job goes on and stays fetchable by id.
            raise OpenAIError(
                Kind.TIMED_OUT, f"the {'translation' if self.task == 'translate' else 'transcription'} is still "
                     f"{ended.status if ended else 'Queued'} after "
                     f"SYNC_REQUEST_TIMEOUT_SECONDS; it keeps running: fetch it later from "
                     f"/transcription/{job.id}/result", code="timeout",
                # a retry would upload and queue the same audio again
                headers={"x-should-retry": "false", "Location": f"/transcription/{job.id}"},
            )
        try:
            result = await self.service.engine_result_of(ended)
        except ServiceError as exc:
            raise OpenAIError(exc.kind, exc.message, code="transcription_failed") from None
        await self._answer(ended, result, request)

    def _known_speakers(self, lists: dict[str, list[str]], request: dict[str, Any]) -> list[tuple[str, bytes]]:
        """known_speaker_names[] with known_speaker_references[]: [(name, the sample's bytes)]."""
        names, references = lists.get(NAMES_FIELD, []), lists.get(REFERENCES_FIELD, [])
        if not names and not references:
            return []
        if request["response_format"] != "diarized_json":
            raise OpenAIError(Kind.INVALID, "known speakers need response_format=diarized_json", param=NAMES_FIELD)
        if len(names) != len(references):
            raise OpenAIError(Kind.INVALID, f"give one known_speaker_references[] per known_speaker_names[] "
                                   f"({len(names)} names, {len(references)} references)", param=REFERENCES_FIELD)
        if len(names) > MAX_REFERENCES:
            raise OpenAIError(Kind.INVALID, f"at most {MAX_REFERENCES} known speakers", param=NAMES_FIELD)
        try:
            checked = [check_name(name, NAMES_FIELD) for name in names]
            if len(set(checked)) != len(checked):
                raise ServiceError(Kind.INVALID, "known_speaker_names[] must differ from each other")
            return [(name, decode_data_url(data, REFERENCES_FIELD)) for name, data in zip(checked, references)]
        except ServiceError as exc:
            raise OpenAIError(Kind.INVALID, exc.message, param=NAMES_FIELD if "name" in exc.message else REFERENCES_FIELD,
                              code="invalid_known_speakers") from None

    async def _take_in_reference(self, form, index: int, data: bytes) -> str | None:
        """One reference sample through the same intake as an upload (allow-list, duration cap, one
        decode) into the job's staging dir; its file name there, None when the client left."""
        low, high = REFERENCE_SECONDS
        directory = form.file_path.parent / f"reference-{index}"
        try:
            directory.mkdir()
            raw = directory / "upload"
            raw.write_bytes(data)
        except OSError as exc:
            self.refuse(OpenAIError(Kind.INTERNAL, f"the server could not store a reference sample ({exc.strerror})"))
        intake = self._intake = Intake(self.service.config)  # stopped, as the upload's, if the client leaves
        intake.max_seconds = high  # refused at once, before a longer sample is decoded
        shown = f"known_speaker_references[{index}]"
        try:
            media = await intake.accept(raw, directory, shown)
        except IntakeError as exc:
            if exc.kind is Kind.CLIENT_LEFT:
                self._discard()
                return None
            message = exc.message if exc.kind is not Kind.TOO_LARGE else f"the audio of '{shown}' lasts more than {high:g} s"
            self.refuse(OpenAIError(Kind.INVALID if exc.kind in (Kind.TOO_LARGE, Kind.UNSUPPORTED_MEDIA) else exc.kind,
                                    message + f" (a reference sample is {low:g} to {high:g} s of speech)",
                                    param=REFERENCES_FIELD, code="invalid_known_speakers"))
        if self._intake is None:  # the client left while it was decoded; on_connection_close cleaned up
            return None
        self._intake = None
        raw.unlink()
        if media.duration < low:
            self.refuse(OpenAIError(Kind.INVALID, f"the audio of '{shown}' lasts {media.duration:.1f} s; a reference sample "
                                         f"is {low:g} to {high:g} s of speech", param=REFERENCES_FIELD,
                                    code="invalid_known_speakers"))
        if not self.upload_pending:
            return None
        return f"{directory.name}/{media.canonical_path.name}"

    def _parse(self, fields: dict[str, str], granularities: list[str]) -> dict[str, Any]:
        config = self.service.config
        unknown = sorted(set(fields) - set(self.fields) - {f for f in fields if f.startswith("chunking_strategy[")})
        if unknown:
            raise OpenAIError(Kind.INVALID, f"unsupported form field '{unknown[0]}'", param=unknown[0], code="unknown_parameter")
        stream = fields.get("stream", "false").strip().lower()
        if stream not in ("true", "1", "false", "0", ""):
            raise OpenAIError(Kind.INVALID, f"'stream' must be true or false; got {stream[:20]!r}", param="stream")
        stream_on = stream in ("true", "1")

        model = fields.get("model", "").strip()
        if not model:
            raise OpenAIError(Kind.INVALID, "'model' is required: use whisper-1 or a name from GET /v1/models", param="model")
        alias_model = config.openai_translate_model if self.task == "translate" else config.openai_model
        engine_model = alias_model if model == ALIAS else model
        if local_model_dir(config.WHISPER_MODELS_DIR, engine_model) is None:
            if model == ALIAS and not self.service.offline:
                pass  # the configured default may be one the engine downloads on first use
            else:
                have = ", ".join([ALIAS] + installed_models(config.WHISPER_MODELS_DIR))
                raise OpenAIError(Kind.INVALID, f"model '{model[:100]}' is not available on this server; available: {have}",
                                  param="model", code="model_not_found")

        language = fields.get("language", "").strip().lower() or AUTO
        if language != AUTO and language not in WHISPER_LANGUAGES:
            raise OpenAIError(Kind.INVALID, f"'language' must be an ISO-639-1 code Whisper knows, such as en or fr; "
                                   f"got {language[:40]!r}", param="language")
        why_not = refusal(model_info(config.WHISPER_MODELS_DIR, engine_model), language, self.task)
        if why_not:
            if model == ALIAS:
                why_not += f" (whisper-1 runs '{engine_model}' here: set WHISPER_OPENAI_" \
                           f"{'TRANSLATE_' if self.task == 'translate' else ''}MODEL, or send a model's name)"
            raise OpenAIError(Kind.INVALID, why_not, param="language" if self.task == "transcribe" else "model",
                              code="model_cannot_" + self.task)
        why_not = cli_cannot_translate(config, language, self.task)
        if why_not:
            raise OpenAIError(Kind.INVALID, why_not.replace("; send 'language'", " (OpenAI's translations take no language)"),
                              code="translation_needs_worker_engine")

        prompt = fields.get("prompt", "")
        if len(prompt) > config.WHISPER_MAX_PROMPT_CHARS:
            raise OpenAIError(Kind.INVALID, f"'prompt' is longer than {config.WHISPER_MAX_PROMPT_CHARS} characters", param="prompt")

        response_format = fields.get("response_format", "").strip().lower() or "json"
        formats = RESPONSE_FORMATS if self.task == "transcribe" else RESPONSE_FORMATS[:-1]
        if response_format not in formats:
            raise OpenAIError(Kind.INVALID, f"'response_format' must be one of {', '.join(formats)}; "
                                   f"got {response_format[:40]!r}", param="response_format")

        temperature = fields.get("temperature", "").strip()
        value: float | None = None  # not sent: the engine's own schedule (0, 0.2, ... 1.0)
        if temperature:
            try:
                value = float(temperature)
            except ValueError:
                value = -1.0
            if not 0.0 <= value <= 1.0:  # NaN fails this too
                raise OpenAIError(Kind.INVALID, f"'temperature' must be a number from 0 to 1; got {temperature[:40]!r}",
                                  param="temperature")

        if "timestamp_granularities" in fields and not granularities:
            granularities = [fields["timestamp_granularities"]]
        wanted = {g.strip().lower() for g in granularities if g.strip()} or {"segment"}
        if not wanted <= {"segment", "word"}:
            raise OpenAIError(Kind.INVALID, "'timestamp_granularities[]' takes segment and/or word",
                              param=GRANULARITIES_FIELD)
        if "word" in wanted:
            if response_format != "verbose_json":
                raise OpenAIError(Kind.INVALID, "word timestamps need response_format=verbose_json", param=GRANULARITIES_FIELD)
            aligned, why_not = capabilities.alignment_available(
                None if language == AUTO else language, config.WHISPER_MODELS_DIR, self.service.offline)
            # Without an alignment model the warm engine still times words (faster-whisper's own).
            if not aligned and not self.service.engine.times_words:
                raise OpenAIError(Kind.INVALID, "word timestamps are unavailable on this server: " + why_not.split(": ", 1)[-1]
                                  + (" (send 'language' to use an installed alignment model)" if language == AUTO else ""),
                                  param=GRANULARITIES_FIELD, code="word_timestamps_unavailable")
        if stream_on and response_format not in ("json", "text"):
            raise OpenAIError(Kind.INVALID, "stream=true answers with transcript.text.delta/done events: use "
                                   "response_format json or text", param="stream")
        return {"model": engine_model, "language": language, "prompt": prompt, "temperature": value,
                "response_format": response_format, "granularities": wanted, "stream": stream_on}

    async def _answer(self, job: Job, result: dict[str, Any], request: dict[str, Any]) -> None:
        response_format = request["response_format"]
        if response_format in PLAIN_FORMATS:
            engine_format, content_type = PLAIN_FORMATS[response_format]
            await deliver(self, job, render(result, engine_format), content_type)
            return
        text = "".join(segment["text"] for segment in result["segments"]).strip()
        if response_format == "json":
            await deliver(self, job, {"text": text})
            return
        if response_format == "diarized_json":
            body = diarized_json(result, job.audio_seconds or 0.0, job.task)
            if job.warnings:
                body["warnings"] = job.warnings
            await deliver(self, job, body)
            return
        await deliver(self, job, verbose_json(result, text, request["granularities"], job.warnings, job.task))


def keywords_and_languages(handler: "OpenAITranscriptionHandler", lists: dict[str, list[str]],
                           request: dict[str, Any]) -> dict[str, Any]:
    """`keywords` (faster-whisper's hotwords) and `languages` (detect among these only).

    Hotwords are, in faster-whisper, text put before the prompt in the decoder's previous-text
    context; WhisperX's batched pipeline has no hotwords of its own, so the keywords go exactly
    there: in front of the job's prompt (both engines, the CLI's --initial_prompt too)."""
    config = handler.service.config
    keywords = [k.strip() for name in ("keywords[]", "keywords") for k in lists.get(name, []) if k.strip()]
    languages = [code.strip().lower() for name in ("languages[]", "languages")
                 for code in lists.get(name, []) if code.strip()]
    for code in languages:
        if code not in WHISPER_LANGUAGES:
            raise OpenAIError(Kind.INVALID, f"'languages' must hold ISO-639-1 codes Whisper knows; got {code[:40]!r}",
                              param="languages", code="invalid_language")
    language = request["language"]
    if languages and language != AUTO and language not in languages:
        raise OpenAIError(Kind.INVALID, f"'language' {language!r} is not one of 'languages' ({', '.join(languages)})",
                          param="languages")
    if len(set(languages)) == 1:
        request["language"] = language = languages[0]  # nothing left to detect
        why_not = refusal(model_info(config.WHISPER_MODELS_DIR, request["model"]), language, handler.task)
        if why_not:
            raise OpenAIError(Kind.INVALID, why_not, param="languages", code="model_cannot_" + handler.task)
    if languages and language == AUTO and handler.service.engine.mode != "worker":
        raise OpenAIError(Kind.INVALID, "'languages' needs the warm engine (WHISPER_ENGINE=worker) to detect among "
                               "them; send 'language' instead", param="languages", code="languages_need_worker_engine")
    prompt = request["prompt"]
    if keywords:
        prompt = (", ".join(keywords) + (" " + prompt if prompt else "")).strip()
        if len(prompt) > config.WHISPER_MAX_PROMPT_CHARS:
            raise OpenAIError(Kind.INVALID, f"'keywords' and 'prompt' together are longer than {config.WHISPER_MAX_PROMPT_CHARS} "
                                   "characters", param="keywords")
    return {"prompt": prompt, "keywords": keywords, "languages": sorted(set(languages))}


async def detect_among(handler: "OpenAITranscriptionHandler", audio_path: Any, request: dict[str, Any]) -> str:
    """The spoken language among `languages`, by the warm engine's language detection on the
    first 30 s (the same detection WhisperX runs, its choice limited to these)."""
    from ..engines import worker_threads
    from ..engines.worker import model_spec

    config = handler.service.config
    spec = model_spec(config, request["model"], config.WHISPER_DEVICE, config.WHISPER_DEVICE_INDEX,
                      worker_threads(config))
    try:
        answer = await handler.service.engine.live({"op": "live_detect", **spec, "path": str(audio_path),
                                                    "languages": request["languages"]})
    except Exception as exc:  # the engine cannot start, or did not answer
        answer = {"error": str(exc) or exc.__class__.__name__}
    if "error" in answer or answer.get("language") not in request["languages"]:
        raise OpenAIError(Kind.UNAVAILABLE, f"the language could not be detected among {', '.join(request['languages'])}: "
                               f"{answer.get('error') or 'no answer'}", code="language_detection_failed")
    return str(answer["language"])


async def stream_transcript(handler: "OpenAITranscriptionHandler", job: Job) -> None:
    """stream=true: text/event-stream of `transcript.text.delta` then `transcript.text.done` with the
    whole text and usage, as OpenAI's client iterates them. The response starts at once; a delta goes
    out for each segment as the warm engine decodes it (segment_feed.py: when the job runs in this
    process), a comment line every few seconds while nothing else does (proxies and clients see a
    live stream), and whatever text the deltas have not carried (all of it from the CLI engine, or
    from a job another process or node ran) goes out as one delta when the job ends."""
    service = handler.service
    handler.set_status(200)
    handler.set_header("Content-Type", "text/event-stream; charset=utf-8")
    handler.set_header("X-Accel-Buffering", "no")
    segments: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    with FEED.listen(job.id, lambda index, text: segments.put_nowait((index, text))):
        handler.write(f": job {job.id}\n\n")
        await handler.flush()
        sent, ended = await _stream_segments(handler, job, segments)

    def event(body: dict[str, Any]) -> None:
        handler.write("data: " + json.dumps(body, ensure_ascii=False) + "\n\n")

    if ended is None or not ended.finished:
        event({"type": "error", "error": {"message": f"the job is still running after SYNC_REQUEST_TIMEOUT_SECONDS; "
                                                     f"fetch it later from /transcription/{job.id}/result",
                                          "type": "server_error", "param": None, "code": "timeout"}})
        await handler.finish()
        return
    try:
        result = await service.engine_result_of(ended)
    except ServiceError as exc:
        event({"type": "error", "error": {"message": exc.message, "type": "server_error", "param": None,
                                          "code": "transcription_failed"}})
        await handler.finish()
        return
    text = "".join(segment["text"] for segment in result["segments"]).strip()
    if not sent:  # none came while it ran (the CLI engine, another process or node): one per segment now
        for segment in result["segments"]:
            delta = segment["text"] if sent else segment["text"].lstrip()
            if delta:
                event({"type": "transcript.text.delta", "delta": delta, "logprobs": None})
                sent += delta
    elif text.startswith(sent) and text[len(sent):]:  # what the streamed segments did not carry
        event({"type": "transcript.text.delta", "delta": text[len(sent):], "logprobs": None})
    event({"type": "transcript.text.done", "text": text, "logprobs": None,
           "usage": {"type": "duration", "seconds": round(float(ended.audio_seconds or 0.0), 3)}})
    await deliver(handler, ended, "", "text/event-stream; charset=utf-8")


async def _stream_segments(handler: "OpenAITranscriptionHandler", job: Job,
                           segments: "asyncio.Queue[tuple[int, str]]") -> tuple[str, Job | None]:
    """Until the job ends (or SYNC_REQUEST_TIMEOUT_SECONDS): each segment the engine publishes as a
    delta, in order, once each (a job run again after a worker restart publishes from 0 again).
    Returns the text sent so far and the job as it ended (None, or unfinished, when the wait ran out)."""
    service = handler.service
    limit = service.config.SYNC_REQUEST_TIMEOUT_SECONDS or None
    loop = asyncio.get_running_loop()
    deadline = None if limit is None else loop.time() + limit
    sent = ""
    following = 0  # the index of the next segment to send
    ended = None

    def send(index: int, text: str) -> None:
        nonlocal sent, following
        if index != following:
            return  # one already sent, by an earlier run of the job
        following += 1
        delta = text if sent else text.lstrip()
        if delta:
            handler.write("data: " + json.dumps({"type": "transcript.text.delta", "delta": delta, "logprobs": None},
                                                ensure_ascii=False) + "\n\n")
            sent += delta

    while deadline is None or loop.time() < deadline:
        waiting = asyncio.ensure_future(service.wait_finished(job.id, STREAM_KEEPALIVE_SECONDS))
        wrote = False
        try:
            while not waiting.done():
                taking = asyncio.ensure_future(segments.get())
                done, _ = await asyncio.wait({waiting, taking}, return_when=asyncio.FIRST_COMPLETED)
                if taking in done:
                    send(*taking.result())
                    while not segments.empty():
                        send(*segments.get_nowait())
                    await handler.flush()
                    wrote = True
                else:
                    taking.cancel()
        finally:
            waiting.cancel()  # the client went away (flush raised): stop waiting too
        ended = waiting.result()
        while not segments.empty():  # published before the end was seen
            send(*segments.get_nowait())
        if ended is not None and ended.finished:
            break
        if not wrote:
            handler.write(f": {ended.status if ended else 'waiting'}\n\n")
        await handler.flush()
    return sent, ended


class OpenAITranslationHandler(OpenAITranscriptionHandler):
    """POST /v1/audio/translations: English text from speech in any language Whisper knows."""

    repeatable_fields = frozenset(LIST_FIELDS)
    field_limits: dict[str, int] = {}
    task = "translate"
    fields = TRANSLATION_FIELDS


def verbose_json(result: dict[str, Any], text: str, granularities: set[str], warnings: list[str],
                 task: str = "transcribe") -> dict[str, Any]:
    """OpenAI's verbose_json from WhisperX's JSON: segments keep every field WhisperX wrote."""
    segments = result["segments"]
    # A translation is English whatever was spoken (OpenAI says "english" there too).
    language = "en" if task == "translate" else result.get("language") or ""
    body: dict[str, Any] = {
        "task": task,
        "language": LANGUAGE_NAMES.get(language, language),
        # WhisperX does not report the audio's length; the end of speech is the nearest it knows.
        "duration": max((float(s["end"]) for s in segments), default=0.0),
        "text": text,
    }
    if "segment" in granularities:
        body["segments"] = [
            {"id": index, **{k: v for k, v in segment.items() if k != "words"}}
            for index, segment in enumerate(segments)
        ]
    if "word" in granularities:
        body["words"] = [word for segment in segments for word in _timed_words(segment)]
    if "speakers" in result:
        body["speakers"] = list(result["speakers"])
    if warnings:
        body["warnings"] = warnings
    return body


def _timed_words(segment: dict[str, Any]) -> list[dict[str, Any]]:
    """OpenAI's words always carry times; WhisperX leaves some (digits) untimed: borrow the neighbours'."""
    words = [w for w in segment.get("words") or [] if isinstance(w, dict) and "word" in w]
    out = []
    for index, word in enumerate(words):
        start = word.get("start")
        end = word.get("end")
        if start is None:
            start = out[-1]["end"] if out else segment["start"]
        if end is None:
            later = next((w["start"] for w in words[index + 1:] if w.get("start") is not None), None)
            end = later if later is not None else segment["end"]
        out.append({"word": str(word["word"]).strip(), "start": start, "end": end})
        if "speaker" in word:
            out[-1]["speaker"] = word["speaker"]
    return out
