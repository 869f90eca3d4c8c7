"""The web page: static files from whisperd/static, served without auth (the page asks for a token)."""

from __future__ import annotations

import json
from http import HTTPStatus
from pathlib import Path
from typing import Any

from tornado.web import StaticFileHandler

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# Everything the page needs comes from this server; nothing is loaded from elsewhere, and
# the page cannot be framed (clickjacking) or send a form anywhere.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'none'; frame-ancestors 'none'; base-uri 'none'")


class WebFileHandler(StaticFileHandler):
    def initialize(self, **kwargs: Any) -> None:  # type: ignore[override]
        kwargs.pop("service", None)
        super().initialize(path=str(STATIC_DIR), default_filename="index.html")

    def set_default_headers(self) -> None:
        self.set_header("Content-Security-Policy", CSP)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("X-Frame-Options", "DENY")

    def set_extra_headers(self, path: str) -> None:
        # Revalidate every time (cheap: ETag), so an upgraded server never pairs old and new files.
        self.set_header("Cache-Control", "no-cache")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        message = "no such file" if status_code == 404 else HTTPStatus(status_code).phrase
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"error": message}))
