"""Unit tests of whisperd.formats.render on hand-made WhisperX results."""

import json

import pytest

from whisperd.formats import CONTENT_TYPES, FORMATS, format_timestamp, render

JFK_TEXT = (
    " And so my fellow Americans ask not what your country can do for you,"
    " ask what you can do for your country."
)
JFK = {
    "segments": [{"text": JFK_TEXT, "start": 0.301, "end": 10.983, "avg_logprob": -0.1747}],
    "language": "en",
}


def one_segment(start, end, text=" Hi.", **extra):
    return {"segments": [dict({"text": text, "start": start, "end": end}, **extra)], "language": "en"}


def test_formats_and_content_types_cover_each_other():
    assert FORMATS == ("txt", "srt", "vtt", "tsv", "json", "aud")
    assert set(CONTENT_TYPES) == set(FORMATS)
    assert CONTENT_TYPES["srt"].startswith("application/x-subrip")
    assert CONTENT_TYPES["vtt"].startswith("text/vtt")
    assert CONTENT_TYPES["json"].startswith("application/json")
    assert all(value.endswith("; charset=utf-8") for value in CONTENT_TYPES.values())


def test_jfk_like_result_in_every_format():
    stripped = JFK_TEXT.strip()
    assert render(JFK, "txt") == stripped + "\n"
    assert render(JFK, "srt") == f"1\n00:00:00,301 --> 00:00:10,983\n{stripped}\n\n"
    assert render(JFK, "vtt") == f"WEBVTT\n\n00:00.301 --> 00:10.983\n{stripped}\n\n"
    assert render(JFK, "tsv") == f"start\tend\ttext\n301\t10983\t{stripped}\n"
    assert render(JFK, "aud") == f"0.301\t10.983\t{stripped}\n"
    assert render(JFK, "json") == (
        '{"segments": [{"text": "' + JFK_TEXT + '", "start": 0.301, "end": 10.983, '
        '"avg_logprob": -0.1747}], "language": "en"}'
    )


@pytest.mark.parametrize(
    "seconds, vtt, srt, tsv_ms",
    [
        (0, "00:00.000", "00:00:00,000", 0),
        (59.9996, "01:00.000", "00:01:00,000", 60000),
        # x * 1000 lands exactly on .5 here, and round() goes to the even neighbour.
        (0.0005, "00:00.000", "00:00:00,000", 0),
        (0.0015, "00:00.002", "00:00:00,002", 2),
        (0.0025, "00:00.002", "00:00:00,002", 2),
        (1.0005, "00:01.000", "00:00:01,000", 1000),
        # Rounding carries into the hour, which VTT then shows.
        (3599.9995, "01:00:00.000", "01:00:00,000", 3600000),
        (3723.4567, "01:02:03.457", "01:02:03,457", 3723457),
        (36000.25, "10:00:00.250", "10:00:00,250", 36000250),
    ],
)
def test_timestamp_rounding(seconds, vtt, srt, tsv_ms):
    result = one_segment(seconds, seconds)
    assert render(result, "vtt") == f"WEBVTT\n\n{vtt} --> {vtt}\nHi.\n\n"
    assert render(result, "srt") == f"1\n{srt} --> {srt}\nHi.\n\n"
    assert render(result, "tsv") == f"start\tend\ttext\n{tsv_ms}\t{tsv_ms}\tHi.\n"


def test_format_timestamp_rejects_negative_time():
    with pytest.raises(ValueError):
        format_timestamp(-0.001)
    with pytest.raises(ValueError):
        render(one_segment(-1.0, 1.0), "srt")


def test_aud_prints_seconds_as_python_does():
    result = {
        "segments": [
            {"text": " a", "start": 0.0, "end": 2.5},
            {"text": " b", "start": 12, "end": 3723.4567},
            {"text": " c", "start": 1e-05, "end": 100.10000000000001},
        ],
        "language": "en",
    }
    assert render(result, "aud") == "0.0\t2.5\ta\n12\t3723.4567\tb\n1e-05\t100.10000000000001\tc\n"


