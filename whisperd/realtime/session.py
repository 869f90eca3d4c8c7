"""One live transcription session, apart from its WebSocket: events in, events out.

The handler feeds it client events (`handle`) and sends what it emits (`send`). Audio is
converted to 16 kHz once on arrival; voice activity and transcription passes run on the warm
engine's live lane (`engine.live`). One pass at a time per session: a partial pass that comes
due while the previous one still runs is skipped (shed first), a final pass is never skipped.

The final pass is started speculatively when speech goes quiet (SPECULATE_AFTER_MS into the
quiet), on exactly the audio and prefix the turn's final pass would get should the quiet last
silence_duration_ms; when it does, `completed` reuses that pass instead of starting one after the
wait, so the wait and the pass overlap. Speech that resumes makes the speculation moot (its
answer is dropped; the turn's end differs).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from typing import Any, Awaitable, Callable

from ..clock import wall_time
from ..jobs import now_iso
from . import metrics
from .agreement import Agreement
from .audio import BYTES_PER_SECOND, Converter
from .protocol import EventError, Settings, apply_update, new_id, session_event
from .turns import FRAME_MS, Turns

log = logging.getLogger("whisperd.realtime")
PASS_EVERY_MS = 1000  # a partial pass per second of new audio at most
VAD_CHUNK_MS = 64  # voice activity is judged in chunks of this much audio (a turn's end is seen this late at most)
SPECULATE_AFTER_MS = 64  # quiet this long inside a turn starts its final pass early (a pause between words
#                          is often shorter: each speculation that speech then overrides costs one pass)
MAX_TURN_MS = 28_000  # a turn longer than Whisper's 30 s window is committed and a new one begun
KEEP_MS = 1000  # audio kept before a turn can start (prefix padding comes from it)
COMMIT_MIN_MS = 100  # OpenAI's smallest committable buffer


class Closing(Exception):
    """The session must end: `code` is the WebSocket close code, `error` the event sent first."""

    def __init__(self, error: EventError, code: int) -> None:
        super().__init__(error.message)
        self.error = error
        self.code = code


class Utterance:
    def __init__(self, item_id: str, start_ms: int) -> None:
        self.item_id = item_id
        self.start_ms = start_ms
        self.end_ms: int | None = None
        self.agreement = Agreement()
        self.last_pass_ms = start_ms  # audio end of the last partial pass started
        self.speculation: tuple[int, asyncio.Task] | None = None  # (the turn end it assumes, its pass)


class LiveSession:
    def __init__(self, settings: Settings, engine_call: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
                 model_spec: Callable[[Settings], dict[str, Any]], send: Callable[[dict[str, Any]], None],
                 limits: dict[str, float], forget: Callable[[str], None] | None = None) -> None:
        self.id = new_id("sess")
        self.settings = settings
        self.engine_call = engine_call
        self.model_spec = model_spec
        self.send = send
        self.limits = limits
        self.forget = forget
        self.expires_at = int(wall_time() + limits["max_seconds"])
        self.converter = Converter(settings.format)
        self.pcm = bytearray()  # 16 kHz audio from absolute position base_ms
        self.base_ms = 0
        self.received_ms = 0.0
        self.input_seconds = 0.0  # of audio as sent (for the pace limit)
        self.started = time.monotonic()
        self.started_iso = now_iso()
        self.last_event = self.started
        self.turns = self._new_turns()
        self.open: Utterance | None = None
        self.previous_item: str | None = None
        self.buffer_from_ms = 0  # where the uncommitted input buffer begins
        self.finals_pending = 0
        self.covered_ms = 0.0
        self.lag = 0.0
        self.max_lag = 0.0
        self.skipped = 0
        self.speculated = 0  # final passes started early
        self.speculation_hits = 0  # ... of which `completed` used the answer
        self.transcribed_seconds = 0.0
        self._vad_pending = bytearray()
        self._vad_from_ms = 0
        self._vad_task: asyncio.Task | None = None
        self._pass_lock = asyncio.Lock()
        self._partial_running = False
        self._tasks: set[asyncio.Task] = set()
        self.closing: Closing | None = None

    # -- helpers

    def _new_turns(self) -> Turns | None:
        td = self.settings.turn_detection
        return Turns(td["threshold"], td["prefix_padding_ms"], td["silence_duration_ms"]) if td else None

    def _emit(self, kind: str, **fields: Any) -> None:
        self.send({"type": kind, "event_id": new_id("event"), **fields})

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, Closing):
                self.closing = self.closing or exc
            else:
                log.error("live session %s: %r", self.id, exc)

    def _audio(self, start_ms: float, end_ms: float) -> bytes:
        start = max(0, int((start_ms - self.base_ms) * 32)) & ~1
        end = max(0, int((end_ms - self.base_ms) * 32)) & ~1
        return bytes(self.pcm[start:end])

    def _trim(self) -> None:
        """Drop audio no turn can need any more (kept: the open turn, pending finals', the prefix)."""
        if self.open is not None or self.finals_pending:
            return
        keep_from = max(self.base_ms, int(self.received_ms) - KEEP_MS)
        cut = int((keep_from - self.base_ms) * 32) & ~1
        if cut > 0:
            del self.pcm[:cut]
            self.base_ms += cut // 32

    # -- client events

    def created(self) -> None:
        self.send(session_event("created", self.id, self.settings, self.expires_at))

    async def handle(self, event: dict[str, Any]) -> None:
        self.last_event = time.monotonic()
        kind = event.get("type")
        if not isinstance(kind, str):
            raise EventError("every event needs a string 'type'", "invalid_type" if "type" in event else "missing_type",
                             "type")
        if kind == "input_audio_buffer.append":
            self._append(event)
        elif kind == "input_audio_buffer.commit":
            self._commit()
        elif kind == "input_audio_buffer.clear":
            self._clear()
        elif kind in ("session.update", "transcription_session.update"):
            self._update(event)
        else:
            raise EventError(f"unknown or unsupported event type {kind[:60]!r} in a transcription session: "
                             "send input_audio_buffer.append/commit/clear or session.update",
                             "unknown_event", "type")

    def _update(self, event: dict[str, Any]) -> None:
        new = apply_update(event, self.settings)
        self.model_spec(new)  # a model this server cannot run is refused here, the session unchanged
        if new.format != self.settings.format:
            self.converter = Converter(new.format)
        detection_changed = new.turn_detection != self.settings.turn_detection
        self.settings = new
        if detection_changed:
            self.turns = self._new_turns()
            if self.turns is not None:
                self.turns.reset(int(self._vad_from_ms))
        self.send(session_event("updated", self.id, self.settings, self.expires_at))

    def _append(self, event: dict[str, Any]) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise EventError("Invalid type for 'audio': expected a base64 string", "invalid_type", "audio")
        try:
            raw = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise EventError("'audio' is not valid base64", "invalid_base64", "audio") from None
        self.input_seconds += self.converter.input_seconds(raw)
        ahead = self.input_seconds - (time.monotonic() - self.started)
        if ahead > self.limits["max_ahead_seconds"]:
            raise Closing(EventError(f"audio is arriving much faster than real time ({ahead:.0f} s ahead of the "
                                     f"clock; the limit is {self.limits['max_ahead_seconds']:g} s): live sessions "
                                     "are for live audio, send recordings to /v1/audio/transcriptions",
                                     "audio_too_fast", error_type="rate_limit_error"), 1008)
        pcm = self.converter.to_pcm16k(raw)
        self.pcm += pcm
        added_ms = len(pcm) / 32
        self.received_ms += added_ms
        metrics.audio(added_ms / 1000)
        if self.turns is None:
            if self.open is None and pcm:
                self.open = Utterance(new_id("item"), int(self.received_ms - added_ms))
            if self.open is not None and self.received_ms - self.open.start_ms >= MAX_TURN_MS:
                self._end_turn(int(self.received_ms))  # a client that never commits: bounded memory
            self._maybe_partial()
        else:
            self._vad_pending += pcm
            if len(self._vad_pending) >= VAD_CHUNK_MS * 32 and (self._vad_task is None or self._vad_task.done()):
                self._vad_task = asyncio.ensure_future(self._judge())
            if self.open is not None:
                self._maybe_partial()
        self._update_lag()

    def _commit(self) -> None:
        start = self.open.start_ms if self.open is not None else max(self.buffer_from_ms, self.base_ms)
        if self.received_ms - start < COMMIT_MIN_MS:
            raise EventError(f"buffer too small: expected at least {COMMIT_MIN_MS} ms of audio, but the buffer has "
                             f"{max(0.0, self.received_ms - start):.2f} ms", "input_audio_buffer_commit_empty")
        if self.open is None:  # server VAD on, no speech heard yet: the client commits what there is
            self.open = Utterance(new_id("item"), int(start))
        self._end_turn(int(self.received_ms))
        if self.turns is not None:
            self._vad_pending.clear()
            self._vad_from_ms = self.received_ms
            self.turns.reset(int(self.received_ms))

    def _clear(self) -> None:
        self.open = None
        self.buffer_from_ms = int(self.received_ms)
        self._vad_pending.clear()
        self._vad_from_ms = self.received_ms
        if self.turns is not None:
            self.turns.reset(int(self.received_ms))
        self._emit("input_audio_buffer.cleared")
        self._trim()

    # -- turns

    async def _judge(self) -> None:
        while len(self._vad_pending) >= VAD_CHUNK_MS * 32:
            chunk = bytes(self._vad_pending)
            self._vad_pending.clear()
            answer = await self.engine_call({"op": "live_vad", "session": self.id,
                                             "pcm": base64.b64encode(chunk).decode()})
            if "error" in answer:
                log.warning("live session %s: voice activity failed: %s", self.id, answer["error"])
                continue
            if self.turns is None:
                return
            for turn in self.turns.feed(answer.get("probs") or []):
                if turn.event == "started" and self.open is None:
                    self.open = Utterance(new_id("item"), max(turn.at_ms, self.base_ms))
                    self._emit("input_audio_buffer.speech_started", audio_start_ms=self.open.start_ms,
                               item_id=self.open.item_id)
                elif turn.event == "stopped" and self.open is not None:
                    self._emit("input_audio_buffer.speech_stopped", audio_end_ms=turn.at_ms, item_id=self.open.item_id)
                    self._end_turn(turn.at_ms)
            self._maybe_speculate()
            if self.open is not None and self.turns.position_ms - self.open.start_ms >= MAX_TURN_MS:
                at = self.turns.position_ms
                self._emit("input_audio_buffer.speech_stopped", audio_end_ms=at, item_id=self.open.item_id)
                self._end_turn(at)
                self.open = Utterance(new_id("item"), at)  # still speaking: the next turn begins here
                self._emit("input_audio_buffer.speech_started", audio_start_ms=at, item_id=self.open.item_id)
            self._update_lag()

    def _end_turn(self, end_ms: int) -> None:
        utterance, self.open = self.open, None
        assert utterance is not None
        utterance.end_ms = end_ms
        self.buffer_from_ms = end_ms
        self._emit("input_audio_buffer.committed", item_id=utterance.item_id, previous_item_id=self.previous_item)
        self.previous_item = utterance.item_id
        self.finals_pending += 1
        self._spawn(self._final(utterance))

    # -- passes

    def _pass_message(self, utterance: Utterance, audio: bytes, final: bool) -> dict[str, Any]:
        return {"op": "live_pass", **self.model_spec(self.settings), "language": self.settings.language,
                "prompt": self.settings.prompt, "prefix": utterance.agreement.text, "final": final,
                "beam": self.limits.get("final_beam", 5),
                "pcm": base64.b64encode(audio).decode()}

    def _maybe_partial(self) -> None:
        utterance = self.open
        if utterance is None or self.received_ms - utterance.last_pass_ms < PASS_EVERY_MS:
            return
        if self.turns is not None and self.turns.pausing:
            return  # the turn may be ending: a partial now would only delay its final pass
        if self._partial_running or self.finals_pending:
            # Shed: the engine has not caught up with this session; the final pass will cover it.
            if self.received_ms - utterance.last_pass_ms >= 2 * PASS_EVERY_MS:
                utterance.last_pass_ms = int(self.received_ms)
                self.skipped += 1
                metrics.skipped()
            return
        utterance.last_pass_ms = int(self.received_ms)
        self._partial_running = True
        self._spawn(self._partial(utterance, self.received_ms))

    async def _partial(self, utterance: Utterance, until_ms: float) -> None:
        try:
            async with self._pass_lock:
                if self.open is not utterance:
                    return  # ended meanwhile: its final pass has it
                if self.turns is not None and self.turns.pausing:
                    return  # gone quiet while it waited: the speculative final pass goes first
                answer = await self.engine_call(self._pass_message(utterance, self._audio(utterance.start_ms, until_ms),
                                                                   False))
            if "error" in answer or self.open is not utterance:
                return
            self.covered_ms = max(self.covered_ms, until_ms)
            delta = utterance.agreement.update(answer.get("text") or "")
            if delta:
                self._emit("conversation.item.input_audio_transcription.delta", item_id=utterance.item_id,
                           content_index=0, delta=delta)
        finally:
            self._partial_running = False
            self._update_lag()

    def _maybe_speculate(self) -> None:
        """Speech went quiet: start the final pass the turn will need if the quiet lasts."""
        utterance = self.open
        if not self.limits.get("early_final", True):
            return  # WHISPER_REALTIME_EARLY_FINAL=false
        if utterance is None or self.turns is None or self.finals_pending:
            return  # a final already waits for the lane: a speculation would only queue behind it
        end_ms = self.turns.end_if_silent()
        if end_ms is None or self.turns.quiet_ms < SPECULATE_AFTER_MS or self.received_ms < end_ms:
            return
        if utterance.speculation is not None and utterance.speculation[0] == end_ms:
            return
        utterance.speculation = (end_ms, self._spawn(self._speculate(utterance, end_ms)))
        self.speculated += 1

    async def _speculate(self, utterance: Utterance, end_ms: int) -> tuple[str, dict[str, Any]] | None:
        """The final pass on [start, end_ms) with the prefix of now: (prefix, answer), or None when
        the turn has meanwhile gone on or ended elsewhere (the pass is not run)."""
        async with self._pass_lock:
            if utterance.speculation is None or utterance.speculation[0] != end_ms:
                return None  # a later quiet replaced it
            if utterance.end_ms is None and (self.open is not utterance or self.turns is None
                                             or self.turns.end_if_silent() != end_ms):
                return None  # speech resumed while it waited for the lane
            if utterance.end_ms is not None and utterance.end_ms != end_ms:
                return None  # the turn ended elsewhere (a commit, the longest turn)
            message = self._pass_message(utterance, self._audio(utterance.start_ms, end_ms), True)
            return message["prefix"], await self.engine_call(message)

    async def _speculated(self, utterance: Utterance) -> dict[str, Any] | None:
        """The speculative final pass's answer if it was made for exactly this end and prefix."""
        if utterance.speculation is None or utterance.speculation[0] != utterance.end_ms:
            return None
        try:
            made = await asyncio.shield(utterance.speculation[1])
        except Exception:  # the engine went away under it: the final pass says so itself
            return None
        if made is None or made[0] != utterance.agreement.text or "error" in made[1]:
            return None
        self.speculation_hits += 1
        return made[1]

    async def _final(self, utterance: Utterance) -> None:
        assert utterance.end_ms is not None
        try:
            audio = self._audio(utterance.start_ms, utterance.end_ms)
            answer = await self._speculated(utterance)
            if answer is None:
                async with self._pass_lock:
                    try:
                        answer = await self.engine_call(self._pass_message(utterance, audio, True))
                    except Exception as exc:  # the engine went away under it
                        answer = {"error": str(exc) or exc.__class__.__name__}
            if "error" in answer:
                self._emit("conversation.item.input_audio_transcription.failed", item_id=utterance.item_id,
                           content_index=0, error={"type": "transcription_error", "code": "engine_error",
                                                   "message": str(answer["error"])[:300], "param": None})
                return
            seconds = round(len(audio) / BYTES_PER_SECOND, 3)
            self.transcribed_seconds += seconds
            transcript = utterance.agreement.final(answer.get("text") or "")
            self._emit("conversation.item.input_audio_transcription.completed", item_id=utterance.item_id,
                       content_index=0, transcript=transcript, usage={"type": "duration", "seconds": seconds})
        finally:
            self.finals_pending -= 1
            self.covered_ms = max(self.covered_ms, float(utterance.end_ms))
            self._update_lag()
            self._trim()

    # -- lag and limits

    def _update_lag(self) -> None:
        if self.open is None and not self.finals_pending:
            judged = self.turns.position_ms if self.turns is not None else self.received_ms
            self.covered_ms = max(self.covered_ms, float(judged))
        self.lag = max(0.0, self.received_ms - self.covered_ms) / 1000
        self.max_lag = max(self.max_lag, self.lag)

    def tick(self) -> dict[str, Any] | None:
        """Once a second: the lag event, and the session's limits; raises Closing to end it."""
        if self.closing is not None:
            raise self.closing
        self._update_lag()
        now = time.monotonic()
        if now - self.started > self.limits["max_seconds"]:
            raise Closing(EventError(f"the session reached its maximum length "
                                     f"({self.limits['max_seconds']:g} s, WHISPER_REALTIME_MAX_SESSION_SECONDS)",
                                     "session_expired"), 1000)
        if now - self.last_event > self.limits["idle_seconds"]:
            raise Closing(EventError(f"no event for {self.limits['idle_seconds']:g} s "
                                     "(WHISPER_REALTIME_IDLE_SECONDS): closing the idle session", "idle_timeout"), 1000)
        if self.lag > self.limits["max_lag_seconds"]:
            raise Closing(EventError(f"this server cannot keep up with the session: transcription is "
                                     f"{self.lag:.1f} s behind the audio (limit {self.limits['max_lag_seconds']:g} s, "
                                     "WHISPER_REALTIME_MAX_LAG_SECONDS)", "session_lagging", error_type="server_error"),
                          1013)
        metrics.lag(self.lag)
        return {"type": "whisperd.session.lag", "event_id": new_id("event"), "lag_seconds": round(self.lag, 3),
                "audio_received_seconds": round(self.received_ms / 1000, 3),
                "partial_passes_skipped": self.skipped, "final_passes_speculated": self.speculated,
                "speculative_finals_used": self.speculation_hits}

    async def finish(self, timeout: float) -> None:
        """Graceful stop: the open utterance is committed and every pending final pass is waited for."""
        if self.open is not None and self.received_ms - self.open.start_ms >= COMMIT_MIN_MS:
            self._end_turn(int(self.received_ms))
        self.open = None
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._vad_task is not None:
            self._vad_task.cancel()
        if self.forget is not None:
            self.forget(self.id)
