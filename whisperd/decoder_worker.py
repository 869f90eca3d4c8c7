"""A warm decoder process: loads FFmpeg's libraries (PyAV) once, then probes and decodes one file at a time.

Started by whisperd/decoder.py as `python -I decoder_worker.py`; imports nothing from the server
package. One JSON request a line on stdin, one JSON answer a line on stdout:

  {"op": "probe", "path": P, "formats": "wav,flac,..."}
      -> {"ok": true, "format_name": ..., "demuxer": ..., "duration": s | null, "found": ..., "audio": n}
  {"op": "decode", "path": P, "out": W, "demuxer": D, "formats": ..., "max_frames": n | null}
      -> {"ok": true, "frames": n}
  {"op": "close"} -> {"ok": true}          forget the file the last probe opened
  any failure -> {"ok": false, "why": "one line"}; every answer carries "rss_kib" (the peak so far).

The same rules as ffprobe/ffmpeg in probe.py and intake.py: the input is named `file:<path>`,
only the file protocol (`protocol_whitelist`) and only allow-listed demuxers (`format_whitelist`)
may be used, so a playlist or concat list is refused after its demuxer's probe of our file's
first bytes, before it can open anything it names. The decode forces the probed demuxer, takes the
first audio stream, writes 16 kHz mono 16-bit PCM with a plain 44-byte WAV header and stops at
`max_frames`. The memory limit (WHISPERD_DECODER_MEMORY_BYTES, RLIMIT_AS) is set before PyAV is
imported; the time limit is the server's, which kills this process. End of stdin ends it.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import wave

RATE = 16000
CHUNK_SAMPLES = 16384  # decoded samples resampled at once: one resampler call per ~0.4 s, not per packet
# (30.8 ms of CPU for a 30 s 44.1 kHz stereo mp3 against 34.3 ms with 65536: the chunk stays in cache)
# libswresample's options for the conversion to 16 kHz mono. Its default filter (32 taps a phase,
# ~91 at 44.1 kHz -> 16 kHz) was a quarter of a 44.1 kHz WAV's decode and a sixth of an mp3's;
# with 16 the error against sox's very-high-quality resampler on jfk.flac at 44.1 kHz is -102 dB
# below 4 kHz (default: -100), -35 dB at 4-7 kHz (default: -54, a slightly earlier roll-off) and
# the engine hears the same words (tests/test_decoder_quality.py); 8 loses -74 dB below 4 kHz.
RESAMPLE_OPTIONS = {"filter_size": "16"}
# The WAV demuxers' (wav, w64) packet size: their default, 4096 bytes, made a 30 s 44.1 kHz stereo WAV
# ~1,300 packets, each a decode call and a frame; 64 KiB makes it ~80. No other demuxer has the option.
WAV_PACKET_BYTES = 65536
_OPENED: dict = {}  # the container the last probe opened, kept for the decode that follows it


def _forget() -> None:
    container = _OPENED.pop("container", None)
    _OPENED.clear()
    if container is not None:
        container.close()


# How much of the file FFmpeg may read to find the format and the streams. Its default (5 MB)
# made every uncompressed upload pay for reading ~5 MB in stream analysis: 28-41 ms of a 30 s
# 44.1 kHz stereo WAV's open, against 1.1 ms with 32 KiB (mp3: 0.3 ms either way; the format,
# streams and declared duration found are the same). A file that cannot be told within it is
# refused here, and ffprobe, with its defaults, decides (intake.py's fallback).
PROBE_BYTES = 32768


def _options(formats: str) -> dict:
    return {"protocol_whitelist": "file", "format_whitelist": formats, "probesize": str(PROBE_BYTES),
            "max_size": str(WAV_PACKET_BYTES)}


def _describe(stream) -> str:
    codec = getattr(stream.codec_context, "codec", None)
    name = getattr(codec, "canonical_name", None) or getattr(codec, "name", None) or "?"
    text = f"{stream.type}: {name}"
    if stream.type == "audio":
        if stream.codec_context.sample_rate:
            text += f", {stream.codec_context.sample_rate} Hz"
        if stream.codec_context.channels:
            text += f", {stream.codec_context.channels} ch"
    return text


def probe(av, request: dict) -> dict:
    _forget()
    formats = request["formats"]
    allowed = set(formats.split(","))
    container = av.open("file:" + request["path"], "r", container_options=_options(formats))
    try:
        answer = _probed(container, allowed)
    except BaseException:
        container.close()
        raise
    if answer.get("ok") and answer.get("audio"):
        # The decode that follows reads on from here: the demuxer found is the one it would force,
        # and opening it again (stream analysis included) would cost as much as the probe.
        _OPENED.update(container=container, path=request["path"], demuxer=answer["demuxer"])
    else:
        container.close()
    return answer


def close(av, request: dict) -> dict:
    _forget()
    return {"ok": True}


def _probed(container, allowed: set) -> dict:
    format_name = container.format.name or ""
    demuxer = next((name for name in format_name.split(",") if name in allowed), None)
    if demuxer is None:
        return {"ok": False, "why": f"format {format_name} is not allowed"}
    streams = list(container.streams)
    audio = [s for s in streams if s.type == "audio"]
    durations = []
    if container.duration is not None and container.duration >= 0:
        durations.append(container.duration / 1_000_000)
    for stream in audio:
        if stream.duration is not None and stream.time_base is not None and stream.duration >= 0:
            durations.append(float(stream.duration * stream.time_base))
    kinds = ", ".join(_describe(s) for s in streams[:4])
    found = f"{format_name} ({kinds})" if kinds else f"{format_name} with no streams"
    return {"ok": True, "format_name": format_name, "demuxer": demuxer,
            "duration": max(durations) if durations else None, "found": found, "audio": len(audio)}


def decode(av, request: dict) -> dict:
    if _OPENED.get("path") == request["path"] and _OPENED.get("demuxer") == request["demuxer"]:
        container = _OPENED.pop("container")
        _OPENED.clear()
    else:
        _forget()
        container = av.open("file:" + request["path"], "r", format=request["demuxer"],
                            container_options=_options(request["formats"]))
    with container:
        return _decoded(av, container, request.get("max_frames"), request["out"])


def _decoded(av, container, max_frames, out_path: str) -> dict:
    frames = 0
    if not container.streams.audio:
        return {"ok": False, "why": "no audio stream"}
    stream = container.streams.audio[0]  # ffmpeg's -map 0:a:0
    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE, options=RESAMPLE_OPTIONS)
    fifo, shape = av.AudioFifo(), None
    with wave.open(out_path, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)

        def write(decoded) -> bool:
            nonlocal frames
            for frame in resampler.resample(decoded):
                count = frame.samples
                if max_frames is not None:
                    count = min(count, max_frames - frames)
                if count > 0:
                    out.writeframesraw(memoryview(frame.planes[0])[:count * 2])  # no copy of the samples
                    frames += count
                if max_frames is not None and frames >= max_frames:
                    return False
            return True

        going = True
        for packet in container.demux(stream):
            try:
                decoded = packet.decode()
            except av.error.InvalidDataError:
                continue  # as ffmpeg does: a broken frame is skipped, the rest decoded
            for frame in decoded:
                if (frame.format.name, frame.layout.name, frame.sample_rate) != shape:
                    # The stream changed its shape (or this is the first frame): what came before
                    # goes out first, and a FIFO of the new shape takes the rest.
                    if fifo.samples:
                        going = write(fifo.read())
                    fifo, shape = av.AudioFifo(), (frame.format.name, frame.layout.name, frame.sample_rate)
                frame.pts = None  # the FIFO orders by arrival; timestamps may jump in a broken file
                if going:
                    fifo.write(frame)
                while going and fifo.samples >= CHUNK_SAMPLES:
                    going = write(fifo.read(CHUNK_SAMPLES))
                if not going:
                    break
            if not going:
                break
        if going and fifo.samples:
            going = write(fifo.read())
        if going:
            write(None)  # what the resampler still holds
    return {"ok": True, "frames": frames}


def main() -> int:
    limit = int(os.environ.get("WHISPERD_DECODER_MEMORY_BYTES") or 0)
    if limit > 0:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    protocol = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # whatever a library prints goes to stderr, never into the protocol

    def answer(message: dict) -> None:
        message["rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    try:
        import av
        import av.logging

        av.logging.set_level(av.logging.PANIC)  # the server reads answers, not FFmpeg's log
    except Exception as exc:  # noqa: BLE001  said to the server, which falls back to ffprobe/ffmpeg
        answer({"event": "hello", "ok": False, "why": f"PyAV cannot be imported: {exc}"[:300]})
        return 1
    answer({"event": "hello", "ok": True, "pid": os.getpid(), "ffmpeg": av.ffmpeg_version_info})
    for line in sys.stdin:
        try:
            request = json.loads(line)
            handler = {"probe": probe, "decode": decode, "close": close}[request["op"]]
            answer(handler(av, request))
        except MemoryError:
            answer({"ok": False, "why": "out of memory", "memory": True})
            return 3  # its heap is suspect now: the server starts a fresh one
        except Exception as exc:  # noqa: BLE001  one file's failure is its answer
            answer({"ok": False, "why": f"{exc.__class__.__name__}: {exc}"[:300]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
