"""GET /v1/realtime?intent=transcription: OpenAI's Realtime transcription session over a WebSocket.

Auth happens before the upgrade (a Bearer header, or the browser's `openai-insecure-api-key.<token>`
subprotocol); a refused caller gets an HTTP error in OpenAI's shape and no WebSocket. Once open,
a bad event is answered with an `error` event and the session goes on; only auth, limits and
shutdown end it, each with an `error` event first and then a close code. The session itself is
whisperd/realtime/session.py; this is its transport.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from tornado.websocket import WebSocketClosedError, WebSocketHandler

from ..identity.auth import AuthError
from ..identity.guard import Throttled
from ..engines import worker_threads
from ..jobs import now_iso
from ..tasks import spawn
from ..engines.worker import WorkerUnavailable, model_spec
from ..models import installed_models, local_model_dir
from ..realtime import metrics, registry
from ..realtime.protocol import OPENAI_MODELS, EventError, Settings, error_event
from ..realtime.session import Closing, LiveSession
from ..service import Service

log = logging.getLogger("whisperd.realtime")
SUBPROTOCOL_KEY = "openai-insecure-api-key."
TICK_SECONDS = 1.0
REVALIDATE_SECONDS = 2.0  # a revoked or expired token ends its sessions within this (plus a tick)
GOING_AWAY = 1001


class RealtimeHandler(WebSocketHandler):
    def initialize(self, service: Service) -> None:
        self.service = service
        self.session: LiveSession | None = None
        self.identity = None
        self._token: str | None = None
        self._ticker: asyncio.Task | None = None
        self._closed = False
        self._queue: asyncio.Queue | None = None

    # -- before the upgrade

    def _refuse(self, status: int, message: str, code: str, error_type: str = "invalid_request_error") -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        if status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="whisperd"')
        self.finish(json.dumps({"error": {"message": message, "type": error_type, "param": None, "code": code}}))

    def _offered_token(self) -> str | None:
        header = self.request.headers.get("Authorization")
        if header:
            return header
        for protocol in self.request.headers.get("Sec-WebSocket-Protocol", "").split(","):
            protocol = protocol.strip()
            if protocol.startswith(SUBPROTOCOL_KEY) and len(protocol) > len(SUBPROTOCOL_KEY):
                return "Bearer " + protocol[len(SUBPROTOCOL_KEY):]
        return None

    async def get(self, *args: Any, **kwargs: Any) -> None:
        config = self.service.config
        if self.service.draining:
            return self._refuse(503, "the server is shutting down; try again in a moment", "server_shutting_down",
                                "server_error")
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            return self._refuse(400, "this endpoint is a WebSocket: connect with ws:// (OpenAI Realtime API, "
                                     "intent=transcription)", "websocket_required")
        self._token = self._offered_token()
        try:
            self.identity = await self.service.identify(self._token, self.request.remote_ip)
        except AuthError as exc:
            return self._refuse(401, str(exc) + " (or the subprotocol openai-insecure-api-key.<token>)",
                                "invalid_api_key")
        except Throttled as exc:
            self.set_header("Retry-After", str(exc.retry_after))
            return self._refuse(429, str(exc), "rate_limit_exceeded", "rate_limit_error")
        intent = self.get_query_argument("intent", "transcription")
        if intent != "transcription":
            return self._refuse(400, "this server runs transcription sessions only: connect with "
                                     "?intent=transcription", "unsupported_intent")
        if not config.runs_jobs:
            return self._refuse(503, "this node (WHISPER_NODE_ROLE=api) runs no engine, and a live session needs "
                                     "the engine on the node that accepts it: connect to a node with the "
                                     "'all' role", "no_engine_on_node", "server_error")
        if not hasattr(self.service.engine, "live"):
            return self._refuse(503, "live sessions need the warm engine (WHISPER_ENGINE=worker); this server runs "
                                     "the CLI per job", "live_needs_warm_engine", "server_error")
        try:
            own = await self.service.ledger.live_session_limit(self.identity.name)
        except Exception:  # the ledger is briefly away: the setting's default applies
            log.warning("live session: could not read the token's own limit", exc_info=True)
            own = None
        # No await from here to the registry's add below: two racing upgrades cannot both pass.
        if config.WHISPER_REALTIME_MAX_SESSIONS == 0:
            return self._refuse(403, "live sessions are turned off on this server (WHISPER_REALTIME_MAX_SESSIONS=0)",
                                "realtime_disabled", "permission_error")
        if len(registry.sessions(self.service)) >= config.WHISPER_REALTIME_MAX_SESSIONS:
            self.set_header("Retry-After", "10")
            return self._refuse(429, f"the server has {config.WHISPER_REALTIME_MAX_SESSIONS} live sessions open "
                                     "(WHISPER_REALTIME_MAX_SESSIONS); try again later", "too_many_sessions",
                                "rate_limit_error")
        per_token = config.WHISPER_TOKEN_MAX_LIVE_SESSIONS if own is None else own
        if per_token and registry.count_for(self.service, self.identity.name) >= per_token:
            source = "token create --max-live-sessions" if own is not None else "WHISPER_TOKEN_MAX_LIVE_SESSIONS"
            return self._refuse(429, f"this token has {per_token} live sessions open ({source}); close one first",
                                "too_many_sessions", "rate_limit_error")
        settings = self._initial_settings()
        try:
            self._model_spec(settings)
        except EventError as exc:
            return self._refuse(400, exc.message, exc.code)
        registry.sessions(self.service).add(self)  # counted from here
        try:
            await super().get(*args, **kwargs)
        finally:
            if self.ws_connection is None:  # the upgrade itself failed
                registry.sessions(self.service).discard(self)

    def _initial_settings(self) -> Settings:
        """GA unless the client sent OpenAI-Beta: realtime=v1; a `model` query names the model."""
        settings = Settings()
        if "realtime=v1" in self.request.headers.get("OpenAI-Beta", ""):
            settings.shape = "beta"
        model = self.get_query_argument("model", None)
        if model and model not in OPENAI_MODELS:
            settings.model = model
        return settings

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        # Browsers send ["realtime", "openai-insecure-api-key.<token>"]; answer with one offered
        # that is not the key (echoing the key back would put it in a response header).
        for protocol in subprotocols:
            if not protocol.startswith(SUBPROTOCOL_KEY):
                return protocol
        return None

    def get_compression_options(self) -> None:
        return None

    @property
    def max_message_size(self) -> int:  # type: ignore[override]
        # Tornado closes (1009) above this; between our limit and this, the event gets an error.
        return 4 * self.service.config.WHISPER_REALTIME_MAX_EVENT_BYTES + 65536

    def _model_spec(self, settings: Settings) -> dict[str, Any]:
        config = self.service.config
        name = config.openai_model if settings.model in OPENAI_MODELS else settings.model
        if local_model_dir(config.WHISPER_MODELS_DIR, name) is None and (
                settings.model not in OPENAI_MODELS or self.service.offline):
            have = ", ".join(["whisper-1"] + installed_models(config.WHISPER_MODELS_DIR))
            raise EventError(f"model '{settings.model[:100]}' is not available on this server; available: {have}",
                             "model_not_found", "session.audio.input.transcription.model")
        return model_spec(config, name, config.WHISPER_DEVICE, config.WHISPER_DEVICE_INDEX, worker_threads(config))

    # -- the session

    def open(self, *args: Any, **kwargs: Any) -> None:
        config = self.service.config
        limits = {"max_seconds": config.WHISPER_REALTIME_MAX_SESSION_SECONDS,
                  "idle_seconds": config.WHISPER_REALTIME_IDLE_SECONDS,
                  "max_ahead_seconds": config.WHISPER_REALTIME_MAX_AHEAD_SECONDS,
                  "max_lag_seconds": config.WHISPER_REALTIME_MAX_LAG_SECONDS,
                  "final_beam": config.WHISPER_REALTIME_FINAL_BEAM,
                  "early_final": config.WHISPER_REALTIME_EARLY_FINAL}
        settings = self._initial_settings()
        engine = self.service.engine
        self.session = LiveSession(settings, self._engine_call, self._model_spec, self._send, limits,
                                   forget=getattr(engine, "live_forget", None))
        metrics.opened()
        log.info("live session %s opened for %s", self.session.id, self.identity.name)
        self.session.created()
        self._queue = asyncio.Queue()
        self._ticker = asyncio.ensure_future(self._run())

    async def _engine_call(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.service.engine.live(message)
        except WorkerUnavailable as exc:
            return {"error": str(exc)}
        except asyncio.TimeoutError:
            return {"error": "the engine did not answer in time"}
        except Exception as exc:  # whatever else: that pass fails, the session goes on
            log.warning("live session: engine call failed", exc_info=True)
            return {"error": str(exc) or exc.__class__.__name__}

    def _send(self, event: dict[str, Any]) -> None:
        if self._closed:
            return
        try:
            self.write_message(json.dumps(event, ensure_ascii=False))
        except WebSocketClosedError:
            pass

    def on_message(self, message: str | bytes) -> None:
        if self._queue is not None:
            self._queue.put_nowait(message)

    async def _run(self) -> None:
        """Events in order, one at a time, and a tick each second (lag event, limits, revocation)."""
        session = self.session
        assert session is not None and self._queue is not None
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + TICK_SECONDS
        next_check = loop.time() + REVALIDATE_SECONDS
        try:
            while not self._closed:
                try:
                    message = await asyncio.wait_for(self._queue.get(), max(0.0, next_tick - loop.time()))
                    await self._one(session, message)
                except asyncio.TimeoutError:
                    pass
                if self._closed:
                    return
                if self.service.draining:
                    await self.finish_and_close(self.service.config.WHISPER_SHUTDOWN_GRACE_SECONDS)
                    return
                if loop.time() >= next_tick:
                    next_tick = loop.time() + TICK_SECONDS
                    event = session.tick()
                    if event is not None:
                        self._send(event)
                if loop.time() >= next_check:
                    next_check = loop.time() + REVALIDATE_SECONDS
                    await self._revalidate()
        except Closing as exc:
            self._end(exc)
        except Exception:
            log.exception("live session %s failed", session.id)
            self._end(Closing(EventError("internal error in the live session (see the server log)", "server_error",
                                         error_type="server_error"), 1011))

    async def _one(self, session: LiveSession, message: str | bytes) -> None:
        event_id = None
        try:
            if len(message) > self.service.config.WHISPER_REALTIME_MAX_EVENT_BYTES:
                raise EventError(f"the event is {len(message)} bytes; the limit is "
                                 f"{self.service.config.WHISPER_REALTIME_MAX_EVENT_BYTES} "
                                 "(WHISPER_REALTIME_MAX_EVENT_BYTES): send audio in smaller appends",
                                 "event_too_large")
            if isinstance(message, bytes):
                raise EventError("binary frames are not events: send JSON text frames", "invalid_event")
            try:
                event = json.loads(message)
            except ValueError:
                raise EventError("the event is not valid JSON", "invalid_json") from None
            if not isinstance(event, dict):
                raise EventError("an event must be a JSON object", "invalid_event")
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            await session.handle(event)
        except EventError as exc:
            self._send(error_event(exc, event_id))

    async def _revalidate(self) -> None:
        try:
            await self.service.identify(self._token, self.request.remote_ip)
        except (AuthError, Throttled) as exc:
            raise Closing(EventError(f"the session's token is no longer valid: {exc}", "invalid_api_key",
                                     error_type="invalid_request_error"), 1008) from None
        except Exception:  # the ledger is briefly away: check again at the next tick
            log.warning("live session: could not re-check its token", exc_info=True)

    def _end(self, closing: Closing) -> None:
        self._send(error_event(closing.error, None))
        log.info("live session %s closed: %s", self.session.id if self.session else "-", closing.error.code)
        metrics.closed(closing.error.code)
        self._shut(closing.code, closing.error.code)

    def _shut(self, code: int, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self._ended()
        self.close(code, reason[:120])

    def _ended(self) -> None:
        """Once per session: its engine state dropped, its place freed, its minutes recorded."""
        registry.sessions(self.service).discard(self)
        session, self.session = self.session, None
        if session is None:
            return
        session.close()
        spawn(self._record(session), "live session usage")

    async def _record(self, session: LiveSession) -> None:
        try:
            await self.service.ledger.record_live_session(
                session.id, self.identity.name, session.started_iso, now_iso(), session.received_ms / 1000,
                self.service.config.node_name)
        except Exception:  # usage is not worth a crash; the ledger says why in the log
            log.warning("live session %s: could not record its usage", session.id, exc_info=True)

    async def finish_and_close(self, timeout: float) -> None:
        """Graceful stop: completed transcripts for open utterances, then 1001 (going away)."""
        if self._closed or self.session is None:
            return
        await self.session.finish(timeout)
        if self._closed:
            return
        metrics.closed("going_away")
        self._shut(GOING_AWAY, "server shutting down")

    def on_close(self) -> None:
        if not self._closed:
            metrics.closed("client")
        self._closed = True
        if self._ticker is not None and self._ticker is not asyncio.current_task():
            self._ticker.cancel()
        self._ended()
