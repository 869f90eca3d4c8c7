"""openapi.json: it covers exactly the app's routes, is served as is, and the live server keeps to it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tornado.web import RequestHandler

from conftest import REPO, TOKEN
from whisperd.app import ROUTES

DOCUMENT = REPO / "openapi.json"
METHODS = ("get", "post", "put", "patch", "delete")


def document() -> dict:
    return json.loads(DOCUMENT.read_text(encoding="utf-8"))


def app_operations() -> set[tuple[str, str]]:
    """(path template, method) for every route, from the handlers' own methods."""
    found = set()
    for pattern, handler in ROUTES:
        path = pattern.removesuffix("/?").replace("\\", "")
        path = re.sub(r"\(\[\^/\]\+\)", "{job_id}", path)
        path = re.sub(r"\(\?P<(\w+)>\[\^/\]\+\)", r"{\1}", path)  # a named group: its name
        for method in METHODS:
            if getattr(handler, method) is not getattr(RequestHandler, method):
                found.add((path, method))
    return found


def test_every_route_is_documented_and_nothing_else():
    paths = document()["paths"]
    documented = {(path, method) for path, item in paths.items() for method in item if method in METHODS}
    assert app_operations() == documented


def test_document_is_openapi_3_1_with_resolvable_refs():
    doc = document()
    assert doc["openapi"].startswith("3.1")
    text = DOCUMENT.read_text(encoding="utf-8")
    for ref in set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text)):
        assert ref in doc["components"]["schemas"], ref


def test_document_is_served_as_is_without_a_token(server):
    response = server.api("GET", "/openapi.json", token=None)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.content == DOCUMENT.read_bytes()


def test_schemathesis_finds_no_5xx_and_no_response_off_the_document(make_server, tmp_path):
    # Most generated uploads are valid jobs and queue up; a sync wait must outlast that backlog
    # (its 504 when it does not is documented, but is a 5xx all the same).
    # Generated url= values would make the server fetch from made-up public hosts: off here.
    server = make_server(MAX_FILE_SIZE="200000", SYNC_REQUEST_TIMEOUT_SECONDS="60",
                         ENABLE_CONCURRENCY="true", MAX_CONCURRENT_JOBS="2", WHISPER_FETCH_ENABLED="false")
    report = tmp_path / "schemathesis.txt"
    command = [
        str(Path(sys.executable).parent / "st"), "run", server.url("/openapi.json"),
        "--url", server.url(""),
        "-H", f"Authorization: Bearer {TOKEN}",
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                    "response_schema_conformance,response_headers_conformance",
        "--max-examples", "10",
        "--phases", "examples,coverage,fuzzing,stateful",
        "--generation-database", "none",
        "--seed", "1",
        "--request-timeout", "90",
        "--no-color",
    ]
    hooks = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "PYTHONPATH": str(REPO / "tests")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=280, cwd=tmp_path, env=hooks)
    report.write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert " 500 " not in server.log()
