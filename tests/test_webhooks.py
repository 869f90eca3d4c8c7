"""Webhooks: a receiver on loopback checks the signature, the retries and the job_events record."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import free_port, wait_until
from whisperd.jobs import Job
from whisperd.urlpolicy import HostPolicy, PolicyError, check_url, resolve_checked

SECRET = "webhook-secret-for-tests-0123456789"
LOOPBACK = dict(WHISPER_WEBHOOK_SECRET=SECRET, WHISPER_WEBHOOK_ALLOWED_HOSTS="127.0.0.0/8",
                WHISPER_WEBHOOK_BACKOFF_SECONDS="0.2", WHISPER_WEBHOOK_MAX_ATTEMPTS="4",
                WHISPER_WEBHOOK_TIMEOUT_SECONDS="2")


class Receiver:
    """An HTTP receiver on 127.0.0.1 that answers each POST with the next scripted reply."""

    def __init__(self, replies=(200,)) -> None:
        self.replies = list(replies)
        self.calls: list[dict] = []
        self.port = free_port()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                reply = receiver.replies.pop(0) if len(receiver.replies) > 1 else receiver.replies[0]
                receiver.calls.append({"at": time.monotonic(), "path": self.path, "headers": dict(self.headers),
                                       "body": body, "reply": reply})
                if reply == "drop":  # a network error for the sender: no answer at all
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                answer = b"x" * 300_000 if reply == "big" else b"ok"  # "big": a 200 with a large body
                self.send_response(200 if reply == "big" else reply)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path="/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_calls(self, count: int, timeout: float = 15.0) -> list[dict]:
        wait_until(lambda: len(self.calls) >= count, timeout, f"{count} calls (have {len(self.calls)})")
        return self.calls

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(*replies):
        made.append(Receiver(replies or (200,)))
        return made[-1]

    yield make
    for r in made:
        r.close()


def webhook_events(server, job_id, wanted: int, timeout: float = 15.0) -> list[dict]:
    def rows() -> list[dict]:
        found = [dict(r) for r in server.rows(
            "SELECT event, detail, actor FROM job_events WHERE job_id=? AND event LIKE 'webhook-%' ORDER BY id",
            (job_id,))]
        return found if len(found) >= wanted else []

    return wait_until(rows, timeout, f"{wanted} webhook event(s) of job {job_id}")


def barrier(server, hook) -> None:
    """Run one more job whose notice goes to `hook` and wait for it: every notice the server
    had to send for the jobs before it went out first (an event to wait on, not a sleep)."""
    before = len(hook.calls)
    job_id = server.submit_ok(diarize="false", callback_url=hook.url("/barrier"))
    hook.wait_calls(before + 1)
    assert json.loads(hook.calls[-1]["body"])["job_id"] == job_id


def check_signature(call: dict) -> dict:
    headers, body = call["headers"], call["body"]
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Whisperd-Signature"], expected)
    payload = json.loads(body)
    assert headers["X-Whisperd-Timestamp"] == str(payload["timestamp"])
    assert abs(time.time() - payload["timestamp"]) < 60
    assert headers["Content-Type"].startswith("application/json")
    return payload


def test_completed_job_is_posted_signed_and_recorded(make_server, receiver):
    hook = receiver(200)
    server = make_server(**LOOPBACK)
    url = hook.url("/hook?token=receiver-own-secret")
    job_id = server.submit_ok(diarize="false", callback_url=url)
    assert server.wait_status(job_id)["status"] == "Completed"
    (call,) = hook.wait_calls(1)
    assert call["path"] == "/hook?token=receiver-own-secret"
    payload = check_signature(call)
    assert payload["event"] == "job.finished"
    assert payload["job_id"] == job_id and payload["status"] == "Completed"
    assert payload["status_url"] == f"/transcription/{job_id}"
    assert payload["result_url"] == f"/transcription/{job_id}/result"
    assert payload["error"] is None and payload["attempt"] == 1
    assert call["headers"]["X-Whisperd-Delivery"] == payload["delivery_id"]
    (event,) = webhook_events(server, job_id, 1)
    assert event["event"] == "webhook-delivered"
    assert event["detail"] == f"attempt 1 of 4 to http://127.0.0.1:{hook.port}/hook: HTTP 200"
    # The result is still there: a webhook does not consume it.
    assert server.api("GET", f"/transcription/{job_id}/result").status_code == 200
    everything = server.log() + json.dumps([list(r) for r in server.rows("SELECT * FROM job_events")])
    assert SECRET not in everything and "receiver-own-secret" not in everything


def test_5xx_and_network_errors_are_retried_with_growing_delays(make_server, receiver):
    hook = receiver(500, "drop", 502, 200)
    server = make_server(**LOOPBACK)
    job_id = server.submit_ok(diarize="false", callback_url=hook.url())
    calls = hook.wait_calls(4)
    payloads = [check_signature(c) for c in calls]
    assert [p["attempt"] for p in payloads] == [1, 2, 3, 4]
    assert len({p["delivery_id"] for p in payloads}) == 1
    gaps = [b["at"] - a["at"] for a, b in zip(calls, calls[1:])]
    assert gaps[0] >= 0.18 and gaps[1] >= 0.38 and gaps[2] >= 0.78, gaps
    events = webhook_events(server, job_id, 4)
    assert [e["event"] for e in events] == ["webhook-retry"] * 3 + ["webhook-delivered"]
    assert "HTTP 500; next attempt in 0.2 s" in events[0]["detail"]
    assert "network error" in events[1]["detail"] and "next attempt in 0.4 s" in events[1]["detail"]
    assert "HTTP 502; next attempt in 0.8 s" in events[2]["detail"]
    assert events[3]["detail"].startswith("attempt 4 of 4")


def test_gives_up_after_the_configured_attempts_and_never_retries_a_4xx(make_server, receiver):
    down, refusing = receiver(503), receiver(404)
    server = make_server(**dict(LOOPBACK, WHISPER_WEBHOOK_MAX_ATTEMPTS="3", WHISPER_WEBHOOK_BACKOFF_SECONDS="0.05"))
    first = server.submit_ok(diarize="false", callback_url=down.url())
    second = server.submit_ok(diarize="false", callback_url=refusing.url())
    events = webhook_events(server, first, 3)
    assert [e["event"] for e in events] == ["webhook-retry", "webhook-retry", "webhook-failed"]
    assert events[-1]["detail"].endswith("HTTP 503; no attempts left")
    (event,) = webhook_events(server, second, 1)
    assert event["event"] == "webhook-failed" and "HTTP 404; not retried" in event["detail"]
    barrier(server, receiver(200))
    assert len(down.calls) == 3 and len(refusing.calls) == 1


def test_failed_and_canceled_jobs_are_posted_with_their_reason(make_server, receiver):
    hook = receiver(200)
    server = make_server(**LOOPBACK)
    failing = server.submit_ok(diarize="false", prompt="fake:fail", callback_url=hook.url("/failed"))
    running = server.submit_ok(diarize="false", prompt="fake:slow")
    queued = server.submit_ok(diarize="false", callback_url=hook.url("/canceled"))
    assert server.api("DELETE", f"/transcription/{queued}").status_code == 200
    calls = {c["path"]: check_signature(c) for c in hook.wait_calls(2)}
    assert calls["/failed"]["status"] == "Failed" and calls["/failed"]["error"]
    assert calls["/failed"]["result_url"] is None
    assert calls["/canceled"]["status"] == "Canceled"
    assert calls["/canceled"]["error"] == "canceled by the client"
    server.api("DELETE", f"/transcription/{running}")


def test_a_receivers_long_answer_is_read_and_dropped(make_server, receiver):
    hook = receiver("big")
    server = make_server(**LOOPBACK)
    job_id = server.submit_ok(diarize="false", callback_url=hook.url())
    (event,) = webhook_events(server, job_id, 1)
    assert event["event"] == "webhook-delivered", event
    assert len(hook.calls) == 1


def test_no_webhook_for_a_job_without_callback_url(make_server, receiver):
    hook = receiver(200)
    server = make_server(**LOOPBACK)
    job_id = server.submit_ok(diarize="false")
    server.wait_status(job_id)
    barrier(server, hook)
    assert len(hook.calls) == 1  # the barrier's own notice only
    assert not server.rows("SELECT * FROM job_events WHERE job_id=? AND event LIKE 'webhook-%'", (job_id,))


@pytest.mark.parametrize("url,message", [
    ("http://127.0.0.1:9/hook", "callback address 127.0.0.1 is not allowed by WHISPER_WEBHOOK_ALLOWED_HOSTS"),
    ("http://localhost:9/hook", "callback host localhost resolves to"),
    ("http://10.1.2.3/hook", "10.1.2.3 is not allowed"),
    ("http://192.168.1.1/hook", "192.168.1.1 is not allowed"),
    ("http://169.254.169.254/latest/meta-data", "169.254.169.254 is not allowed"),
    ("http://[::1]:9/hook", "::1 is not allowed"),
    ("http://[::ffff:127.0.0.1]/hook", "is not allowed"),
    ("ftp://127.0.0.1/hook", "must be an http:// or https:// URL"),
    ("file:///etc/passwd", "must be an http:// or https:// URL"),
    ("http:///nohost", "has no host"),
    ("http://user:pw@127.0.0.1/hook", "must not contain user:password@"),
    ("http://127.0.0.1:99999/hook", "not a valid URL"),
    ("http://" + "a" * 2001, "longer than 2000 characters"),
])
def test_callback_url_is_checked_at_submission(make_server, url, message):
    server = make_server(WHISPER_WEBHOOK_SECRET=SECRET)  # the default policy: public addresses only
    response = server.submit(callback_url=url)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
    assert server.rows("SELECT id FROM jobs") == [] and server.files_gone()


def test_callback_url_needs_a_configured_secret(server):
    response = server.submit(callback_url="http://127.0.0.1:9/hook")
    assert response.status_code == 400
    assert "WHISPER_WEBHOOK_SECRET" in response.json()["error"]


def test_secret_and_bad_allow_list_in_configuration(make_server):
    server = make_server(start=False, WHISPER_WEBHOOK_SECRET=SECRET, WHISPER_WEBHOOK_ALLOWED_HOSTS="public, not_a host!")
    server.start(wait=False)
    assert server.proc.wait(20) == 2
    log = server.log()
    assert "WHISPER_WEBHOOK_ALLOWED_HOSTS" in log and "not_a" in log
    assert SECRET not in log


# -- the policy itself, without a network ---------------------------------------------------


def test_default_policy_allows_only_public_addresses():
    policy = HostPolicy.parse("public")
    allowed = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"]
    refused = ["127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.0.1", "169.254.169.254", "100.64.0.1",
               "0.0.0.0", "224.0.0.1", "::1", "fe80::1", "fc00::1", "::ffff:10.0.0.1", "::ffff:127.0.0.1"]
    assert all(policy.allows_ip(ipaddress.ip_address(a)) for a in allowed)
    assert not any(policy.allows_ip(ipaddress.ip_address(a)) for a in refused)


def test_allow_list_entries():
    policy = HostPolicy.parse("127.0.0.0/8, 10.1.2.3 hooks.example.org,*.corp.example")
    assert policy.allows_ip(ipaddress.ip_address("127.9.9.9"))
    assert policy.allows_ip(ipaddress.ip_address("10.1.2.3"))
    assert not policy.allows_ip(ipaddress.ip_address("10.1.2.4"))
    assert not policy.allows_ip(ipaddress.ip_address("8.8.8.8"))  # no 'public': an allow-list only
    assert policy.allows_name("hooks.example.org") and policy.allows_name("a.b.corp.example")
    assert not policy.allows_name("corp.example.evil") and not policy.allows_name("example.org")
    assert HostPolicy.parse("").describe() == "nothing"
    with pytest.raises(ValueError):
        HostPolicy.parse("public, bad_name!")
    assert check_url("https://hooks.example.org/x?y=1") == ("https", "hooks.example.org", 443)


def test_send_time_check_refuses_a_host_that_now_resolves_to_loopback(receiver):
    """DNS rebinding: whatever was checked at submission, the send goes only to allowed addresses."""
    from whisperd.webhooks import WebhookSender

    hook = receiver(200)

    class FakeLedger:
        events: list = []

        async def add_event(self, job_id, event, detail=None):
            self.events.append((event, detail))

    class FakeConfig:
        WHISPER_WEBHOOK_ALLOWED_HOSTS = "public"
        WHISPER_WEBHOOK_SECRET = SECRET
        WHISPER_WEBHOOK_MAX_ATTEMPTS = 3
        WHISPER_WEBHOOK_BACKOFF_SECONDS = 0.01
        WHISPER_WEBHOOK_TIMEOUT_SECONDS = 2.0

    ledger = FakeLedger()
    sender = WebhookSender(FakeConfig(), ledger)
    job = Job(seq=1, id="j1", owner="o", status="Completed", created_at="t", filename="a.wav", upload_bytes=1,
              language="en", model="tiny.en", response_format="txt", diarize=False, prompt="", device="cpu",
              device_index="0", callback_url=f"http://localhost:{hook.port}/hook")

    async def go():
        with pytest.raises(PolicyError):
            await resolve_checked(sender.policy, "localhost", hook.port)
        sender.job_ended(job)
        # The refusal is recorded once the name is resolved: wait for the record itself.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not ledger.events:
            assert loop.time() < deadline, "the refusal was never recorded"
            await asyncio.sleep(0.01)
        await sender.stop()

    asyncio.run(go())
    assert hook.calls == []
    assert [e for e, _ in ledger.events] == ["webhook-refused"]
    assert "resolves to 127.0.0.1" in ledger.events[0][1] or "resolves to ::1" in ledger.events[0][1]


# -- across restarts ------------------------------------------------------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_notice_interrupted_by_kill_9_is_sent_after_the_restart_once(make_server, receiver, workers):
    hook = receiver(503)
    server = make_server(**dict(LOOPBACK, WHISPER_WEBHOOK_BACKOFF_SECONDS="30", HTTP_WORKER_NUMBER=workers))
    job_id = server.submit_ok(diarize="false", callback_url=hook.url())
    webhook_events(server, job_id, 1)  # the first attempt failed; the retry waits 30 s
    server.kill9()
    hook.replies = [200]
    server.start()
    events = webhook_events(server, job_id, 4)
    assert [e["event"] for e in events] == ["webhook-retry", "webhook-pending", "webhook-resumed", "webhook-delivered"]
    assert len(hook.calls) == 2
    assert len({json.loads(c["body"])["job_id"] for c in hook.calls}) == 1
    server.stop()
    server.start()  # delivered: a further start sends nothing
    barrier(server, hook)
    assert len(hook.calls) == 3  # the two before, then the barrier's


def test_a_graceful_stop_leaves_the_notice_for_the_next_start(make_server, receiver):
    hook = receiver(503)
    server = make_server(**dict(LOOPBACK, WHISPER_WEBHOOK_BACKOFF_SECONDS="30"))
    job_id = server.submit_ok(diarize="false", callback_url=hook.url())
    webhook_events(server, job_id, 1)
    assert server.stop() == 0
    events = webhook_events(server, job_id, 2)
    assert events[1]["event"] == "webhook-interrupted"
    hook.replies = [200]
    server.start()
    assert webhook_events(server, job_id, 5)[-1]["event"] == "webhook-delivered"
    assert SECRET not in server.log()
