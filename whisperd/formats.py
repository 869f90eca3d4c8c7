"""Renders a WhisperX result as txt, srt, vtt, tsv, json or aud text, byte for byte as WhisperX writes it.

The server asks WhisperX for its JSON and builds every other format from it here, so one
engine run serves any `response_format` (the CLI writes `aud` only when asked for it alone).
The rules follow the writers of WhisperX 3.8.6 (`whisperx/utils.py`) with the CLI's default
options; tests/test_engine_real.py checks the bytes against the real engine's files.

Rules worth knowing, all inherited from WhisperX:
- Timestamps round to whole milliseconds with Python's round() (half to even on the exact
  float product), so 59.9996 s becomes 01:00.000. VTT shows hours only from one hour on;
  SRT always does and uses a comma.
- txt, srt and vtt strip each segment's text; srt and vtt of unaligned results turn "-->"
  into "->" so a cue cannot end early. A diarized segment is prefixed "[SPEAKER_00]: ",
  except in aud, which uses "[[SPEAKER_00]]" with no separator.
- tsv has a header and integer milliseconds; aud has no header and prints the seconds
  exactly as Python prints the float (0.301, 2.5, 12.0), not a fixed number of decimals.
- json is `json.dumps(result, ensure_ascii=False)` with the default separators and no
  trailing newline; the result's own key order is kept.
- Aligned results (segments with "words") are laid out word by word; with the default
  options that is one cue per segment, its times taken from the first and last timed word.
"""

import json
import re

__all__ = ["FORMATS", "CONTENT_TYPES", "render"]

FORMATS = ("txt", "srt", "vtt", "tsv", "json", "aud")

CONTENT_TYPES = {
    "txt": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
    "tsv": "text/tab-separated-values; charset=utf-8",
    "json": "application/json; charset=utf-8",
    "aud": "text/plain; charset=utf-8",
}

# Word texts in these languages are glued without spaces when a cue is built from words.
_UNSPACED_LANGUAGES = ("ja", "zh")

# A line longer than this is wrapped even when no max_line_width is given.
_DEFAULT_LINE_WIDTH = 1000

# Within a cue, a gap longer than this (seconds) between words starts a new cue, but only
# when both max_line_width and max_line_count are set.
_LONG_PAUSE_SECONDS = 3.0

_LEADING_SPACE = re.compile(r"^(\s*)(.*)$")


def render(result, fmt, *, max_line_width=None, max_line_count=None, highlight_words=False):
    """Return `result` (WhisperX's JSON output, decoded) in format `fmt` as WhisperX writes it.

    The keyword options mirror the CLI's --max_line_width, --max_line_count and
    --highlight_words; their defaults are the CLI's, and they only matter for aligned results.
    Raises ValueError for an unknown format or a negative timestamp.
    """
    if fmt == "txt":
        return _txt(result)
    if fmt == "vtt":
        cues = _cues(result, ".", False, max_line_width, max_line_count, highlight_words)
        return "WEBVTT\n\n" + "".join(f"{start} --> {end}\n{text}\n\n" for start, end, text in cues)
    if fmt == "srt":
        cues = _cues(result, ",", True, max_line_width, max_line_count, highlight_words)
        return "".join(
            f"{number}\n{start} --> {end}\n{text}\n\n"
            for number, (start, end, text) in enumerate(cues, start=1)
        )
    if fmt == "tsv":
        return _tsv(result)
    if fmt == "json":
        return json.dumps(result, ensure_ascii=False)
    if fmt == "aud":
        return _aud(result)
    raise ValueError(f"unknown output format {fmt!r}; expected one of {', '.join(FORMATS)}")


def format_timestamp(seconds, decimal_marker=".", always_include_hours=False):
    """Return `seconds` as [HH:]MM:SS<marker>mmm, rounded to the millisecond like WhisperX."""
    if seconds < 0:
        raise ValueError(f"negative timestamp {seconds!r}")
    total_ms = round(seconds * 1000.0)
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole_seconds, ms = divmod(rest, 1000)
    prefix = f"{hours:02d}:" if always_include_hours or hours > 0 else ""
    return f"{prefix}{minutes:02d}:{whole_seconds:02d}{decimal_marker}{ms:03d}"


def _txt(result):
    lines = []
    for segment in result["segments"]:
        text = segment["text"].strip()
        speaker = segment.get("speaker")
        lines.append(text if speaker is None else f"[{speaker}]: {text}")
    return "".join(line + "\n" for line in lines)


