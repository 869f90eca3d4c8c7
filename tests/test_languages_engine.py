"""Many languages on the real engine: Whisper base (scripts/setup-models.sh) on espeak-ng speech made
here, in Spanish, German and Italian: detection, transcription (word error rate within a
tolerance), translation to English (keywords), through the warm worker, the CLI and the OpenAI
translations route with the official client.

Robot speech is hard for a small model; the tolerances are what base achieves on these sentences
with a margin (measured through the warm worker: es 0.00, de 0.17, it 0.31). French is left out: base hears espeak's
French as Spanish.
"""

from __future__ import annotations

import shutil
import subprocess
import unicodedata

import jiwer
import openai
import pytest

from conftest import REPO, TOKEN

pytestmark = pytest.mark.engine

# language -> (espeak voice, sentence, max WER, English keywords of its translation)
SPEECH = {
    "es": ("es", "Buenos días. Hoy hace muy buen tiempo y vamos a ir al parque.", 0.2, {"morning", "park"}),
    "de": ("de", "Guten Abend. Ich wohne in Berlin und arbeite in einem großen Büro.", 0.3, {"berlin", "big"}),
    "it": ("it", "Buongiorno. Oggi andiamo al mare con i nostri amici e mangiamo una pizza.", 0.45, {"sea", "friends"}),
}


def normalise(text: str) -> str:
    """Lower case, accents kept, punctuation gone: 'Büro.' and 'büro' are one word."""
    text = unicodedata.normalize("NFC", text.lower())
    return " ".join("".join(ch if ch.isalnum() or ch == "'" else " " for ch in text).split())


def wer(reference: str, hypothesis: str) -> float:
    return jiwer.wer(normalise(reference), normalise(hypothesis))


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    espeak = shutil.which("espeak-ng")
    assert espeak, "espeak-ng is not installed (scripts/setup.sh installs it)"
    root = tmp_path_factory.mktemp("speech")
    clips = {}
    for language, (voice, sentence, _, _) in SPEECH.items():
        clips[language] = root / f"{language}.wav"
        subprocess.run([espeak, "-v", voice, "-s", "115" if language == "it" else "130", "-w", str(clips[language]),
                        sentence], check=True, timeout=60)
    return clips


def real_env(engine: str) -> dict[str, str]:
    assert (REPO / "models" / "base" / "model.bin").is_file(), "models/base missing: run scripts/setup-models.sh"
    return dict(WHISPER_ENGINE=engine, WHISPER_CMD=str(REPO / "whisperx.sh"), WHISPER_MODELS_DIR=str(REPO / "models"),
                WHISPER_DEFAULT_MODEL="base", WHISPER_OPENAI_TRANSLATE_MODEL="base", WHISPER_DEVICE="cpu",
                WHISPER_OFFLINE="true", SYNC_REQUEST_TIMEOUT_SECONDS="300", RUST_LOG="info")


@pytest.fixture(scope="module")
def warm_server(tmp_path_factory):
    from conftest import Server

    server = Server(tmp_path_factory.mktemp("warm"), real_env("worker")).start()
    yield server
    server.stop()


def run(server, audio, **fields) -> tuple[dict, dict]:
    job_id = server.submit_ok(audio, model="base", diarize="false", response_format="json", **fields)
    status = server.wait_status(job_id, timeout=240)
    assert status["status"] == "Completed", status
    result = server.api("GET", f"/transcription/{job_id}/result").json()
    return status, result


def keywords(text: str) -> set[str]:
    return set(normalise(text).split())


@pytest.mark.parametrize("language", list(SPEECH))
def test_detects_and_transcribes_each_language(warm_server, speech, language):
    status, result = run(warm_server, speech[language], language="auto")
    assert status["detected_language"] == language and result["language"] == language
    _, sentence, tolerance, _ = SPEECH[language]
    segments_text = "".join(s["text"] for s in result["segments"])
    measured = wer(sentence, segments_text)
    print(f"{language}: WER {measured:.2f}: {segments_text!r}")
    assert measured <= tolerance, segments_text


def test_translates_german_to_english_on_the_warm_worker(warm_server, speech):
    status, result = run(warm_server, speech["de"], language="auto", task="translate")
    assert status["task"] == "translate" and status["detected_language"] == "de"
    text = "".join(s["text"] for s in result["segments"])
    print(f"de -> en: {text!r}")
    assert SPEECH["de"][3] <= keywords(text), text
    assert not {"guten", "abend", "ich"} & keywords(text), text  # English, not the German


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # OpenAI's client marks the route so
def test_openai_translations_route_on_real_italian_speech(warm_server, speech):
    client = openai.OpenAI(api_key=TOKEN, base_url=warm_server.url("/v1"), max_retries=0, timeout=300)
    with speech["it"].open("rb") as audio:
        verbose = client.audio.translations.create(model="whisper-1", file=audio, response_format="verbose_json")
    assert verbose.task == "translate" and verbose.language == "english"
    assert SPEECH["it"][3] <= keywords(verbose.text), verbose.text
    models = {m.id: m.model_extra for m in client.models.list().data}
    assert models["base"]["multilingual"] is True and models["base"]["loaded"] is True
    assert models["base"]["size_bytes"] > 145_000_000 and len(models["base"]["languages"]) == 99
    assert models["tiny.en"]["multilingual"] is False


def test_translates_spanish_through_the_cli_engine(make_server, speech):
    # WhisperX's CLI translates only when told the language (without --language it drops --task and
    # transcribes: measured); the server therefore refuses auto+translate on this engine.
    server = make_server(**real_env("cli"))
    status, result = run(server, speech["es"], language="es", task="translate")
    assert status["detected_language"] == "es" and result["language"] == "es"
    text = "".join(s["text"] for s in result["segments"])
    assert SPEECH["es"][3] <= keywords(text), text
