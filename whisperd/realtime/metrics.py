"""The live sessions' figures in /metrics (made on first use, after metrics.setup chose the directory)."""

from __future__ import annotations

from typing import Any

from .. import metrics as shared

_m: dict[str, Any] = {}
LAG_BUCKETS = (0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 20, 30, 60)


def _made() -> bool:
    if not _m and shared._dir is not None:
        from prometheus_client import Counter, Histogram

        _m.update(
            lag=Histogram("whisperd_realtime_lag_seconds", "A live session's lag: newest audio received minus "
                          "newest audio transcribed, sampled each second", buckets=LAG_BUCKETS),
            sessions=Counter("whisperd_realtime_sessions_total", "Live sessions opened"),
            closed=Counter("whisperd_realtime_sessions_closed_total", "Live sessions ended, by reason", ["reason"]),
            skipped=Counter("whisperd_realtime_partial_passes_skipped_total",
                            "Partial passes skipped because the engine was still busy with the session"),
            seconds=Counter("whisperd_realtime_audio_seconds_total", "Seconds of live audio received"),
        )
    return bool(_m)


def lag(seconds: float) -> None:
    if _made():
        _m["lag"].observe(seconds)


def opened() -> None:
    if _made():
        _m["sessions"].inc()


def closed(reason: str) -> None:
    if _made():
        _m["closed"].labels(reason).inc()


def skipped() -> None:
    if _made():
        _m["skipped"].inc()


def audio(seconds: float) -> None:
    if _made() and seconds > 0:
        _m["seconds"].inc(seconds)
