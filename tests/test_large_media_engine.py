"""Resumable uploads and URL fetch end to end on the real WhisperX (tiny.en, warm worker, CPU)."""

from __future__ import annotations

import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from tusclient import client as tus_client

from conftest import JFK, JFK_TEXT, REPO, TOKEN, free_port, words

pytestmark = pytest.mark.engine


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_jfk_through_a_resumable_upload_and_through_a_url(make_server):
    assert (REPO / "models" / "tiny.en" / "model.bin").is_file(), "run scripts/setup-engine.sh first"
    port = free_port()
    httpd = ThreadingHTTPServer(("127.0.0.1", port), partial(Quiet, directory=str(JFK.parent)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    server = make_server(WHISPER_ENGINE="worker", WHISPER_CMD=str(REPO / "whisperx.sh"),
                         WHISPER_MODELS_DIR=str(REPO / "models"), SYNC_REQUEST_TIMEOUT_SECONDS="300",
                         WHISPER_FETCH_ALLOWED_HOSTS="127.0.0.1", RUST_LOG="info")
    try:
        uploader = tus_client.TusClient(server.url("/uploads"), headers={"Authorization": f"Bearer {TOKEN}"}) \
            .uploader(str(JFK), chunk_size=64 * 1024, metadata={"filename": JFK.name}, upload_checksum=True)
        uploader.upload()
        upload_id = uploader.url.rsplit("/", 1)[1]
        by_upload = server.api("POST", "/transcription", timeout=300, files={
            "upload": (None, upload_id), "sync": (None, "true"), "diarize": (None, "false")})
        assert by_upload.status_code == 200, by_upload.text
        assert words(by_upload.json()["text"]) == words(JFK_TEXT)

        by_url = server.api("POST", "/transcription", timeout=300, files={
            "url": (None, f"http://127.0.0.1:{port}/{JFK.name}"), "sync": (None, "true"), "diarize": (None, "false"),
            "response_format": (None, "srt")})
        assert by_url.status_code == 200, by_url.text
        assert "fellow Americans" in by_url.json()["text"] and "-->" in by_url.json()["text"]
        assert server.files_gone(), server.job_files()  # a delivery's files go just after the last byte
    finally:
        httpd.shutdown()
