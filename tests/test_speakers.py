"""whisperd.speakers and the OpenAI shapes of a diarized result (unit tests: no server)."""

from __future__ import annotations

import pytest

from whisperd.errors import Kind, ServiceError
from whisperd.handlers.openai import verbose_json
from whisperd.speakers import decode_data_url, diarized_json, letters, parse_speaker_counts

RESULT = {"language": "en", "speakers": ["SPEAKER_00", "Ada", "SPEAKER_01"], "segments": [
    {"start": 0.0, "end": 1.0, "text": " Hello.", "speaker": "SPEAKER_00",
     "words": [{"word": "Hello.", "start": 0.1, "end": 0.9, "speaker": "SPEAKER_00"}]},
    {"start": 1.2, "end": 2.0, "text": " Hi there.", "speaker": "Ada",
     "words": [{"word": "Hi", "start": 1.2, "end": 1.5, "speaker": "Ada"},
               {"word": "there.", "start": 1.5, "end": 2.0, "speaker": "Ada"}]},
    {"start": 2.5, "end": 3.0, "text": " Bye.", "speaker": "SPEAKER_01"},
    {"start": 3.5, "end": 4.0, "text": " Again.", "speaker": "SPEAKER_00"},
]}


def test_diarized_json_is_gpt_4o_transcribe_diarizes_shape():
    body = diarized_json(RESULT, 4.25)
    assert body["task"] == "transcribe" and body["duration"] == 4.25
    assert body["usage"] == {"type": "duration", "seconds": 4.25}
    assert body["text"] == "Hello. Hi there. Bye. Again."
    assert [(s["id"], s["speaker"], s["text"]) for s in body["segments"]] == [
        ("seg_0", "A", "Hello."), ("seg_1", "Ada", "Hi there."), ("seg_2", "B", "Bye."), ("seg_3", "A", "Again.")]
    assert {s["type"] for s in body["segments"]} == {"transcript.text.segment"}


def test_verbose_json_carries_speakers_on_segments_and_words():
    body = verbose_json(RESULT, "Hello. Hi there. Bye. Again.", {"segment", "word"}, [])
    assert body["speakers"] == ["SPEAKER_00", "Ada", "SPEAKER_01"]
    assert [s["speaker"] for s in body["segments"]] == ["SPEAKER_00", "Ada", "SPEAKER_01", "SPEAKER_00"]
    assert [(w["word"], w["speaker"]) for w in body["words"]] == [
        ("Hello.", "SPEAKER_00"), ("Hi", "Ada"), ("there.", "Ada")]


def test_letters_go_on_past_z():
    assert letters(3) == ["A", "B", "C"] and letters(28)[-2:] == ["AA", "AB"]


@pytest.mark.parametrize("fields,wanted", [
    ({}, {}),
    ({"num_speakers": "3"}, {"num_speakers": 3}),
    ({"min_speakers": "2", "max_speakers": "4", "num_speakers": "3"}, {"min_speakers": 2, "max_speakers": 4,
                                                                       "num_speakers": 3}),
])
def test_speaker_counts(fields, wanted):
    assert parse_speaker_counts(fields) == wanted


@pytest.mark.parametrize("fields", [{"num_speakers": "16"}, {"num_speakers": "٣"}, {"min_speakers": "-1"},
                                    {"num_speakers": "5", "max_speakers": "4"}])
def test_bad_speaker_counts(fields):
    with pytest.raises(ServiceError) as caught:
        parse_speaker_counts(fields)
    assert caught.value.kind is Kind.INVALID


def test_data_urls():
    assert decode_data_url("data:audio/wav;base64,QUJD", "f") == b"ABC"
    assert decode_data_url("data:audio/ogg;codecs=opus;base64,QUJD", "f") == b"ABC"
    for bad in ("QUJD", "data:audio/wav,ABC", "data:audio/wav;base64,!!!", "data:audio/wav;base64,"):
        with pytest.raises(ServiceError):
            decode_data_url(bad, "f")
