"""The page's Live mode in Chromium with a fake microphone fed from a speech file: getUserMedia,
the AudioWorklet's pcm16 at 24 kHz over /v1/realtime (token in the subprotocol), captions, lag, stop.
Against the fake warm engine (it hears loud audio as speech, a word per half second), and once
against the real one (tiny.en, marked `engine` as the other real-engine tests)."""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import JFK, JFK_TEXT, REPO, TOKEN, wait_until, words
from test_web import BROWSER_ARGS, CHROMIUM, sync_playwright

try:
    from playwright.sync_api import expect
except ImportError:  # pragma: no cover
    expect = None


@pytest.fixture
def fake_microphone_page(tmp_path):
    if sync_playwright is None:
        pytest.skip("the playwright package is not installed (scripts/setup.sh --dev installs it)")
    speech = tmp_path / "speech.wav"
    # jfk.flac with a second of silence after it, as the WAV Chromium's fake capture device reads.
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(JFK), "-af", "apad=pad_dur=2", "-ar", "48000",
                    "-ac", "1", "-acodec", "pcm_s16le", str(speech)], check=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS + [
            "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-audio-capture={speech}", "--autoplay-policy=no-user-gesture-required"])
        context = browser.new_context(permissions=["microphone"])
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        yield page
        context.close()
        browser.close()


def start_live_mode(page, server):
    """The page with the token saved and Live mode listening, as a caption user starts it."""
    page.goto(server.url("/"))
    page.fill("#token", TOKEN)
    page.click("#token-save")
    page.click("#live-start")
    expect(page.locator("#live-state")).to_have_text("Listening…")
    return page


def test_live_mode_captions_a_fake_microphone(make_server, fake_microphone_page):
    server = make_server(WHISPER_ENGINE="worker")
    page = start_live_mode(fake_microphone_page, server)
    expect(page.locator("#live-stop")).to_be_enabled()
    # A provisional caption while speech goes on, then finished utterances kept.
    expect(page.locator("#live-captions li.done").first).to_contain_text("w0", timeout=40_000)
    expect(page.locator("#live-lag")).to_have_text(re.compile(r"^\d+\.\d s$"))
    assert page.locator("#live-captions li").count() >= 1
    page.click("#live-stop")
    expect(page.locator("#live-start")).to_be_enabled()
    expect(page.locator("#live-state")).to_have_text("Stopped.", timeout=10_000)
    kept = page.locator("#live-captions li.done").all_text_contents()
    assert kept and all(text.startswith("w0") for text in kept)
    assert page.errors == []
    runs = [run for run in server.engine_runs() if run.get("live_op") == "live_pass"]
    assert runs  # the passes reached the engine's live lane


@pytest.mark.engine
def test_live_mode_captions_jfk_with_the_real_engine(make_server, fake_microphone_page):
    assert (REPO / "models" / "tiny.en" / "model.bin").is_file(), "models/tiny.en missing: run scripts/setup-engine.sh"
    server = make_server(WHISPER_ENGINE="worker", WHISPER_CMD=str(REPO / "whisperx.sh"),
                         WHISPER_MODELS_DIR=str(REPO / "models"), WHISPER_OPENAI_MODEL="tiny.en",
                         WHISPER_PRELOAD_MODEL="true", WHISPER_WORKER_START_SECONDS="600")
    # As a caption user would find a running server: the warm engine has loaded tiny.en.
    wait_until(lambda: server.api("GET", "/status").json()["engine"]["loaded_models"], timeout=180,
               what="the warm engine to load tiny.en")
    page = start_live_mode(fake_microphone_page, server)
    # jfk.flac is 11 s of speech (the server VAD ends a turn at its longer pauses), then 2 s of
    # silence: every turn's final transcript from the real engine is kept as a finished caption.
    spoken = words(JFK_TEXT)

    def finished_words():
        heard = words(" ".join(page.locator("#live-captions li.done").all_text_contents()))
        return heard if heard[-2:] == spoken[-2:] else None  # the last turn ("... your country") is in

    heard = wait_until(finished_words, timeout=60, what="captions of the whole of jfk.flac", poll=0.2)
    page.click("#live-stop")
    expect(page.locator("#live-state")).to_have_text("Stopped.", timeout=10_000)
    assert sum(word in heard for word in spoken) >= 0.8 * len(spoken), heard
    assert heard[:4] == ["and", "so", "my", "fellow"], heard
    assert page.errors == []
