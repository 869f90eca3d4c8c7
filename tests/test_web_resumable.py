"""The page sends large files resumably (tus, /uploads) and resumes by itself after a network error."""

from __future__ import annotations

import wave

from playwright.sync_api import expect

from test_web import browser, open_page, start_job  # noqa: F401 (the page fixtures)


def big_wav(path, seconds: int = 300):
    """9.6 MB of 16 kHz mono silence: above the page's 8 MiB threshold, so two PATCHes."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(b"\0" * (seconds * 16000 * 2))
    return path


def test_a_large_file_goes_up_resumably_and_survives_a_dropped_patch(make_server, open_page):
    server = make_server()
    audio = big_wav(server.root / "meeting.wav")
    page = open_page(server)
    patches = []

    def flaky(route, request):
        if request.method == "PATCH":
            patches.append(request.headers.get("upload-offset"))
            if len(patches) == 2:  # the second chunk's connection drops
                route.abort("connectionreset")
                return
        route.continue_()

    page.route("**/uploads/*", flaky)
    start_job(page, audio)
    expect(page.locator("#job-status")).to_contain_text("resuming", timeout=20_000)
    expect(page.locator("#result")).to_be_visible(timeout=60_000)
    expect(page.locator("#job-status")).to_have_text("Completed.")
    chunk = str(8 * 1024 * 1024)
    assert patches == ["0", chunk, chunk], patches  # the dropped chunk was sent again from HEAD's offset
    (upload,) = server.rows("SELECT upload_length, upload_offset, job_id, filename FROM uploads")
    (job,) = server.rows("SELECT id, upload_bytes, filename FROM jobs")
    size = audio.stat().st_size
    assert (upload["upload_length"], upload["upload_offset"], upload["job_id"]) == (size, size, job["id"])
    assert (job["upload_bytes"], job["filename"]) == (size, "meeting.wav")
    assert "HEAD /uploads/" in server.log()
    assert server.job_files() == []  # delivered: nothing left, the upload's bytes included
    assert page.evaluate("Object.keys(localStorage).filter(k => k.startsWith('whisperd.upload.')).length") == 0
    assert page.errors == []
