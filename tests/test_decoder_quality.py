"""The warm decoder's resampling is good enough for the engine: jfk.flac made a 44.1 kHz stereo mp3
is heard by the real WhisperX exactly as when ffmpeg (libswresample's default filter) decodes it.

decoder_worker.py resamples with a shorter filter than libswresample's default (RESAMPLE_OPTIONS,
for speed); this is the check, through HTTP and the warm engine, that the engine loses nothing.
"""

from __future__ import annotations

import subprocess

import pytest

from conftest import JFK, JFK_TEXT, REPO, words


@pytest.mark.engine
def test_jfk_as_a_44k_stereo_mp3_is_heard_as_ffmpeg_decodes_it(make_server, tmp_path):
    assert JFK.is_file(), f"the shared fixture {JFK} is missing"
    mp3 = tmp_path / "jfk.mp3"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(JFK), "-ar", "44100", "-ac", "2",
                    "-b:a", "128k", str(mp3)], check=True)
    texts = {}
    for decoder in ("pyav", "ffmpeg"):
        server = make_server(WHISPER_ENGINE="worker", WHISPER_DECODER=decoder, WHISPER_CMD=str(REPO / "whisperx.sh"),
                             WHISPER_MODELS_DIR=str(REPO / "models"), SYNC_REQUEST_TIMEOUT_SECONDS="300",
                             WHISPER_DEFAULT_DIARIZE="false", RUST_LOG="debug")
        response = server.submit(mp3, sync="true", diarize="false", language="en", response_format="tsv",
                                 timeout=300)
        assert response.status_code == 200, response.text
        texts[decoder] = response.json()["text"].strip()
        # Each decoded it as named: the warm decoder, or ffprobe and ffmpeg.
        found = "the decoder found mp3" if decoder == "pyav" else "ffprobe found mp3"
        assert found in server.log(), server.log()
        server.stop()
    # Punctuation included (the mp3 encoder alone turns the FLAC's "you. Ask" into "you, ask").
    assert texts["pyav"] == texts["ffmpeg"], texts
    spoken = " ".join(line.split("\t")[2] for line in texts["pyav"].splitlines()[1:])  # tsv: start, end, text
    assert words(spoken) == words(JFK_TEXT), texts
