"""Live sessions (GET /v1/realtime?intent=transcription) against the fake warm engine: the protocol,
its errors, auth, limits, lag, shutdown. Real HTTP and WebSockets; the fake engine's live lane hears
loud audio as speech and says a word per half second of it (tests/fake_whisperx.py)."""

from __future__ import annotations

import asyncio
import base64
import signal
import warnings

import pytest
import requests

from conftest import TOKEN, metric, wait_until
from realtime_client import Live, silence, tone

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

FAST = {"WHISPER_ENGINE": "worker"}


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def live_server(make_server):
    return make_server(**FAST)


def vad_update(silence_ms=400, **extra):
    return {"type": "session.update", "event_id": "evt_update", "session": {
        "type": "transcription",
        "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                            "transcription": {"model": "whisper-1", "language": "en", "prompt": ""},
                            "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 200,
                                               "silence_duration_ms": silence_ms},
                            **extra}}}}


def test_server_vad_session_gives_deltas_then_completed_in_the_ga_shape(live_server):
    async def scenario():
        live = await Live.connect(live_server.port)
        created = (await live.wait_for("session.created"))[0]
        assert created["session"]["type"] == "transcription" and created["session"]["id"].startswith("sess_")
        assert created["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
        await live.send(vad_update())
        updated = (await live.wait_for("session.updated"))[0]["session"]["audio"]["input"]
        assert updated["turn_detection"]["silence_duration_ms"] == 400 and updated["transcription"]["language"] == "en"
        await live.stream(silence(0.5) + tone(3.2), pace=2.0)
        sending_ended = asyncio.get_running_loop().time()
        await live.stream(silence(1.0), pace=2.0)
        completed = (await live.wait_for("conversation.item.input_audio_transcription.completed"))[0]
        started = live.of("input_audio_buffer.speech_started")[0]
        stopped = live.of("input_audio_buffer.speech_stopped")[0]
        committed = live.of("input_audio_buffer.committed")[0]
        assert 200 <= started["audio_start_ms"] <= 400  # speech at 500 ms less the 200 ms prefix
        assert 3600 <= stopped["audio_end_ms"] <= 4300
        assert started["item_id"] == stopped["item_id"] == committed["item_id"] == completed["item_id"]
        assert committed["previous_item_id"] is None
        deltas = live.of("conversation.item.input_audio_transcription.delta")
        assert len(deltas) >= 2, live.kinds()
        assert deltas[0]["_at"] < sending_ended  # captions while the speech is still being sent
        assert completed["transcript"] == "w0 w1 w2 w3 w4 w5"
        assert completed["transcript"].startswith("".join(d["delta"] for d in deltas))
        assert completed["usage"]["type"] == "duration" and 3.3 <= completed["usage"]["seconds"] <= 4.0
        assert live.kinds().index("input_audio_buffer.speech_stopped") < live.kinds().index(
            "conversation.item.input_audio_transcription.completed")
        lag = await live.wait_for("whisperd.session.lag")
        assert lag[-1]["lag_seconds"] < 5
        # The final pass was started when the tone went quiet and `completed` used it: the next
        # lag event (sent after completed) counts it.
        lags = await live.wait_for("whisperd.session.lag", count=len(live.of("whisperd.session.lag")) + 1)
        assert lags[-1]["final_passes_speculated"] >= 1 and lags[-1]["speculative_finals_used"] == 1
        live.close()

    run(scenario())
    assert metric(live_server, "whisperd_realtime_lag_seconds_count") >= 1
    assert metric(live_server, "whisperd_realtime_sessions_total") == 1


def test_beta_shape_with_mulaw_and_manual_commits(live_server):
    async def scenario():
        live = await Live.connect(live_server.port, headers={"OpenAI-Beta": "realtime=v1"})
        assert (await live.wait_for("transcription_session.created"))[0]["session"]["input_audio_format"] == "pcm16"
        await live.send({"type": "transcription_session.update", "session": {
            "input_audio_format": "g711_ulaw", "input_audio_transcription": {"model": "tiny.en"},
            "turn_detection": None}})
        session = (await live.wait_for("transcription_session.updated"))[0]["session"]
        assert session["input_audio_format"] == "g711_ulaw" and session["turn_detection"] is None
        assert session["input_audio_transcription"]["model"] == "tiny.en"
        await live.send({"type": "input_audio_buffer.commit", "event_id": "evt_empty"})
        error = (await live.wait_for("error"))[0]["error"]
        assert error["code"] == "input_audio_buffer_commit_empty" and error["event_id"] == "evt_empty"
        ulaw = audioop.lin2ulaw(tone(2.1, rate=8000), 2)
        await live.stream(ulaw, rate=8000, width=1, pace=4.0)
        await live.send({"type": "input_audio_buffer.commit"})
        completed = (await live.wait_for("conversation.item.input_audio_transcription.completed"))[0]
        assert completed["transcript"] == "w0 w1 w2 w3"
        assert abs(completed["usage"]["seconds"] - 2.1) < 0.05
        assert live.of("input_audio_buffer.committed")[0]["item_id"] == completed["item_id"]
        assert not live.of("input_audio_buffer.speech_started")  # no server VAD
        # A second utterance, then clear: cleared, and no transcript for it.
        await live.append(audioop.lin2ulaw(tone(1.0, rate=8000), 2))
        await live.send({"type": "input_audio_buffer.clear"})
        await live.wait_for("input_audio_buffer.cleared")
        await live.send({"type": "input_audio_buffer.commit"})
        assert (await live.wait_for("error", 2))[1]["error"]["code"] == "input_audio_buffer_commit_empty"
        assert len(live.of("conversation.item.input_audio_transcription.completed")) == 1
        live.close()

    run(scenario())


BAD_EVENTS = [
    ("not json {", "invalid_json", None),
    ('["a list"]', "invalid_event", None),
    ({"event_id": "e1", "audio": "AAAA"}, "missing_type", "type"),
    ({"type": "response.create", "event_id": "e2"}, "unknown_event", "type"),
    ({"type": "input_audio_buffer.append", "event_id": "e3", "audio": "%%%not base64%%%"}, "invalid_base64", "audio"),
    ({"type": "input_audio_buffer.append", "event_id": "e4", "audio": 5}, "invalid_type", "audio"),
    ({"type": "session.update", "event_id": "e5", "session": {"type": "realtime"}}, "invalid_value", "session.type"),
    ({"type": "session.update", "event_id": "e6", "session": {"audio": {"input": {"format": {"type": "audio/opus"}}}}},
     "unsupported_audio_format", "session.audio.input.format.type"),
    ({"type": "session.update", "event_id": "e7", "session": {"audio": {"input": {"format": {
        "type": "audio/pcm", "rate": 16000}}}}}, "unsupported_audio_format", "session.audio.input.format.rate"),
    ({"type": "transcription_session.update", "event_id": "e8", "session": {"input_audio_format": "opus"}},
     "unsupported_audio_format", "session.input_audio_format"),
    ({"type": "session.update", "event_id": "e9", "session": {"audio": {"input": {"turn_detection": {
        "type": "server_vad", "threshold": "high"}}}}}, "invalid_type", "session.audio.input.turn_detection.threshold"),
    ({"type": "session.update", "event_id": "e10", "session": {"audio": {"input": {"turn_detection": {
        "type": "semantic_vad"}}}}}, "unsupported_turn_detection", "session.audio.input.turn_detection.type"),
    ({"type": "session.update", "event_id": "e11", "session": {"audio": {"input": {"transcription": {
        "model": "no-such-model"}}}}}, "model_not_found", "session.audio.input.transcription.model"),
    ({"type": "session.update", "event_id": "e12", "session": "x"}, "invalid_type", "session"),
    ({"type": "session.update", "event_id": "e13", "session": {"audio": {"input": {"transcription": {
        "language": 7}}}}}, "invalid_type", "session.audio.input.transcription.language"),
    (b"\x00binary", "invalid_event", None),
]


def test_every_bad_event_is_an_error_event_and_the_session_goes_on(make_server):
    server = make_server(WHISPER_REALTIME_MAX_EVENT_BYTES="4096", **FAST)

    async def scenario():
        live = await Live.connect(server.port)
        await live.wait_for("session.created")
        for index, (event, code, param) in enumerate(BAD_EVENTS, start=1):
            await live.send(event)
            error = (await live.wait_for("error", index))[-1]
            assert error["error"]["code"] == code, (event, error)
            assert error["error"]["param"] == param, (event, error)
            assert error["error"]["type"] and error["error"]["message"]
            sent_id = event.get("event_id") if isinstance(event, dict) else None
            assert error["error"]["event_id"] == sent_id
        await live.append(silence(0.2) * 3)  # 28 KB of base64: over the 4096-byte limit
        too_large = (await live.wait_for("error", len(BAD_EVENTS) + 1))[-1]["error"]
        assert too_large["code"] == "event_too_large"
        assert not live.of("session.updated")  # no bad update changed anything
        await live.send(vad_update(silence_ms=321))  # and the session still works
        updated = (await live.wait_for("session.updated"))[0]["session"]["audio"]["input"]
        assert updated["turn_detection"]["silence_duration_ms"] == 321
        assert updated["format"] == {"type": "audio/pcm", "rate": 24000}
        assert not live.closed.done()
        live.close()

    run(scenario())


def test_auth_header_subprotocol_refusal_before_upgrade_and_revocation(make_server):
    server = make_server(WHISPER_API_ALLOW_ANY_TOKEN="false", **FAST)
    alice = server.create_token("alice")
    # No token, a wrong one: refused with 401 in OpenAI's shape, no WebSocket.
    for headers in ({}, {"Authorization": "Bearer wrong-token"}):
        response = requests.get(server.url("/v1/realtime?intent=transcription"), timeout=10, headers={
            "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode(), **headers})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert "Upgrade" not in response.headers

    async def scenario():
        with pytest.raises(Exception) as refused:
            await Live.connect(server.port, token=None)
        assert "401" in str(refused.value)
        browser = await Live.connect(server.port, token=None,
                                     subprotocols=["realtime", f"openai-insecure-api-key.{alice}"])
        assert browser.conn.selected_subprotocol == "realtime"
        await browser.wait_for("session.created")
        header = await Live.connect(server.port, token=alice)
        await header.wait_for("session.created")
        assert server.cli("token", "revoke", "alice").returncode == 0
        for live in (browser, header):
            code, _ = await live.wait_closed(timeout=10)
            assert code == 1008
            assert live.of("error")[-1]["error"]["code"] == "invalid_api_key"

    run(scenario())


def test_session_limits_each_refused_in_openai_shape(make_server):
    server = make_server(WHISPER_REALTIME_MAX_SESSIONS="2", WHISPER_REALTIME_IDLE_SECONDS="3",
                         WHISPER_REALTIME_MAX_AHEAD_SECONDS="3", **FAST)

    async def scenario():
        first = await Live.connect(server.port)
        second = await Live.connect(server.port)
        await first.wait_for("session.created")
        await first.send({"type": "input_audio_buffer.clear"})  # an event: its idle time starts again
        await second.send({"type": "input_audio_buffer.clear"})
        await first.wait_for("input_audio_buffer.cleared")
        with pytest.raises(Exception) as refused:
            await Live.connect(server.port)
        assert "429" in str(refused.value)
        # Far faster than real time for long: told, then closed.
        await second.append(tone(0.1))
        await second.stream(silence(9.0), chunk_seconds=0.5, pace=1000)
        code, _ = await second.wait_closed(timeout=10)
        assert code == 1008 and second.of("error")[-1]["error"]["code"] == "audio_too_fast"
        # Idle: closed with an error first.
        code, _ = await first.wait_closed(timeout=10)
        assert code == 1000 and first.of("error")[-1]["error"]["code"] == "idle_timeout"
        third = await Live.connect(server.port)  # the closed ones no longer count
        await third.wait_for("session.created")
        third.close()

    run(scenario())
    response = requests.get(server.url("/v1/realtime?intent=transcription"), timeout=10,
                            headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "websocket_required"


def test_a_session_that_cannot_keep_up_sheds_partials_then_is_told_and_closed(make_server):
    server = make_server(FAKE_WHISPERX_LIVE_SECONDS="1.5", WHISPER_REALTIME_MAX_LAG_SECONDS="4", **FAST)

    async def scenario():
        live = await Live.connect(server.port)
        await live.send(vad_update())
        await live.stream(tone(9.0), chunk_seconds=0.2, pace=1.5)
        code, _ = await live.wait_closed(timeout=20)
        assert code == 1013
        assert live.of("error")[-1]["error"]["code"] == "session_lagging"
        lags = [event["lag_seconds"] for event in live.of("whisperd.session.lag")]
        assert lags and max(lags) > 1.0
        assert live.of("whisperd.session.lag")[-1]["partial_passes_skipped"] >= 1

    run(scenario())
    assert metric(server, "whisperd_realtime_partial_passes_skipped_total") >= 1


def test_sigterm_completes_the_open_utterance_then_closes_going_away(live_server):
    async def scenario():
        live = await Live.connect(live_server.port)
        await live.send(vad_update(silence_ms=2000))
        await live.stream(tone(2.0), pace=4.0)
        await live.wait_for("input_audio_buffer.speech_started")
        live_server.proc.send_signal(signal.SIGTERM)
        code, _ = await live.wait_closed(timeout=20)
        assert code == 1001
        completed = live.of("conversation.item.input_audio_transcription.completed")
        assert len(completed) == 1 and completed[0]["transcript"].startswith("w0 w1")

    run(scenario())
    assert live_server.proc.wait(20) == 0


def test_nodes_and_engines_that_cannot_run_live_sessions_say_why(make_server):
    cli = make_server(WHISPER_ENGINE="cli")
    api = make_server(WHISPER_ENGINE="worker", WHISPER_NODE_ROLE="api")
    for server, code in ((cli, "live_needs_warm_engine"), (api, "no_engine_on_node")):
        async def scenario():
            with pytest.raises(Exception) as refused:
                await Live.connect(server.port)
            assert "503" in str(refused.value)

        run(scenario())
        response = requests.get(server.url("/v1/realtime?intent=transcription"), timeout=10, headers={
            "Authorization": f"Bearer {TOKEN}", "Connection": "Upgrade", "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode()})
        assert response.status_code == 503 and response.json()["error"]["code"] == code


def test_several_http_processes_share_the_one_engine_and_live_passes_do_not_wait_for_a_batch_job(make_server):
    server = make_server(HTTP_WORKER_NUMBER="2", FAKE_WHISPERX_MODE="slow", FAKE_WHISPERX_SLOW_SECONDS="20", **FAST)
    job_id = server.submit_ok()
    wait_until(lambda: server.status(job_id).json()["status"] == "Processing", what="the batch job to run")

    async def one_session():
        live = await Live.connect(server.port)
        await live.send({"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}})
        await live.wait_for("session.updated")
        await live.stream(tone(1.6), pace=8.0)
        await live.send({"type": "input_audio_buffer.commit"})
        started = asyncio.get_running_loop().time()
        completed = (await live.wait_for("conversation.item.input_audio_transcription.completed", timeout=10))[0]
        live.close()
        return completed["transcript"], asyncio.get_running_loop().time() - started

    async def scenario():
        return await asyncio.gather(*(one_session() for _ in range(4)))

    for transcript, seconds in run(scenario()):
        assert transcript == "w0 w1 w2" and seconds < 5  # the 20 s batch job is still running
    assert server.status(job_id).json()["status"] == "Processing"
    assert len([run for run in server.engine_runs() if run.get("worker")]) == 1  # one engine for the box


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_live_minutes_count_in_usage(make_server):
    server = make_server(WHISPER_API_ALLOW_ANY_TOKEN="false", **FAST)
    alice = server.create_token("alice")
    admin = server.create_token("root", "--admin")

    async def scenario():
        live = await Live.connect(server.port, token=alice)
        await live.wait_for("session.created")
        await live.stream(tone(3.0), chunk_seconds=0.5, pace=6.0)
        live.close()

    run(scenario())
    usage = wait_until(lambda: (lambda body: body if body["live"]["today"]["sessions"] else None)(
        server.api("GET", "/usage", token=alice).json()), what="the session's usage")
    assert usage["live"]["today"]["minutes"] == pytest.approx(0.05, abs=0.002)
    assert usage["live"]["last_30_days"] == usage["live"]["today"]
    everyone = server.api("GET", "/usage", token=admin).json()
    assert [t["live"]["today"]["sessions"] for t in everyone["tokens"] if t["name"] == "alice"] == [1]
    assert everyone["live"]["today"]["sessions"] == 0  # the admin's own


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_per_token_maximum_of_live_sessions(make_server):
    server = make_server(WHISPER_API_ALLOW_ANY_TOKEN="false", WHISPER_TOKEN_MAX_LIVE_SESSIONS="1", **FAST)
    two = server.create_token("two", "--max-live-sessions", "2")
    one = server.create_token("one")  # the setting's default: 1

    async def scenario():
        opened = [await Live.connect(server.port, token=two), await Live.connect(server.port, token=two)]
        with pytest.raises(Exception) as refused:
            await Live.connect(server.port, token=two)
        assert "429" in str(refused.value)
        opened.append(await Live.connect(server.port, token=one))  # another token's count is its own
        with pytest.raises(Exception) as refused:
            await Live.connect(server.port, token=one)
        assert "429" in str(refused.value)
        for live in opened:
            live.close()

    run(scenario())


def test_without_turn_detection_28_s_uncommitted_are_committed_by_the_server(live_server):
    async def scenario():
        live = await Live.connect(live_server.port)
        await live.send({"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}})
        await live.wait_for("session.updated")
        await live.stream(tone(29.0), chunk_seconds=0.5, pace=10.0)
        completed = (await live.wait_for("conversation.item.input_audio_transcription.completed"))[0]
        assert completed["usage"]["seconds"] == pytest.approx(28.0, abs=0.6)
        assert live.of("input_audio_buffer.committed")[0]["item_id"] == completed["item_id"]
        assert not live.closed.done()
        live.close()

    run(scenario())
