"""Languages and tasks with the fake engine: the task and language reach both engines, what a model
can do is read from its files, and a model asked for what it cannot do is a 400 that says why."""

from __future__ import annotations

import time

import openai
import pytest

from conftest import TOKEN

# Whisper's vocabularies: English-only checkpoints have 51864 tokens, multilingual ones 51865 (and
# large-v3 51866, with <|yue|>); a model's languages are its <|xx|> tokens.
LANGUAGES = ("en", "de", "es", "it")


def add_model(server, name: str, vocabulary: int | None = None, languages=LANGUAGES) -> None:
    """A fake model directory; with `vocabulary`, a vocabulary.txt of that many tokens."""
    directory = server.root / "models" / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.bin").write_bytes(b"fake weights")
    if vocabulary is not None:
        specials = ["<|endoftext|>", "<|startoftranscript|>", *(f"<|{code}|>" for code in languages), "<|translate|>"]
        tokens = [f"tok{i}" for i in range(vocabulary - len(specials))] + specials
        (directory / "vocabulary.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")


@pytest.fixture
def multi(make_server):
    def start(**env):
        server = make_server(start=False, FAKE_WHISPERX_DETECT="es", **env)
        add_model(server, "base", vocabulary=51865)
        return server.start()

    return start


def argv_of(server, index: int = -1) -> list[str]:
    return server.engine_runs()[index]["argv"]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(api_key=TOKEN, base_url=server.url("/v1"), max_retries=0, timeout=30)


# -- the task and the detected language through the CLI engine -------------------------------------


def test_translate_reaches_the_cli_and_the_status_and_result_say_the_language(multi):
    server = multi()
    job_id = server.submit_ok(model="base", language="de", task="translate", diarize="false",
                              response_format="json")
    status = server.wait_status(job_id)
    assert status["status"] == "Completed"
    assert status["task"] == "translate" and status["detected_language"] == "de"
    argv = argv_of(server)
    assert argv[argv.index("--task") + 1] == "translate"
    assert argv[argv.index("--language") + 1] == "de" and "--no_align" in argv
    # No "alignment skipped" warning: a translation is never aligned, there is nothing to skip.
    assert "warnings" not in status
    result = server.api("GET", f"/transcription/{job_id}/result").json()
    assert result["language"] == "de" and "Fake translation of" in result["text"]
    (row,) = server.rows("SELECT task, language, detected_language FROM jobs")
    assert (row["task"], row["language"], row["detected_language"]) == ("translate", "de", "de")


def test_detection_reaches_the_cli_and_translating_unknown_speech_there_is_refused(multi):
    server = multi()
    job_id = server.submit_ok(model="base", language="auto", diarize="false")
    assert server.wait_status(job_id)["detected_language"] == "es"
    assert "--language" not in argv_of(server)
    assert server.api("GET", f"/transcription/{job_id}/result").json()["language"] == "es"
    # WhisperX's CLI drops --task without --language: it would transcribe, so it is not asked to.
    response = server.submit(model="base", language="auto", task="translate")
    assert_refused(response, "WHISPER_ENGINE=worker", "send 'language'")
    assert len(server.engine_runs()) == 1


def test_a_transcription_with_a_language_on_a_multilingual_model(multi):
    server = multi()
    job_id = server.submit_ok(model="base", language="de", diarize="false")
    status = server.wait_status(job_id)
    assert status["detected_language"] == "de" and "task" not in status  # the spec's shape for plain jobs
    argv = argv_of(server)
    assert argv[argv.index("--language") + 1] == "de" and "--task" not in argv
    assert server.rows("SELECT task FROM jobs")[0]["task"] == "transcribe"