def test_empty_result():
    result = {"segments": [], "language": "en"}
    assert render(result, "txt") == ""
    assert render(result, "srt") == ""
    assert render(result, "vtt") == "WEBVTT\n\n"
    assert render(result, "tsv") == "start\tend\ttext\n"
    assert render(result, "aud") == ""
    assert render(result, "json") == '{"segments": [], "language": "en"}'


def test_speakers_are_prefixed_per_format():
    result = {
        "segments": [
            {"text": " Hello there.", "start": 0.5, "end": 1.25, "speaker": "SPEAKER_00"},
            {"text": " Hi.", "start": 1.5, "end": 2.0, "speaker": "SPEAKER_01"},
            {"text": " Nobody.", "start": 2.0, "end": 3.0},
        ],
        "language": "en",
    }
    assert render(result, "txt") == "[SPEAKER_00]: Hello there.\n[SPEAKER_01]: Hi.\nNobody.\n"
    assert render(result, "srt") == (
        "1\n00:00:00,500 --> 00:00:01,250\n[SPEAKER_00]: Hello there.\n\n"
        "2\n00:00:01,500 --> 00:00:02,000\n[SPEAKER_01]: Hi.\n\n"
        "3\n00:00:02,000 --> 00:00:03,000\nNobody.\n\n"
    )
    assert render(result, "vtt") == (
        "WEBVTT\n\n"
        "00:00.500 --> 00:01.250\n[SPEAKER_00]: Hello there.\n\n"
        "00:01.500 --> 00:02.000\n[SPEAKER_01]: Hi.\n\n"
        "00:02.000 --> 00:03.000\nNobody.\n\n"
    )
    assert render(result, "aud") == (
        "0.5\t1.25\t[[SPEAKER_00]]Hello there.\n1.5\t2.0\t[[SPEAKER_01]]Hi.\n2.0\t3.0\tNobody.\n"
    )
    # tsv has no speaker column.
    assert render(result, "tsv") == "start\tend\ttext\n500\t1250\tHello there.\n1500\t2000\tHi.\n2000\t3000\tNobody.\n"


def test_none_speaker_in_txt_is_no_speaker_but_subtitles_print_it():
    result = one_segment(0.0, 1.0, speaker=None)
    assert render(result, "txt") == "Hi.\n"
    assert render(result, "aud") == "0.0\t1.0\tHi.\n"
    # WhisperX's segment-level cues test for the key, not its value.
    assert render(result, "vtt") == "WEBVTT\n\n00:00.000 --> 00:01.000\n[None]: Hi.\n\n"


def test_unicode_and_escaping():
    text = " Ça va? 日本語 — «ok» \U0001f600 \"quoted\" back\\slash"
    result = one_segment(0.0, 1.0, text=text)
    assert render(result, "txt") == text.strip() + "\n"
    encoded = render(result, "json")
    assert "Ça va? 日本語" in encoded and "\U0001f600" in encoded
    assert '\\"quoted\\" back\\\\slash' in encoded
    assert json.loads(encoded) == result
    assert encoded.encode("utf-8").decode("utf-8") == encoded


def test_json_keeps_key_order_and_floats():
    result = {
        "segments": [{"end": 2.0, "start": 1.0, "text": " x", "avg_logprob": -0.18140995502471924}],
        "word_segments": [],
        "language": "fr",
    }
    assert render(result, "json") == (
        '{"segments": [{"end": 2.0, "start": 1.0, "text": " x", "avg_logprob": -0.18140995502471924}], '
        '"word_segments": [], "language": "fr"}'
    )


