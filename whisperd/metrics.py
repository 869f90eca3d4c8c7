"""Prometheus metrics, summed across worker processes through prometheus-client's multiprocess mode.

Every process writes its counters and histograms to files in one directory; a scrape of any
worker reads them all. Until setup() runs (unit tests, admin commands) every hook is a no-op.
"""

from __future__ import annotations

import asyncio
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from .clock import utc_now

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LAG_INTERVAL_SECONDS = 0.5
_DURATION_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

_m: dict[str, Any] = {}
_dir: str | None = None


def setup(directory: str) -> None:
    """Call once in the parent, before any worker forks: drops the last run's files."""
    global _dir
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    # Only prometheus-client's own files: the directory is configurable and may hold others.
    for stale in path.glob("*.db"):
        stale.unlink()
    # prometheus-client picks its value storage from this variable when a metric is made.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    from prometheus_client import Counter, Gauge, Histogram, values

    values.ValueClass = values.get_value_class()
    _dir = str(path)
    _request_counters.clear()
    _m.update(
        started=Counter("whisperd_jobs_started_total", "Engine runs started (a retried job counts again)"),
        finished=Counter("whisperd_jobs_finished_total", "Jobs that reached an end state", ["status"]),
        failed=Counter("whisperd_jobs_failed_total", "Jobs that ended Failed"),
        duration=Histogram("whisperd_job_duration_seconds", "Time from engine start to the job's end",
                           buckets=_DURATION_BUCKETS),
        queue_wait=Histogram("whisperd_job_queue_wait_seconds", "Time a job waited in the queue before it ran",
                             buckets=_DURATION_BUCKETS),
        exits=Counter("whisperd_engine_exits_total", "Engine process endings by exit code or signal", ["code"]),
        upload_bytes=Counter("whisperd_upload_bytes_total", "Bytes of audio accepted into jobs"),
        uploads=Counter("whisperd_uploads_total", "Uploads accepted into jobs"),
        audio_seconds=Counter("whisperd_audio_seconds_processed_total",
                              "Seconds of audio in jobs that completed (ffprobe's duration at upload)"),
        requests=Counter("whisperd_http_requests_total", "HTTP requests answered",
                         ["handler", "method", "status"]),
        refused=Counter("whisperd_uploads_refused_total", "Uploads intake refused, by HTTP status", ["status"]),
        cut=Counter("whisperd_uploads_cut_total", "Request bodies cut for arriving too slowly"),
        hashes=Counter("whisperd_token_hashes_total", "Slow token hashes computed (a token not yet verified)"),
        auth_refused=Counter("whisperd_auth_refused_total", "Token checks refused without hashing",
                             ["why"]),
        storage_faults=Counter("whisperd_storage_faults_total",
                               "Times the job storage stopped taking writes (read-only, full, I/O error)", ["kind"]),
        storage_unhealthy=Gauge("whisperd_storage_unhealthy", "1 while a process of this node finds the job "
                                "storage unwritable (it claims no job and refuses uploads)",
                                multiprocess_mode="livemax"),
        storage_requeues=Counter("whisperd_jobs_requeued_for_storage_total",
                                 "Jobs put back in the queue, no attempt counted, because the storage failed"),
        lag=Histogram("whisperd_ioloop_lag_seconds", "How late the IOLoop ran a timer (blocking work shows here)",
                      buckets=_LAG_BUCKETS),
    )


def process_died(pid: int) -> None:
    """A dead worker's counters stay counted; only its live-gauge files go."""
    if _dir is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, _dir)


# -- hooks the rest of the code calls


def job_started(created_at: str, started_at: str | None) -> None:
    if not _m:
        return
    _m["started"].inc()
    if started_at:
        _m["queue_wait"].observe(max(0.0, _seconds_between(created_at, started_at)))


def job_finished(status: str, seconds: float | None) -> None:
    if not _m:
        return
    _m["finished"].labels(status).inc()
    if status == "Failed":
        _m["failed"].inc()
    if seconds is not None:
        _m["duration"].observe(seconds)


