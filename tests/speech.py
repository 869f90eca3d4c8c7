"""Conversations between espeak-ng voices, made on the spot, with the truth of who spoke when.

The voices differ in variant AND pitch (docs/diarization.md, /work/shared/ENGINE_FACTS.md):
voices that differ in one only can sound alike to a speaker-embedding model.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

# (espeak-ng voice, pitch 0-99)
TWO_VOICES = [("en-us", 40), ("en-gb+f3", 80)]
THREE_VOICES = [("en-us+Andy", 45), ("en-gb+f3", 85), ("en-gb-scotland+Storm", 25)]

SENTENCES = [
    "Good morning everyone, thank you for coming to the planning meeting today.",
    "Thanks for having me. I read the report last night and I have a few questions about the budget.",
    "Of course. The budget for the new library was approved by the council in March.",
    "That is good news. How many people will work on the building next summer?",
    "About forty people, and the work should be finished before the winter begins.",
    "I would like to see the drawings of the reading room before we decide anything else.",
    "The architect will send them on Friday, together with the list of materials.",
    "Then let us meet again next week and agree on the opening date.",
    "Please remember that the garden behind the library needs new trees as well.",
    "We can plant the trees in the autumn, when the ground is still soft and warm.",
    "The children of the village school asked for a small theatre in the basement.",
    "A theatre is a lovely idea, but the basement floods every spring after the rain.",
]


_WHO = ["the mayor", "my neighbour", "the teacher", "our driver", "the baker", "a farmer", "the nurse", "his cousin",
        "the captain", "an old friend", "the new manager", "her brother"]
_DID = ["painted", "repaired", "visited", "cleaned", "described", "ordered", "moved", "counted", "opened", "checked",
        "measured", "carried"]
_WHAT = ["the blue boat", "a wooden bridge", "the station clock", "seven boxes of apples", "the garden wall",
         "a broken window", "the long table", "two heavy doors", "the village church", "a yellow bicycle",
         "the library roof", "three small chairs"]
_WHEN = ["on Monday morning", "before lunch", "late last night", "during the storm", "after the concert",
         "in the spring", "at half past nine", "while it was raining", "on the way home", "last weekend"]


def varied_sentences(count: int, seed: int = 7) -> list[str]:
    """`count` different sentences: a long talk made of a few sentences repeated word for word
    is not speech (espeak says a sentence identically every time, and identical windows cluster
    by sentence rather than by voice)."""
    import random

    chooser = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < count:
        text = (f"{chooser.choice(_WHO).capitalize()} {chooser.choice(_DID)} {chooser.choice(_WHAT)} "
                f"{chooser.choice(_WHEN)}, and {chooser.choice(_WHO)} {chooser.choice(_DID)} {chooser.choice(_WHAT)}.")
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def say(text: str, voice: str, pitch: int, out: Path) -> None:
    espeak = shutil.which("espeak-ng")
    assert espeak, "espeak-ng is not installed (apt-get install espeak-ng)"
    subprocess.run([espeak, "-v", voice, "-p", str(pitch), "-s", "160", "-w", str(out), text],
                   check=True, capture_output=True, timeout=60)


def conversation(path: Path, voices: list[tuple[str, int]], turns: int, gap: float = 0.7,
                 sentences: list[str] | None = None) -> list[tuple[float, float, int]]:
    """Write a WAV in which the voices take turns (0, 1, 2, 0, 1, 2, ...), one sentence each, `gap`
    seconds of silence between; returns the truth [(start, end, voice index)]."""
    sentences = sentences or SENTENCES
    truth = []
    frames = bytearray()
    rate = None
    with tempfile.TemporaryDirectory() as tmp:
        for turn, text in zip(range(turns), itertools.cycle(sentences)):
            index = turn % len(voices)
            piece = Path(tmp) / f"{turn}.wav"
            say(text, *voices[index], piece)
            with wave.open(str(piece), "rb") as reader:
                rate = rate or reader.getframerate()
                assert (reader.getnchannels(), reader.getsampwidth(), reader.getframerate()) == (1, 2, rate)
                data = reader.readframes(reader.getnframes())
            if turn:
                frames += b"\0\0" * int(gap * rate)
            start = len(frames) / 2 / rate
            frames += data
            truth.append((start, len(frames) / 2 / rate, index))
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(bytes(frames))
    return truth


def sample(path: Path, voice: tuple[str, int], texts: list[str]) -> Path:
    """One voice alone (a reference or enrolment sample)."""
    conversation(path, [voice], len(texts), sentences=texts)
    return path


def attribution(truth: list[tuple[float, float, int]], spans: list[tuple[float, float, str]]) -> tuple[float, dict]:
    """The share of the truth's speech time covered by spans of the right speaker, after the best
    mapping of found labels to voices (each label one voice); and that mapping."""
    labels = sorted({label for _, _, label in spans})
    voices = sorted({voice for _, _, voice in truth})
    overlap = {(label, voice): 0.0 for label in labels for voice in voices}
    for start, end, voice in truth:
        for s, e, label in spans:
            overlap[(label, voice)] += max(0.0, min(end, e) - max(start, s))
    total = sum(end - start for start, end, _ in truth)
    best, mapping = 0.0, {}
    slots = voices + [None] * max(0, len(labels) - len(voices))
    for chosen in itertools.permutations(slots, len(labels)):
        score = sum(overlap[(label, voice)] for label, voice in zip(labels, chosen) if voice is not None)
        if score > best:
            best, mapping = score, dict(zip(labels, chosen))
    return (best / total if total else 0.0), mapping
