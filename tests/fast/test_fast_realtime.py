"""The live session's pure parts, in process: LocalAgreement, server-VAD turns, session updates,
audio conversion (the WebSocket paths are tests/test_realtime.py's)."""

from __future__ import annotations

import pytest

from whisperd.realtime.agreement import Agreement
from whisperd.realtime.audio import Converter
from whisperd.realtime.protocol import EventError, Settings, apply_update, session_object
from whisperd.realtime.turns import Turns


def test_agreement_sends_only_what_two_passes_agree_on_and_never_takes_it_back():
    agreement = Agreement()
    assert agreement.update("And so") == ""  # one pass: nothing agreed yet
    assert agreement.update("And so my fellow") == "And so"
    assert agreement.update("And so my fellow Americans ask") == " my fellow"
    assert agreement.update("And so my fellow Americans, ask not") == ""  # "Americans" vs "Americans,"
    assert agreement.update("And so my fellow Americans, ask not what") == " Americans, ask not"
    assert agreement.update("Hello there") == ""  # a pass that ignores the prefix agrees on nothing
    sent = "And so my fellow Americans, ask not"
    assert agreement.text == sent
    assert agreement.final("And so my fellow Americans, ask not what your country can do.").startswith(sent)
    # A final pass that dropped the prefix still begins with the sent words.
    assert agreement.final("So my fellow Americans ask").startswith(sent)


def test_turns_follow_threshold_padding_and_silence():
    turns = Turns(threshold=0.5, prefix_padding_ms=100, silence_duration_ms=320)
    events = turns.feed([0.1] * 10 + [0.9] * 20 + [0.4] * 3 + [0.9] * 5 + [0.1] * 10)
    assert [(e.event, e.at_ms) for e in events] == [("started", 320 - 100), ("stopped", 38 * 32 + 96)]
    assert not turns.speaking
    # 0.4 is above threshold - 0.15 (hysteresis): it did not end the turn


@pytest.mark.parametrize("silence_ms", [0, 20, 64, 80, 96, 100, 320, 500, 1000])
def test_the_end_a_quiet_predicts_is_where_the_turn_stops_if_it_lasts(silence_ms):
    # The speculative final pass is made for end_if_silent(); it is used only when the turn then
    # stops exactly there, so the prediction must be exact for any silence_duration_ms.
    turns = Turns(threshold=0.5, prefix_padding_ms=0, silence_duration_ms=silence_ms)
    turns.feed([0.9] * 10)
    assert turns.end_if_silent() is None and turns.quiet_ms == 0
    stopped = []
    predicted = set()
    for _ in range(40):
        stopped += [e.at_ms for e in turns.feed([0.05]) if e.event == "stopped"]
        if stopped:
            break
        predicted.add(turns.end_if_silent())
        assert turns.quiet_ms > 0
    assert stopped and predicted <= {stopped[0]}
    turns = Turns(threshold=0.5, prefix_padding_ms=0, silence_duration_ms=500)
    turns.feed([0.9] * 10 + [0.05] * 3)
    assert turns.end_if_silent() == 10 * 32 + 96
    turns.feed([0.9])  # speech resumed: no end predicted
    assert turns.end_if_silent() is None


def test_session_updates_apply_whole_or_not_at_all():
    settings = Settings()
    ga = apply_update({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcmu"}, "transcription": {"model": "tiny.en", "language": "EN", "prompt": "Ada"},
        "turn_detection": None, "noise_reduction": {"type": "near_field"}}}}}, settings)
    assert (ga.format, ga.model, ga.language, ga.prompt, ga.turn_detection) == ("g711_ulaw", "tiny.en", "en", "Ada", None)
    assert session_object("s", ga, 0)["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    with pytest.raises(EventError) as refused:
        apply_update({"type": "session.update", "session": {"audio": {"input": {
            "transcription": {"model": "base"}, "turn_detection": {"silence_duration_ms": 1.5}}}}}, ga)
    assert refused.value.param == "session.audio.input.turn_detection.silence_duration_ms"
    assert ga.model == "tiny.en"  # unchanged
    beta = apply_update({"type": "transcription_session.update", "session": {
        "input_audio_format": "g711_alaw", "turn_detection": {"type": "server_vad", "threshold": 0.7}}}, ga)
    assert beta.shape == "beta" and beta.format == "g711_alaw" and beta.turn_detection["threshold"] == 0.7
    assert session_object("s", beta, 0)["input_audio_format"] == "g711_alaw"
    with pytest.raises(EventError) as refused:
        apply_update({"type": "session.update", "session": {"audio": {"input": {
            "turn_detection": {"type": "server_vad", "threshold": True}}}}}, ga)
    assert refused.value.code == "invalid_type"  # a boolean is not a number here


def test_audio_is_resampled_to_16k_once_per_chunk_with_state_kept():
    converter = Converter("pcm16")
    out = b"".join(converter.to_pcm16k(b"\x10\x00" * 2400 + b"\x10") if i == 0 else converter.to_pcm16k(
        b"\x00" + b"\x10\x00" * 2399) for i in range(2))  # an odd byte split between two chunks
    assert abs(len(out) - 2 * 3200) <= 4  # 200 ms at 24 kHz -> 200 ms at 16 kHz
    ulaw = Converter("g711_ulaw")
    assert abs(len(ulaw.to_pcm16k(b"\xff" * 800)) - 3200) <= 4  # 100 ms at 8 kHz