def _tsv(result):
    rows = ["start\tend\ttext\n"]
    for segment in result["segments"]:
        text = segment["text"].strip().replace("\t", " ")
        rows.append(f"{round(1000 * segment['start'])}\t{round(1000 * segment['end'])}\t{text}\n")
    return "".join(rows)


def _aud(result):
    rows = []
    for segment in result["segments"]:
        speaker = segment.get("speaker")
        # WhisperX would crash on a None speaker here; treating it as absent is the only
        # output that makes sense.
        label = "" if speaker is None else f"[[{speaker}]]"
        text = segment["text"].strip().replace("\t", " ")
        # str() of the number, as print() writes it: WhisperX does not fix the decimals.
        rows.append(f"{segment['start']}\t{segment['end']}\t{label}{text}\n")
    return "".join(rows)


def _cues(result, marker, always_hours, max_line_width, max_line_count, highlight_words):
    """Yield (start, end, text) subtitle cues for srt and vtt."""
    segments = result["segments"]
    if not segments:
        return

    def stamp(seconds):
        return format_timestamp(seconds, marker, always_hours)

    if "words" not in segments[0]:
        for segment in segments:
            text = segment["text"].strip().replace("-->", "->")
            # Key presence, not a None check, as in WhisperX's segment-level cues.
            if "speaker" in segment:
                text = f"[{segment['speaker']}]: {text}"
            yield stamp(segment["start"]), stamp(segment["end"]), text
        return

    joiner = "" if result.get("language") in _UNSPACED_LANGUAGES else " "
    for words, speaker, fallback in _word_groups(segments, max_line_width, max_line_count):
        starts = [w["start"] for w in words if "start" in w]
        ends = [w["end"] for w in words if "end" in w]
        if starts and ends:
            cue_start, cue_end = stamp(min(starts)), stamp(max(ends))
        else:
            # No word could be aligned: fall back to the first segment's own times.
            cue_start, cue_end = stamp(fallback[0]), stamp(fallback[1])
        prefix = "" if speaker is None else f"[{speaker}]: "
        texts = [w["word"] for w in words]
        cue_text = prefix + joiner.join(texts)

        if not (highlight_words and starts):
            yield cue_start, cue_end, cue_text
            continue
        # Karaoke style: one cue per timed word with that word underlined, plus a plain cue
        # to fill any gap before it.
        previous_end = cue_start
        for index, word in enumerate(words):
            if "start" not in word:
                continue
            word_start, word_end = stamp(word["start"]), stamp(word["end"])
            if word_start != previous_end:
                yield previous_end, word_start, cue_text
            marked = [
                _LEADING_SPACE.sub(r"\1<u>\2</u>", text) if other == index else text
                for other, text in enumerate(texts)
            ]
            # Always a space here, even for unspaced languages: WhisperX does the same.
            yield word_start, word_end, prefix + " ".join(marked)
            previous_end = word_end


def _word_groups(segments, max_line_width, max_line_count):
    """Split aligned words into cues; yield (words, speaker, (segment start, segment end)).

    A word whose text starts with "\\n" begins a new line within its cue. Cue boundaries
    come from segment boundaries unless both max_line_width and max_line_count are given,
    in which case lines are filled to the width and cues to the line count or a long pause.
    """
    width = _DEFAULT_LINE_WIDTH if max_line_width is None else max_line_width
    keep_segments = max_line_count is None or max_line_width is None

    group = []
    first_segment = None
    line_length = 0
    line_count = 1
    last_start = segments[0]["start"]
    for segment in segments:
        for index, original in enumerate(segment.get("words", [])):
            word = dict(original)
            long_pause = (
                not keep_segments and "start" in word and word["start"] - last_start > _LONG_PAUSE_SECONDS
            )
            fits = line_length + len(word["word"]) <= width
            segment_break = keep_segments and index == 0 and bool(group)
            if line_length > 0 and fits and not long_pause and not segment_break:
                line_length += len(word["word"])
            else:
                word["word"] = word["word"].strip()
                cue_full = max_line_count is not None and (long_pause or line_count >= max_line_count)
                if segment_break or (group and cue_full):
                    yield group, first_segment.get("speaker"), (first_segment["start"], first_segment["end"])
                    group = []
                    line_count = 1
                elif line_length > 0:
                    line_count += 1
                    word["word"] = "\n" + word["word"]
                line_length = len(word["word"].strip())
            if not group:
                first_segment = segment
            group.append(word)
            if "start" in word:
                last_start = word["start"]
    if group:
        yield group, first_segment.get("speaker"), (first_segment["start"], first_segment["end"])
