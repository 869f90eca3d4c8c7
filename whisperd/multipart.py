"""Streaming multipart/form-data reception: text fields in memory (bounded), the file part to disk."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from .errors import Kind, ServiceError
from .jobfiles import UPLOAD_NAME, display_name

MAX_FIELDS = 64
MAX_FIELD_BYTES = 64 * 1024
FORM_OVERHEAD = 1024 * 1024  # room for text fields and part headers beside the file
MAX_PART_HEADER_BYTES = 16 * 1024  # a part's header block; real ones are a few hundred bytes


@dataclass
class ReceivedForm:
    fields: dict[str, str] = field(default_factory=dict)
    lists: dict[str, list[str]] = field(default_factory=dict)  # the fields allowed to repeat
    file_path: Path | None = None
    file_bytes: int = 0
    client_filename: str = "upload"


def boundary_of(content_type: str | None) -> bytes:
    """The multipart boundary, or ServiceError(Kind.UNSUPPORTED_MEDIA / 400)."""
    kind, params = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        shown = kind.decode("latin-1") or "none"
        raise ServiceError(Kind.UNSUPPORTED_MEDIA, f"Content-Type must be multipart/form-data (got {shown}); send the audio as the form field 'file'")
    boundary = params.get(b"boundary")
    if not boundary or len(boundary) > 200:
        raise ServiceError(Kind.INVALID, "multipart/form-data needs a boundary parameter in Content-Type")
    return boundary


class MultipartReceiver:
    """Feeds body chunks to python-multipart; the `file` part goes straight into `directory`."""

    def __init__(self, boundary: bytes, directory: Path, max_file_size: int, file_field: str = "file",
                 repeatable: frozenset[str] = frozenset(), limit_name: str = "MAX_FILE_SIZE",
                 field_limits: dict[str, int] | None = None) -> None:
        self.directory = directory
        # Fields allowed more than MAX_FIELD_BYTES (OpenAI's reference samples, data URLs); they
        # count towards the body's allowance like any field.
        self.field_limits = field_limits or {}
        self.limit_name = limit_name  # named in the 413: the server's limit or the token's own
        self.repeatable = repeatable
        self.max_file_size = max_file_size
        self.file_field = file_field
        self.form = ReceivedForm()
        self._ended = False
        self._headers: dict[bytes, bytes] = {}
        self._header_name = b""
        self._header_value = b""
        self._part_name: str | None = None
        self._part_is_file = False
        self._value = bytearray()
        self._file = None
        self._parts = 0
        self._part_header_bytes = 0
        self._body_bytes = 0
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
        )

    # -- feeding

    def feed(self, chunk: bytes) -> None:
        # A chunked body has no Content-Length to refuse up front: count, whatever the parts are.
        self._body_bytes += len(chunk)
        if self._body_bytes > self.max_file_size + FORM_OVERHEAD:
            self.close_file()
            raise ServiceError(Kind.TOO_LARGE, f"request body is larger than {self.limit_name} ({self.max_file_size} bytes) plus the form")
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            self.close_file()
            raise ServiceError(Kind.INVALID, f"malformed multipart body: {exc}") from None
        except ServiceError:
            self.close_file()
            raise

    def finish(self, file_required: bool = True) -> ReceivedForm:
        """The form; without file_required, a form with no file part is fine (its audio comes from elsewhere)."""
        self.close_file()
        if not self._ended:
            raise ServiceError(Kind.INVALID, "the multipart body ended before its closing boundary (truncated upload?)")
        if self.form.file_path is None and not file_required:
            return self.form
        if self.form.file_path is None:
            raise ServiceError(Kind.INVALID, f"the form field '{self.file_field}' (the audio file) is missing")
        if self.form.file_bytes == 0:
            raise ServiceError(Kind.INVALID, f"the uploaded file '{self.form.client_filename}' is empty")
        return self.form

    def close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:  # a full disk refuses the last flush too; the file is discarded anyway
                pass
            self._file = None

    # -- parser callbacks

    def _on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_FIELDS:
            raise ServiceError(Kind.INVALID, f"too many form fields (more than {MAX_FIELDS})")
        self._headers = {}
        self._part_header_bytes = 0
        self._part_name = None
        self._part_is_file = False
        self._value = bytearray()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_value += data[start:end]

    def _count_header(self, size: int) -> None:
        self._part_header_bytes += size
        if self._part_header_bytes > MAX_PART_HEADER_BYTES:
            raise ServiceError(Kind.INVALID, f"a multipart part's headers are longer than {MAX_PART_HEADER_BYTES} bytes")

    def _on_header_end(self) -> None:
        self._headers[self._header_name.strip().lower()] = self._header_value.strip()
        self._header_name = b""
        self._header_value = b""

    def _on_headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in params:
            raise ServiceError(Kind.INVALID, "each multipart part needs 'Content-Disposition: form-data; name=...'")
        name = _text(params[b"name"], "a field name")
        self._part_name = name
        if b"filename" in params or name == self.file_field:
            if name != self.file_field:
                raise ServiceError(Kind.INVALID, f"unexpected file in form field '{name}': send the audio as '{self.file_field}'")
            if b"filename" not in params:
                raise ServiceError(Kind.INVALID, f"form field '{self.file_field}' must be a file upload (with a filename)")
            if self.form.file_path is not None:
                raise ServiceError(Kind.INVALID, f"more than one '{self.file_field}' field: send one audio file per request")
            raw_name = params[b"filename"].decode("utf-8", errors="replace")
            self.form.client_filename = display_name(raw_name)
            path = self.directory / UPLOAD_NAME  # the client's extension decides nothing (intake.py)
            self.directory.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "wb")  # small sequential writes: fine on the IOLoop
            self.form.file_path = path
            self._part_is_file = True
        elif name in self.form.fields and name not in self.repeatable:
            raise ServiceError(Kind.INVALID, f"form field '{name}' is given more than once")

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part_is_file:
            size = end - start
            self.form.file_bytes += size
            if self.form.file_bytes > self.max_file_size:
                raise ServiceError(Kind.TOO_LARGE, f"file is larger than {self.limit_name} ({self.max_file_size} bytes)")
            assert self._file is not None
            try:
                self._file.write(data[start:end])
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise ServiceError(Kind.STORAGE_FULL, "the server's upload disk is full; try again later", 60) from None  # faults: never without Retry-After
                raise
        else:
            self._value += data[start:end]
            limit = self.field_limits.get(self._part_name or "", MAX_FIELD_BYTES)
            if len(self._value) > limit:
                raise ServiceError(Kind.INVALID, f"form field '{self._part_name}' is longer than {limit} bytes")

    def _on_part_end(self) -> None:
        if self._part_is_file:
            self.close_file()
        elif self._part_name is not None:
            value = _text(bytes(self._value), f"form field '{self._part_name}'")
            if self._part_name in self.repeatable:
                self.form.lists.setdefault(self._part_name, []).append(value)
            self.form.fields[self._part_name] = value

    def _on_end(self) -> None:
        self._ended = True


def _text(raw: bytes, what: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ServiceError(Kind.INVALID, f"{what} is not valid UTF-8") from None
    if "\x00" in text:
        raise ServiceError(Kind.INVALID, f"{what} contains a NUL character")
    return text