def engine_exited(returncode: int | None, signal_number: int | None) -> None:
    if not _m:
        return
    code = str(returncode) if returncode is not None else f"signal:{signal_number}" if signal_number else "none"
    _m["exits"].labels(code).inc()


def upload_received(size: int) -> None:
    if _m:
        _m["uploads"].inc()
        _m["upload_bytes"].inc(size)


def audio_processed(seconds: float | None) -> None:
    if _m and seconds:
        _m["audio_seconds"].inc(seconds)
def storage_state(kind: str | None) -> None:
    """kind: "read-only", "full" or "error" when the storage just failed; None when it works again."""
    if not _m:
        return
    if kind is not None:
        _m["storage_faults"].labels(kind).inc()
    _m["storage_unhealthy"].set(0 if kind is None else 1)


def storage_requeued() -> None:
    if _m:
        _m["storage_requeues"].inc()


def upload_refused(status: int) -> None:
    if _m:
        _m["refused"].labels(str(status)).inc()


def upload_cut() -> None:
    if _m:
        _m["cut"].inc()


def token_hashed() -> None:
    if _m:
        _m["hashes"].inc()


def auth_refused(why: str) -> None:
    """why: "remembered" (a token that failed moments ago) or "throttled" (too many failures)."""
    if _m:
        _m["auth_refused"].labels(why).inc()


_request_counters: dict[tuple[str, str, int], Any] = {}  # labels() looks its child up anew each time


def request_done(handler: str, method: str, status: int) -> None:
    if _m:
        key = (handler, method, status)
        counter = _request_counters.get(key)
        if counter is None:
            counter = _request_counters[key] = _m["requests"].labels(handler, method, str(status))
        counter.inc()


async def watch_loop_lag() -> None:
    """Runs for the life of a worker: sleeps a fixed interval and records how late it woke."""
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(LAG_INTERVAL_SECONDS)
        if _m:
            _m["lag"].observe(max(0.0, loop.time() - before - LAG_INTERVAL_SECONDS))


def exposition(status_counts: dict[str, int], engine: dict | None = None) -> bytes:
    """The text a scrape gets: every process's files, plus the ledger's view of the queue, plus
    each device's engine (WHISPER_DEVICES) when `engine` (the /status engine part) lists them."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    if _dir is not None:
        MultiProcessCollector(registry, _dir)

    class LedgerCollector:
        # Read from the shared ledger at scrape time, so every worker reports the same numbers.
        def collect(self):
            jobs = GaugeMetricFamily("whisperd_jobs", "Jobs in the ledger by status", labels=["status"])
            for status, count in status_counts.items():
                jobs.add_metric([status], count)
            yield jobs
            yield GaugeMetricFamily("whisperd_queue_depth", "Jobs waiting to run",
                                    value=status_counts.get("Queued", 0))

    registry.register(LedgerCollector())
    devices = (engine or {}).get("devices") or []

    class DeviceCollector:
        # This process's view of the box's engines, one label per device.
        def collect(self):
            running = GaugeMetricFamily("whisperd_engine_device_running_jobs", "Jobs on each device's engine",
                                        labels=["device"])
            memory = GaugeMetricFamily("whisperd_engine_device_memory_bytes",
                                       "Resident memory of each device's engine process", labels=["device"])
            loaded = GaugeMetricFamily("whisperd_engine_device_model_loaded", "Models loaded on each device",
                                       labels=["device", "model"])
            for number, device in enumerate(devices):
                name = f"{number}:{device.get('device')}"
                running.add_metric([name], device.get("running_jobs") or 0)
                memory.add_metric([name], (device.get("rss_mib") or 0) * 1024 * 1024)
                for model in device.get("loaded_models") or []:
                    loaded.add_metric([name, model], 1)
            yield running
            yield memory
            yield loaded

    if devices:
        registry.register(DeviceCollector())
    return generate_latest(registry)


def seconds_since(iso: str | None) -> float | None:
    if not iso:
        return None
    return max(0.0, (utc_now() - _parse(iso)).total_seconds())


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _seconds_between(earlier: str, later: str) -> float:
    return (_parse(later) - _parse(earlier)).total_seconds()
