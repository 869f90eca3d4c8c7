"""The page's Live mode in Chromium with a fake microphone fed from a speech file: getUserMedia,
the AudioWorklet's pcm16 at 24 kHz over /v1/realtime (token in the subprotocol), captions, lag, stop.
Against the fake warm engine (it hears loud audio as speech, a word per half second)."""

from __future__ import annotations

import re
import subprocess

import pytest

from conftest import JFK, TOKEN
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


def test_live_mode_captions_a_fake_microphone(make_server, fake_microphone_page):
    server = make_server(WHISPER_ENGINE="worker")
    page = fake_microphone_page
    page.goto(server.url("/"))
    page.fill("#token", TOKEN)
    page.click("#token-save")
    page.click("#live-start")
    expect(page.locator("#live-state")).to_have_text("Listening…")
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
