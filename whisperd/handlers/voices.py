"""/voices: a token enrols named voices (POST, a name and a 2-30 s sample), lists (GET) and deletes
(DELETE /voices/{name}) them; its diarized jobs then name those speakers.

A voice belongs to the token that enrolled it: every query is by the caller's own name, so no
other token can list, use or delete it (nor learn that it exists). Only the embedding is kept.
"""

from __future__ import annotations

import logging
from urllib.parse import unquote

from ..errors import Kind, ServiceError
from ..intake import Intake, IntakeError
from ..speakers import VOICE_SECONDS, check_name
from ..voices import MAX_VOICES, EmbeddingFailed, embed_sample, public
from .base import BaseHandler
from .multipart_upload import MultipartUploadHandler

log = logging.getLogger("whisperd.http")


class VoicesHandler(MultipartUploadHandler):
    allowed_methods = ("OPTIONS", "GET", "POST")

    async def get(self) -> None:
        voices = await self.service.ledger.list_voices(self.identity.name)
        self.send_json({"voices": [public(v) for v in voices]})

    async def post(self) -> None:
        if not self.upload_pending:
            return
        form = self.received_form()
        try:
            unknown = sorted(set(form.fields) - {"name"})
            if unknown:
                raise ServiceError(Kind.INVALID, f"unknown form field '{unknown[0]}': send 'name' and 'file'")
            name = check_name(form.fields.get("name", ""))
            owner = self.identity.name
            if len(await self.service.ledger.list_voices(owner)) >= MAX_VOICES:
                raise ServiceError(Kind.CONFLICT, f"this token already has {MAX_VOICES} voices: delete one first")
        except ServiceError as exc:
            self.refuse(exc)
        low, high = VOICE_SECONDS
        # The upload's own intake (allow-list, one decode), capped at the sample's longest.
        intake = self._intake = Intake(self.service.config)
        intake.max_seconds = high
        try:
            media = await intake.accept(form.file_path, form.file_path.parent, form.client_filename)
        except IntakeError as exc:
            self._discard()
            if exc.kind is Kind.CLIENT_LEFT:
                return
            message = exc.message if exc.kind is not Kind.TOO_LARGE else f"the sample lasts more than {high:g} s"
            raise ServiceError(exc.kind, f"{message} (a voice sample is {low:g} to {high:g} s of one person "
                                           "speaking)") from None
        if self._intake is None:
            return  # the client left while it was decoded
        self._intake = None
        try:
            form.file_path.unlink()
            if media.duration < low:
                raise ServiceError(Kind.INVALID, f"the sample lasts {media.duration:.1f} s; a voice sample is {low:g} to "
                                        f"{high:g} s of one person speaking")
            try:
                embedding = await embed_sample(self.service.config, media.canonical_path, self.service.offline)
            except EmbeddingFailed as exc:
                raise ServiceError(Kind.NO_RESULT, f"no voice could be taken from the sample: {exc}") from None
            created = await self.service.ledger.add_voice(owner, name, embedding)
            if created is None:
                raise ServiceError(Kind.CONFLICT, f"this token already has a voice named '{name}': delete it first")
        finally:
            self._discard()  # the audio goes whatever happened: only the embedding is kept
        log.info("voice enrolled for %s (%.1f s sample)", owner, media.duration)
        self.send_json({"name": name, "created_at": created}, 201)


class VoiceHandler(BaseHandler):
    allowed_methods = ("OPTIONS", "DELETE")

    def options(self, name: str = "") -> None:  # the route's named group comes as a keyword
        super().options()

    async def delete(self, name: str) -> None:
        name = unquote(name)
        if not await self.service.ledger.delete_voice(self.identity.name, name):
            raise ServiceError(Kind.NOT_FOUND, f"this token has no voice named '{name[:64]}'")
        self.set_status(204)
        self.finish()