def test_arrows_tabs_and_whitespace():
    result = one_segment(0.0, 1.0, text="  a --> b\tc  \n")
    assert render(result, "txt") == "a --> b\tc\n"
    assert render(result, "srt") == "1\n00:00:00,000 --> 00:00:01,000\na -> b\tc\n\n"
    assert render(result, "tsv") == "start\tend\ttext\n0\t1000\ta --> b c\n"
    assert render(result, "aud") == "0.0\t1.0\ta --> b c\n"


def test_blank_segment_text_still_makes_a_line_and_a_cue():
    result = one_segment(0.0, 1.0, text=" ")
    assert render(result, "txt") == "\n"
    assert render(result, "srt") == "1\n00:00:00,000 --> 00:00:01,000\n\n\n"


ALIGNED = {
    "segments": [
        {
            "text": " Hello big world.",
            "start": 0.1,
            "end": 1.9,
            "speaker": "SPEAKER_00",
            "words": [
                {"word": "Hello", "start": 0.2, "end": 0.5, "score": 0.9, "speaker": "SPEAKER_00"},
                {"word": "big", "start": 0.6, "end": 0.8, "score": 0.8},
                {"word": "world.", "start": 1.0, "end": 1.5, "score": 0.7},
            ],
        },
        {
            "text": " 42 times.",
            "start": 2.0,
            "end": 3.0,
            "words": [{"word": "42"}, {"word": "times.", "start": 2.5, "end": 2.9, "score": 0.5}],
        },
        {"text": " 7", "start": 3.5, "end": 4.0, "words": [{"word": "7"}]},
    ],
    "word_segments": [],
    "language": "en",
}


def test_aligned_cues_take_times_from_words():
    assert render(ALIGNED, "srt") == (
        "1\n00:00:00,200 --> 00:00:01,500\n[SPEAKER_00]: Hello big world.\n\n"
        "2\n00:00:02,500 --> 00:00:02,900\n42 times.\n\n"
        # No word of this cue was aligned: the segment's own times are used.
        "3\n00:00:03,500 --> 00:00:04,000\n7\n\n"
    )
    # txt, tsv and aud ignore the words.
    assert render(ALIGNED, "txt") == "[SPEAKER_00]: Hello big world.\n42 times.\n7\n"


def test_aligned_words_in_an_unspaced_language_are_glued():
    result = {
        "segments": [
            {
                "text": "こんにちは世界",
                "start": 0.0,
                "end": 1.0,
                "words": [{"word": "こんにちは", "start": 0.0, "end": 0.5}, {"word": "世界", "start": 0.5, "end": 1.0}],
            }
        ],
        "language": "ja",
    }
    assert render(result, "vtt") == "WEBVTT\n\n00:00.000 --> 00:01.000\nこんにちは世界\n\n"


def test_aligned_highlight_and_line_options():
    highlighted = render(ALIGNED, "vtt", highlight_words=True)
    assert highlighted.startswith(
        "WEBVTT\n\n"
        "00:00.200 --> 00:00.500\n[SPEAKER_00]: <u>Hello</u> big world.\n\n"
        "00:00.500 --> 00:00.600\n[SPEAKER_00]: Hello big world.\n\n"
        "00:00.600 --> 00:00.800\n[SPEAKER_00]: Hello <u>big</u> world.\n\n"
    )
    # Both width and count given: lines fill to the width and cues break by line count.
    wrapped = render(ALIGNED, "srt", max_line_width=10, max_line_count=1)
    assert wrapped == (
        "1\n00:00:00,200 --> 00:00:00,800\n[SPEAKER_00]: Hello big\n\n"
        # A cue's speaker and fallback times come from the segment of its first word.
        "2\n00:00:01,000 --> 00:00:01,500\n[SPEAKER_00]: world. 42\n\n"
        "3\n00:00:02,500 --> 00:00:02,900\ntimes. 7\n\n"
    )
    # Width alone wraps lines but keeps one cue per segment.
    lines = render(ALIGNED, "srt", max_line_width=6)
    assert "[SPEAKER_00]: Hello \nbig \nworld." in lines


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown output format"):
        render(JFK, "docx")