def test_task_and_language_reach_the_warm_worker(multi):
    server = multi(WHISPER_ENGINE="worker", WHISPER_KILL_GRACE_SECONDS="0.5")
    first = server.submit_ok(model="base", language="auto", task="translate", diarize="false")
    assert server.wait_status(first)["detected_language"] == "es"
    second = server.submit_ok(model="base", language="it", diarize="false")
    assert server.wait_status(second)["detected_language"] == "it"
    jobs = [run["worker_job"] for run in server.engine_runs() if "worker_job" in run]
    assert [(j["task"], j["language"], j["align"]) for j in jobs] == [("translate", None, False),
                                                                       ("transcribe", "it", False)]
    result = server.api("GET", f"/transcription/{first}/result").json()
    assert result["language"] == "es" and "Fake translation of" in result["text"]


# -- refusals -----------------------------------------------------------------------------------


def assert_refused(response, *fragments: str) -> None:
    assert response.status_code == 400, response.text
    message = response.json()["error"]
    for fragment in fragments:
        assert fragment in message, message


def test_an_english_only_model_refuses_translation_and_other_languages(multi):
    server = multi()
    assert_refused(server.submit(model="tiny.en", task="translate"), "tiny.en", "English-only", "cannot translate")
    assert_refused(server.submit(model="tiny.en", language="de"), "tiny.en", "'de'", "English-only")
    assert_refused(server.submit(model="base", task="summarize"), "'task'", "transcribe, translate")
    # Nothing was queued, nothing left on disk.
    assert server.rows("SELECT id FROM jobs") == [] and server.job_files() == []
    # English, or detection (which an English-only model answers with English), is fine.
    for language in ("en", "auto"):
        job_id = server.submit_ok(model="tiny.en", language=language, diarize="false")
        assert server.wait_status(job_id)["status"] == "Completed"


def test_what_a_model_can_do_is_read_from_its_files_not_its_name(multi):
    server = multi()
    add_model(server, "my-english", vocabulary=51864)  # no ".en" in the name, English-only vocabulary
    add_model(server, "large-v3", vocabulary=51866, languages=LANGUAGES + ("yue",))
    assert_refused(server.submit(model="my-english", task="translate"), "my-english", "English-only")
    # Nothing to detect with an English-only model: the engine is told English.
    job_id = server.submit_ok(model="my-english", language="auto", diarize="false")
    assert server.wait_status(job_id)["detected_language"] == "en"
    argv = argv_of(server)
    assert argv[argv.index("--language") + 1] == "en"
    assert_refused(server.submit(model="base", language="yue"), "base", "'yue'")
    job_id = server.submit_ok(model="large-v3", language="yue", diarize="false")
    assert server.wait_status(job_id)["status"] == "Completed"


# -- what each model is, for clients and the page ----------------------------------------------------


def test_models_say_multilingual_languages_size_and_loaded(multi):
    server = multi(WHISPER_ENGINE="worker", WHISPER_KILL_GRACE_SECONDS="0.5")  # preloads tiny.en
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        page = server.api("GET", "/models").json()
        if any(m["loaded"] for m in page["model_info"]):
            break
        time.sleep(0.1)
    info = {m["name"]: m for m in page["model_info"]}
    assert set(info) == {"base", "tiny.en"}
    assert info["base"]["multilingual"] is True and info["base"]["tasks"] == ["transcribe", "translate"]
    assert info["base"]["languages"] == sorted(LANGUAGES)
    assert info["base"]["size_bytes"] == (server.root / "models" / "base" / "model.bin").stat().st_size + \
        (server.root / "models" / "base" / "vocabulary.txt").stat().st_size
    # The harness's tiny.en has no vocabulary: an English-only name is all there is to go by.
    assert info["tiny.en"] == {"name": "tiny.en", "multilingual": False, "languages": ["en"], "tasks": ["transcribe"],
                               "size_bytes": 4, "loaded": True}
    assert info["base"]["loaded"] is False
    assert page["tasks"] == ["transcribe", "translate"] and page["defaults"]["task"] == "transcribe"

    listed = {m.id: m for m in client(server).models.list().data}
    assert list(listed) == ["whisper-1", "base", "tiny.en"]
    assert listed["base"].model_extra["multilingual"] is True
    assert listed["tiny.en"].model_extra["loaded"] is True and listed["tiny.en"].model_extra["size_bytes"] == 4
    assert listed["whisper-1"].model_extra["translations_model"] == "tiny.en"


