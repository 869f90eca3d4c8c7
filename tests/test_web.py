"""The web page in a real browser: Playwright drives Debian's chromium against a running whisperd."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from conftest import JFK, REPO, TOKEN, make_wav
from whisperd.formats import render
from whisperd.identity.tokens import RECHECK_SECONDS

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "artifacts"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - scripts/setup.sh --dev installs it
    sync_playwright = None


@pytest.fixture(scope="module")
def browser():
    missing = "the playwright package" if sync_playwright is None else None
    if missing is None and not Path(CHROMIUM).exists():
        missing = "Debian's chromium"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing} is not installed: scripts/setup.sh --dev installs it")
        pytest.skip(f"{missing} is not installed (scripts/setup.sh --dev installs it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser):
    contexts = []

    def make(server, width=1000, height=900, token=TOKEN):
        context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.goto(server.url("/"))
        if token is not None:
            page.fill("#token", token)
            page.click("#token-save")
            expect(page.locator("#model option")).not_to_have_count(0)  # the options have loaded
        return page

    yield make
    for context in contexts:
        context.close()


def start_job(page, audio: Path, prompt: str = "", fmt: str | None = None):
    page.set_input_files("#file", str(audio))
    expect(page.locator("#file-name")).to_contain_text(audio.name)
    if prompt:
        page.fill("#prompt", prompt)
    if fmt:
        page.select_option("#response_format", fmt)
    page.uncheck("#diarize")
    page.click("#start")


def download(page, fmt: str) -> str:
    with page.expect_download() as info:
        page.click(f"#downloads button[data-format={fmt}]")
    saved = ARTIFACTS / f"web-{info.value.suggested_filename}"
    info.value.save_as(saved)
    return saved.read_text(encoding="utf-8")


def test_upload_progress_transcript_downloads_and_screenshots(make_server, open_page):
    server = make_server(FAKE_WHISPERX_SLOW_SECONDS="4")
    page = open_page(server)
    assert page.locator("#language").input_value() == "en"
    assert page.locator("#response_format option").all_inner_texts() == ["txt", "srt", "vtt", "tsv", "json", "aud"]
    start_job(page, JFK, prompt="fake:slow", fmt="srt")

    expect(page.locator("#upload-text")).to_have_text("100%")
    expect(page.locator("#job-status")).to_contain_text("Processing")
    seen = set()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and page.locator("#result").is_hidden():
        value = page.locator("#engine-bar").evaluate("bar => bar.hasAttribute('value') ? bar.value : null")
        if value and 0 < value < 100 and not seen:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "web-progress.png"), full_page=True)
        if value:
            seen.add(value)
        time.sleep(0.1)
    assert any(0 < v < 100 for v in seen), seen  # live engine progress, not just 0 and done
    expect(page.locator("#result")).to_be_visible()
    expect(page.locator("#job-status")).to_have_text("Completed.")

    size = 44 + 2 * round(11.0 * 16000)  # the engine reads intake's 16 kHz mono WAV of jfk.flac (11.0 s)
    rows = page.locator("#transcript li")
    expect(rows).to_have_count(2)
    assert [t for t in rows.nth(0).inner_text().split("\n") if t] == ["0:00.0 – 0:02.5", f"Fake transcript of {size} bytes."]
    assert "Second segment." in rows.nth(1).inner_text()
    expect(page.locator("#result-meta")).to_contain_text("language en")
    expect(page.locator("#warnings li")).to_have_count(1)  # the fake server cannot align

    ARTIFACTS.mkdir(exist_ok=True)
    canonical = json.loads(download(page, "json"))
    for fmt in ("srt", "vtt", "txt", "tsv", "aud"):
        assert download(page, fmt) == render(canonical, fmt), fmt
    assert download(page, "srt").startswith("1\n00:00:00,000 --> 00:00:02,500\nFake transcript of")
    page.screenshot(path=str(ARTIFACTS / "web-page.png"), full_page=True)

    # The result was fetched once, and only once: the job's files are gone.
    assert server.files_gone()
    (row,) = server.rows("SELECT delivered_at FROM jobs")
    assert row["delivered_at"]
    events = [r["event"] for r in server.rows("SELECT event FROM job_events WHERE event='delivered'")]
    assert events == ["delivered"]
    assert page.errors == []


def test_copy_puts_the_format_on_the_clipboard(make_server, browser, open_page):
    server = make_server()
    page = open_page(server)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url(""))
    start_job(page, server.default_audio)
    expect(page.locator("#result")).to_be_visible()
    page.get_by_role("button", name="Copy as vtt").click()
    assert page.evaluate("navigator.clipboard.readText()").startswith("WEBVTT\n\n00:00.000 --> 00:02.500\n")


def test_cancel_a_queued_and_a_processing_job(make_server, open_page):
    server = make_server(FAKE_WHISPERX_SLOW_SECONDS="30")
    blocker = server.submit_ok(diarize="false", prompt="fake:slow")
    page = open_page(server)
    start_job(page, server.default_audio)
    expect(page.locator("#job-status")).to_contain_text("Queued: position 1")
    page.click("#cancel")
    expect(page.locator("#job-status")).to_have_text("Canceled.")
    expect(page.locator("#messages")).to_have_text("Job canceled successfully")
    server.api("DELETE", f"/transcription/{blocker}")

    start_job(page, server.default_audio, prompt="fake:slow")
    expect(page.locator("#job-status")).to_contain_text("Processing")
    page.click("#cancel")
    expect(page.locator("#job-status")).to_have_text("Canceled.")
    statuses = [r["status"] for r in server.rows("SELECT status FROM jobs ORDER BY seq")]
    assert statuses == ["Canceled", "Canceled", "Canceled"]
    expect(page.locator("#start")).to_be_enabled()


def test_every_error_is_shown_in_words(make_server, open_page):
    server = make_server(MAX_FILE_SIZE="100000")
    page = open_page(server)
    page.click("#start")
    expect(page.locator("#messages")).to_contain_text("Choose an audio file first")

    start_job(page, JFK)
    expect(page.locator("#messages")).to_contain_text("The file is too large (HTTP 413): ")
    expect(page.locator("#job-status")).to_have_text("Upload refused.")

    page.fill("#prompt", "fake:fail")
    page.set_input_files("#file", str(server.default_audio))
    page.click("#start")
    expect(page.locator("#messages")).to_contain_text("The transcription failed:")

    page.fill("#prompt", "x" * 4000)
    page.evaluate("document.getElementById('prompt').removeAttribute('maxlength')")
    page.fill("#prompt", "x" * 4001)
    page.click("#start")
    expect(page.locator("#messages")).to_contain_text("The server refused the request (HTTP 400): 'prompt' is longer")

    page.fill("#token", "not a valid token!")
    page.click("#token-save")
    expect(page.locator("#messages")).to_contain_text("The server refused the token (HTTP 401)")

    server.stop()
    page.fill("#prompt", "")
    page.click("#start")
    expect(page.locator("#messages")).to_contain_text("The upload did not reach the server")
    assert page.errors == []


def test_without_a_token_the_page_says_what_to_do(make_server, open_page):
    server = make_server()
    page = open_page(server, token=None)
    expect(page.locator("#token-state")).to_contain_text("This server needs a token")
    expect(page.locator("#messages")).to_be_empty()
    page.fill("#token", TOKEN)
    page.keyboard.press("Enter")
    expect(page.locator("#token-state")).to_contain_text("Token accepted")
    assert page.evaluate("sessionStorage.getItem('whisperd.token')") == TOKEN
    assert page.evaluate("localStorage.length") == 0 and page.context.cookies() == []


def test_keyboard_only_and_a_phone_width_screen(make_server, open_page):
    server = make_server()
    page = open_page(server, width=360, height=740)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 360, f"the page scrolls sideways on a phone: {width} px"
    page.locator("#token").focus()
    order = []
    for _ in range(12):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id"))
    for control in ("token-save", "token-forget", "file", "language", "model", "response_format", "diarize",
                    "prompt", "start"):
        assert control in order, order
    assert order.index("file") < order.index("language") < order.index("start")
    # Choose the file as a keyboard user would get it (the chooser itself is the OS's), then Enter.
    page.set_input_files("#file", str(server.default_audio))
    page.locator("#prompt").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#result")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    page.screenshot(path=str(ARTIFACTS / "web-phone.png"), full_page=True)


FORMAT_CASES = [
    {"segments": [{"text": " And so my fellow Americans.", "start": 0.301, "end": 10.983}], "language": "en"},
    {"segments": [], "language": "en"},
    {"segments": [{"text": " a --> b\tc ", "start": 0.0015, "end": 3599.9995, "speaker": "SPEAKER_01"},
                  {"text": "  second", "start": 3723.4567, "end": 36000.25},
                  {"text": "tiny", "start": 5e-05, "end": 12.0, "speaker": None}], "language": "en"},
    {"segments": [
        {"text": " Hello there.", "start": 0.5, "end": 1.5, "speaker": "SPEAKER_00",
         "words": [{"word": "Hello", "start": 0.5, "end": 0.9}, {"word": "there.", "start": 1.0, "end": 1.5}]},
        {"text": " General 42.", "start": 2.0, "end": 3.0,
         "words": [{"word": "General", "start": 2.0, "end": 2.5}, {"word": "42."}]},
        {"text": " 42", "start": 4.0, "end": 4.5, "words": [{"word": "42"}]},
    ], "language": "en"},
    {"segments": [{"text": "こんにちは世界", "start": 0.0, "end": 1.0,
                   "words": [{"word": "こんにちは", "start": 0.0, "end": 0.5}, {"word": "世界", "start": 0.5, "end": 1.0}]}],
     "language": "ja"},
]


def test_the_pages_formats_match_the_servers_byte_for_byte(make_server, open_page):
    server = make_server()
    page = open_page(server, token=None)
    for case in FORMAT_CASES:
        text = json.dumps(case, ensure_ascii=False)
        got = page.evaluate(
            "async ([text, formats]) => { const m = await import('/static/formats.js');"
            " return formats.map((f) => m.render(JSON.parse(text), f, text)); }",
            [text, ["txt", "srt", "vtt", "tsv", "json", "aud"]],
        )
        want = [render(case, fmt) for fmt in ("txt", "srt", "vtt", "tsv", "json", "aud")]
        assert got == want, case


@pytest.mark.engine
def test_jfk_through_the_page_on_the_real_engine(make_server, open_page):
    assert (REPO / "models" / "tiny.en" / "model.bin").is_file(), "run scripts/setup-engine.sh first"
    server = make_server(WHISPER_CMD=str(REPO / "whisperx.sh"), WHISPER_MODELS_DIR=str(REPO / "models"),
                         WHISPER_DEVICE="cpu", WHISPER_OFFLINE="true", RUST_LOG="info")
    page = open_page(server)
    start_job(page, JFK, fmt="srt")
    expect(page.locator("#job-status")).to_contain_text("Processing", timeout=60_000)
    expect(page.locator("#result")).to_be_visible(timeout=240_000)
    transcript = " ".join(page.locator("#transcript li p").all_inner_texts()).lower()
    assert "ask not what your country can do for you" in transcript.replace(",", "")
    expect(page.locator("#result-meta")).to_contain_text("language en")
    ARTIFACTS.mkdir(exist_ok=True)
    canonical = json.loads(download(page, "json"))
    srt = download(page, "srt")
    assert srt == render(canonical, "srt") and srt.startswith("1\n00:00:0")
    page.screenshot(path=str(ARTIFACTS / "web-page-real-engine.png"), full_page=True)
    assert server.files_gone() and page.errors == []


def test_speakers_are_shown_beside_their_words(make_server, open_page):
    # The fake server cannot diarize offline, so the result the page fetches is swapped for a
    # diarized one on its way in (the page still fetches it, once).
    server = make_server()
    page = open_page(server)
    diarized = {"segments": [
        {"start": 0.5, "end": 2.25, "text": " Hello there.", "speaker": "SPEAKER_00"},
        {"start": 2.5, "end": 61.0, "text": " General Kenobi.", "speaker": "SPEAKER_01"},
    ], "language": "en"}
    text = json.dumps(diarized, ensure_ascii=False)
    body = json.dumps({"text": text, "language": "en", "segments": diarized["segments"]})
    page.route("**/result?response_format=json", lambda route: route.fulfill(
        status=200, content_type="application/json", body=body))
    start_job(page, server.default_audio)
    rows = page.locator("#transcript li")
    expect(rows).to_have_count(2)
    expect(rows.nth(0).locator(".speaker")).to_have_text("SPEAKER_00")
    expect(rows.nth(1).locator(".speaker")).to_have_attribute("data-speaker", "1")  # a colour of its own
    expect(page.locator("#result-meta")).to_contain_text("2 speaker(s): SPEAKER_00, SPEAKER_01")
    expect(rows.nth(1)).to_contain_text("0:02.5 – 1:01.0")
    expect(rows.nth(1)).to_contain_text("SPEAKER_01General Kenobi.")
    assert download(page, "txt") == "[SPEAKER_00]: Hello there.\n[SPEAKER_01]: General Kenobi.\n"
    assert download(page, "srt") == render(diarized, "srt")


def test_real_tokens_own_their_jobs_and_a_revoked_token_is_refused(make_server, open_page):
    server = make_server(WHISPER_API_ALLOW_ANY_TOKEN="false")
    alice = server.create_token("alice")
    page = open_page(server, token=alice)
    start_job(page, server.default_audio)
    expect(page.locator("#result")).to_be_visible()
    (row,) = server.rows("SELECT owner FROM jobs")
    assert row["owner"] == "alice"
    assert server.cli("token", "revoke", "alice").returncode == 0
    server.pass_time(RECHECK_SECONDS)  # a revocation takes effect within RECHECK_SECONDS (tokens.py)
    page.click("#token-save")
    expect(page.locator("#messages")).to_contain_text("The server refused the token (HTTP 401): ")
    assert page.errors == []


def test_the_page_offers_translation_and_only_the_chosen_models_languages(make_server, open_page):
    # The warm engine: it detects the language of speech it translates (the CLI is told it).
    server = make_server(start=False, FAKE_WHISPERX_DETECT="es", WHISPER_ENGINE="worker")
    base = server.root / "models" / "base"
    base.mkdir(parents=True)
    (base / "model.bin").write_bytes(b"fake")
    # A multilingual vocabulary (51865 tokens) that knows three languages.
    specials = ["<|startoftranscript|>", "<|en|>", "<|es|>", "<|de|>", "<|translate|>"]
    (base / "vocabulary.txt").write_text("\n".join([f"t{i}" for i in range(51865 - len(specials))] + specials) + "\n")
    server.start()
    page = open_page(server, token=None)
    page.fill("#token", TOKEN)
    page.click("#token-save")
    expect(page.locator("#model option")).to_have_count(2)
    # tiny.en (the default) is English-only: English alone, and no translation.
    assert page.locator("#language option").all_inner_texts() == ["en"]
    assert page.locator('#task option[value="translate"]').is_disabled()
    page.select_option("#model", "base")
    assert page.locator("#language option").all_inner_texts() == ["auto (detect)", "de", "en", "es"]
    assert page.locator("#language").input_value() == "en"  # the choice survives when the model knows it
    page.select_option("#language", "auto")
    page.select_option("#task", "translate")
    start_job(page, server.default_audio)
    expect(page.locator("#result")).to_be_visible()
    expect(page.locator("#transcript li").nth(0)).to_contain_text("Fake translation of")
    expect(page.locator("#result-meta")).to_contain_text("language es")
    (row,) = server.rows("SELECT model, language, task FROM jobs")
    assert (row["model"], row["language"], row["task"]) == ("base", "auto", "translate")
    # Back to the English-only model: translation is taken away again.
    page.select_option("#model", "tiny.en")
    assert page.locator("#task").input_value() == "transcribe"
    assert page.locator("#language option").all_inner_texts() == ["en"]
    assert page.errors == []


def test_your_jobs_lists_live_fetches_a_result_and_cancels(make_server, open_page, tmp_path):
    server = make_server(WHISPER_API_ALLOW_ANY_TOKEN="false", FAKE_WHISPERX_SLOW_SECONDS="60")
    alice, bob = server.create_token("alice"), server.create_token("bob")
    done = server.submit_ok(make_wav(tmp_path / "first.wav"), token=alice)
    server.wait_status(done, token=alice)
    running = server.submit_ok(make_wav(tmp_path / "second.wav"), token=alice, prompt="fake:slow")
    server.wait_status(running, ("Processing",), token=alice)
    queued = server.submit_ok(make_wav(tmp_path / "third.wav"), token=alice)
    server.submit_ok(make_wav(tmp_path / "bobs.wav"), token=bob)

    page = open_page(server, token=alice)
    rows = page.locator("#jobs-body tr")
    expect(rows).to_have_count(3)  # Alice's three, not Bob's
    expect(rows.nth(0)).to_contain_text("third.wav")
    expect(rows.nth(0)).to_contain_text("Queued")
    expect(rows.nth(1)).to_contain_text("second.wav")
    expect(rows.nth(1)).to_contain_text("Processing")
    expect(rows.nth(2)).to_contain_text("first.wav")
    expect(rows.nth(2)).to_contain_text("Completed")
    expect(page.locator("#jobs-body")).not_to_contain_text("bobs.wav")

    # A finished job's result, fetched from the list: shown below, and the list says it is fetched.
    page.get_by_role("button", name="Get the result of first.wav").click()
    expect(page.locator("#result")).to_be_visible()
    expect(page.locator("#transcript li")).to_have_count(2)
    expect(rows.nth(2)).to_contain_text("(result fetched)")
    assert server.rows("SELECT delivered_at FROM jobs WHERE id=?", (done,))[0][0]

    # Cancel from the list.
    page.get_by_role("button", name="Cancel third.wav").click()
    expect(page.locator("#messages")).to_have_text("Job canceled successfully")
    expect(rows.nth(0)).to_contain_text("Canceled")
    assert server.rows("SELECT status FROM jobs WHERE id=?", (queued,))[0][0] == "Canceled"

    # Live: a job sent from elsewhere shows up without a reload.
    server.submit_ok(make_wav(tmp_path / "fourth.wav"), token=alice)
    expect(rows).to_have_count(4, timeout=10_000)
    expect(rows.nth(0)).to_contain_text("fourth.wav")
    page.get_by_role("button", name="Cancel second.wav").click()
    expect(rows.nth(2)).to_contain_text("Canceled", timeout=15_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-your-jobs.png"), full_page=True)
    assert page.errors == []
