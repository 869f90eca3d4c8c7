"""The Tornado application: routes and server settings."""

from __future__ import annotations

import logging

from tornado.httpserver import HTTPServer
from tornado.web import Application, RequestHandler

from . import metrics
from .handlers.base import NotFoundHandler
from .handlers.ops import HealthHandler, MetricsHandler, OpenApiHandler
from .handlers.openai import OpenAIModelsHandler, OpenAITranscriptionHandler, OpenAITranslationHandler
from .handlers.realtime import RealtimeHandler
from .handlers.events import JobEventsHandler
from .handlers.models import PageModelsHandler
from .handlers.status import StatusHandler
from .handlers.tenants import UsageHandler
from .handlers.transcription import JobHandler, ResultHandler, SubmitHandler
from .handlers.tus import TusCreationHandler, TusUploadHandler
from .handlers.voices import VoiceHandler, VoicesHandler
from .handlers.web import WebFileHandler
from .service import Service
from .multipart import FORM_OVERHEAD

access_log = logging.getLogger("whisperd.access")
JOB_ID = r"([^/]+)"
CHUNK_SIZE = 1024 * 1024  # Tornado's 64 KiB: 677 MiB/s on a 512 MiB upload; 1 MiB: 846 MiB/s, for 2-4 MiB more memory


def log_request(handler: RequestHandler) -> None:
    """Method, path, status, time: never headers, query strings or form fields (secrets live there)."""
    status = handler.get_status()
    metrics.request_done(type(handler).__name__, handler.request.method or "", status)
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    access_log.log(level, "%d %s %s %.1fms", status, handler.request.method, handler.request.path,
                   1000.0 * handler.request.request_time())


# The OpenAPI document (openapi.json) describes exactly these; a test keeps the two in step.
ROUTES = [
    (r"/transcription/?", SubmitHandler),
    (rf"/transcription/{JOB_ID}/result/?", ResultHandler),
    (rf"/transcription/{JOB_ID}/?", JobHandler),
    (r"/status/?", StatusHandler),
    (r"/v1/audio/transcriptions/?", OpenAITranscriptionHandler),
    (r"/v1/audio/translations/?", OpenAITranslationHandler),
    (r"/v1/models/?", OpenAIModelsHandler),
    (r"/openapi.json", OpenApiHandler),
    (r"/health/?", HealthHandler),
    (r"/metrics/?", MetricsHandler),
    (rf"/transcription/{JOB_ID}/events/?", JobEventsHandler),
    (r"/models/?", PageModelsHandler),
    (r"/uploads/?", TusCreationHandler),
    (rf"/uploads/{JOB_ID}/?", TusUploadHandler),
    (r"/usage/?", UsageHandler),
    (r"/voices/?", VoicesHandler),
    (r"/voices/(?P<name>[^/]+)/?", VoiceHandler),
]

# The web page's files: not API, so not in openapi.json.
WEB_ROUTES = [
    (r"/v1/realtime/?", RealtimeHandler),  # a WebSocket (docs/realtime.md): not in the OpenAPI document either
    (r"/()", WebFileHandler),
    (r"/static/(.+)", WebFileHandler),
]


# A worker node (WHISPER_NODE_ROLE=worker) runs jobs and answers only these.
WORKER_ROUTES = [(pattern, handler) for pattern, handler in ROUTES if handler in (HealthHandler, MetricsHandler)]


def make_app(service: Service) -> Application:
    routes = ROUTES + WEB_ROUTES if service.config.answers_api else WORKER_ROUTES
    return Application(
        [(pattern, handler, {"service": service}) for pattern, handler in routes],
        default_handler_class=NotFoundHandler,
        default_handler_args={"service": service},
        log_function=log_request,
    )


def make_server(app: Application, service: Service) -> HTTPServer:
    config = service.config
    return HTTPServer(
        app,
        max_body_size=config.MAX_FILE_SIZE + FORM_OVERHEAD,
        body_timeout=config.WHISPER_API_TIMEOUT,
        idle_connection_timeout=config.WHISPER_API_KEEPALIVE,
        chunk_size=CHUNK_SIZE,
    )