# -- POST /v1/audio/translations with the official client -------------------------------------------


# OpenAI marks its translations endpoint deprecated in the client; it is still the API clients call.
openai_translations = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")


def translate(server, **kwargs):
    with server.default_audio.open("rb") as audio:
        return client(server).audio.translations.create(file=audio, **kwargs)


WORKER = dict(WHISPER_ENGINE="worker", WHISPER_KILL_GRACE_SECONDS="0.5")


@openai_translations
def test_openai_translations_run_the_translate_task_and_answer_every_format(multi):
    server = multi(WHISPER_OPENAI_TRANSLATE_MODEL="base", **WORKER)
    size = server.default_audio.stat().st_size
    assert translate(server, model="whisper-1").text == f"Fake translation of {size} bytes. Second segment."
    assert translate(server, model="base", response_format="text").startswith("Fake translation of")
    assert translate(server, model="base", response_format="srt").startswith("1\n00:00:00,000 --> ")
    verbose = translate(server, model="base", response_format="verbose_json", prompt="Names: Ada")
    assert verbose.task == "translate" and verbose.language == "english" and verbose.duration == 4.0
    assert verbose.segments[0].text == f" Fake translation of {size} bytes."
    jobs = [run["worker_job"] for run in server.engine_runs() if "worker_job" in run]
    assert len(jobs) == 4 and all(j["task"] == "translate" and j["language"] is None for j in jobs)
    assert all(j["model"].endswith("/models/base") for j in jobs) and jobs[-1]["prompt"] == "Names: Ada"
    # A delivery is recorded just after the client has the last byte: wait for its files to go.
    assert server.files_gone()
    rows = server.rows("SELECT task, language, delivered_at FROM jobs")
    assert len(rows) == 4 and all(r["task"] == "translate" and r["language"] == "auto" and r["delivered_at"]
                                  for r in rows)


@openai_translations
def test_openai_translations_refuse_what_openai_does_not_take_and_english_only_models(multi):
    server = multi(**WORKER)  # whisper-1 runs tiny.en here for both routes
    with pytest.raises(openai.BadRequestError) as caught:
        translate(server, model="whisper-1")
    body = caught.value.body
    assert body["code"] == "model_cannot_translate" and body["param"] == "model"
    assert "tiny.en" in body["message"] and "WHISPER_OPENAI_TRANSLATE_MODEL" in body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        translate(server, model="base", temperature=3)
    assert caught.value.body["param"] == "temperature"
    files = [("file", ("a.wav", server.default_audio.read_bytes(), "audio/wav"))]
    for field in ("language", "timestamp_granularities[]"):
        response = server.api("POST", "/v1/audio/translations", files=files,
                              data={"model": "base", field: "de" if field == "language" else "word"})
        assert response.status_code == 400 and response.json()["error"]["param"] == field
    # The transcriptions route refuses a language its English-only model does not know.
    with pytest.raises(openai.BadRequestError) as caught:
        with server.default_audio.open("rb") as audio:
            client(server).audio.transcriptions.create(model="tiny.en", file=audio, language="de")
    assert caught.value.body["code"] == "model_cannot_transcribe" and "English-only" in caught.value.body["message"]
    assert server.rows("SELECT id FROM jobs") == []


@openai_translations
def test_openai_translations_on_the_cli_engine_are_refused_with_the_reason(multi):
    server = multi(WHISPER_OPENAI_TRANSLATE_MODEL="base")
    with pytest.raises(openai.BadRequestError) as caught:
        translate(server, model="whisper-1")
    assert caught.value.body["code"] == "translation_needs_worker_engine"
    assert "WHISPER_ENGINE=worker" in caught.value.body["message"]
    assert server.rows("SELECT id FROM jobs") == [] and server.engine_runs() == []
