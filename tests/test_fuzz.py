"""Generated requests against a real server: never a 5xx, every error JSON, no file nobody owns."""

from __future__ import annotations

import string
from urllib.parse import quote

import requests
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import make_wav
from harness import wait_until

FIELDS = ["file", "language", "model", "diarize", "prompt", "hf_token", "response_format", "device",
          "device_index", "sync"]
HEADER_TEXT = st.text(alphabet=string.ascii_letters + string.digits + string.punctuation + " ", max_size=80).map(str.strip)
FIELD_VALUE = st.one_of(
    st.sampled_from(["", "en", "fr", "auto", "tiny.en", "../x", "true", "false", "txt", "srt", "cpu", "cuda", "0", "-1"]),
    st.text(max_size=60),
)
GOOD_VALUES = {
    "language": ["en", "fr", "auto", "xx"], "model": ["tiny.en", "large-v3"], "diarize": ["false", "true", "maybe"],
    "prompt": ["", "Names: Ada", "fake:fail", "fake:slow"], "hf_token": ["hf_fuzz"], "response_format": ["txt", "srt", "docx"],
    "device": ["cpu", "cuda"], "device_index": ["0", "1"], "sync": ["false", "true"],
}
JOB_ID = st.one_of(st.uuids().map(str), st.text(max_size=40), st.sampled_from(["..", "%2e%2e", "a/b", "result"]))


@st.composite
def form_bodies(draw, wav: bytes) -> tuple[bytes, str]:
    boundary = draw(st.sampled_from(["b", "----x7", "zz"]))
    parts = []
    plausible = draw(st.booleans())  # half the forms are close to valid, to reach the job path
    if plausible:
        names = ["file"] + draw(st.lists(st.sampled_from(FIELDS[1:]), max_size=4, unique=True))
    else:
        names = draw(st.lists(st.one_of(st.sampled_from(FIELDS),
                                        st.text(alphabet=string.ascii_letters, min_size=1, max_size=8)), max_size=8))
    for name in names:
        if plausible and name != "file":
            parts.append(f'Content-Disposition: form-data; name="{name}"'.encode() + b"\r\n\r\n"
                         + draw(st.sampled_from(GOOD_VALUES[name])).encode())
        elif name == "file" or draw(st.booleans()) and draw(st.booleans()):
            filename = draw(st.text(alphabet=string.printable.replace('"', "").replace("\r", "").replace("\n", ""),
                                    max_size=30))
            content = draw(st.one_of(st.just(wav), st.just(wav), st.binary(max_size=2000), st.just(b""),
                                     st.just(wav + b"\0" * 200_000)))
            head = f'Content-Disposition: form-data; name="{name}"; filename="{filename}"'
            parts.append(head.encode() + b"\r\n\r\n" + content)
        else:
            parts.append(f'Content-Disposition: form-data; name="{name}"'.encode() + b"\r\n\r\n"
                         + draw(FIELD_VALUE).encode())
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    if plausible or draw(st.booleans()) or not parts:
        body += b"--" + boundary.encode() + b"--\r\n"
    else:
        body = body[: draw(st.integers(0, len(body)))]  # truncated somewhere
    content_type = draw(st.sampled_from([f"multipart/form-data; boundary={boundary}", "multipart/form-data",
                                         "application/json", f"multipart/form-data; boundary={boundary}x"]))
    return body, content_type


@st.composite
def api_requests(draw, wav: bytes, token: str) -> dict:
    if draw(st.integers(0, 9)) < 4:  # a submission by a valid caller, to reach the job path
        body, content_type = draw(form_bodies(wav))
        return {"method": "POST", "path": "/transcription", "body": body,
                "headers": {"Authorization": f"Bearer {token}", "Content-Type": content_type}}
    method = draw(st.sampled_from(["GET", "POST", "DELETE", "OPTIONS", "PUT", "PATCH"]))
    job_id = quote(draw(JOB_ID), safe="")
    path = draw(st.sampled_from(["/transcription", "/transcription", "/transcription/{id}", "/transcription/{id}/result", "/status",
                                 "/{id}", "/transcription/{id}/result/{id}",
                                 "/transcription/{id}/events", "/models", "/", "/static/{id}"])).replace("{id}", job_id)
    if draw(st.booleans()):
        path += "?" + draw(st.sampled_from(["response_format=", "response_format=srt", "response_format=%00", "x=1"]))
        path += quote(draw(st.text(max_size=10)), safe="")
    headers = {}
    auth = draw(st.sampled_from(["token", "token", "none", "text", "bearer-text"]))
    if auth == "token":
        headers["Authorization"] = f"Bearer {token}"
    elif auth == "text":
        headers["Authorization"] = draw(HEADER_TEXT)
    elif auth == "bearer-text":
        headers["Authorization"] = "Bearer " + draw(HEADER_TEXT)
    body = b""
    if method in ("POST", "PUT") or draw(st.booleans()) and draw(st.booleans()):
        body, headers["Content-Type"] = draw(form_bodies(wav))
        if draw(st.integers(0, 9)) == 0:
            headers["Content-Type"] = draw(HEADER_TEXT)
    return {"method": method, "path": path, "headers": headers, "body": body}


def test_generated_requests_never_break_the_server(make_server):
    server = make_server(WHISPER_API_ALLOW_ANY_TOKEN="false", MAX_FILE_SIZE="100000", SYNC_REQUEST_TIMEOUT_SECONDS="2")
    token = server.create_token("fuzz")
    wav = make_wav(server.root / "fuzz.wav", seconds=0.1).read_bytes()
    seen: dict[int, int] = {}

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(request=api_requests(wav, token))
    def check(request):
        response = requests.request(request["method"], server.url(request["path"]), headers=request["headers"],
                                    data=request["body"], timeout=30)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (request, response.text)
        if response.status_code >= 400:
            assert isinstance(response.json()["error"], str) and response.json()["error"], (request, response.text)
        owned = {row[0] for row in server.rows("SELECT id FROM jobs WHERE delivered_at IS NULL AND expired_at IS NULL"
                                               " AND status IN ('Queued', 'Processing', 'Completed')")}
        # A delivery is recorded just after the client has the last byte, and its files go just
        # after that: a sync answer's job may still be on disk for that moment.
        delivered = {row[0] for row in server.rows("SELECT id FROM jobs WHERE delivered_at IS NOT NULL")}
        wait_until(lambda: not any(job_id in path for path in server.job_files() for job_id in delivered),
                   timeout=10, what="a delivered job's files to go")
        for path in server.job_files():
            assert ".incoming/" not in path and any(job_id in path for job_id in owned), (request, path)

    check()
    assert server.api("GET", "/status", token=token).status_code == 200
    assert "Traceback" not in server.log() and " ERROR " not in server.log()
    # the generator reached past authentication into the handlers
    assert seen.get(202) and seen.get(401) and seen.get(400) and seen.get(415) and len(seen) >= 6, seen
