"""Start-up and shutdown: check the configuration, recover the ledger, serve, stop gracefully."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
import sys
from pathlib import Path

from tornado.netutil import bind_sockets
from tornado.process import Subprocess

from . import capabilities, config as config_module, ledger as ledger_module, metrics, nodes, probe
from .app import make_app, make_server
from .auth import load_validator
from .config import Config
from .engine import kill_orphan_group
from .jobfiles import JobFiles
from .service import Service
from .supervisor import run_workers

log = logging.getLogger("whisperd")
LOG_LEVELS = {"error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO,
              "debug": logging.DEBUG, "trace": logging.DEBUG}


class StartupError(Exception):
    """Start-up cannot go on; the message is the one line the operator sees."""


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=LOG_LEVELS[level],
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
        stream=sys.stderr,
    )
    # Tornado's own access log would print full URIs; ours (app.log_request) prints paths only.
    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    logging.getLogger("aiosqlite").setLevel(logging.INFO)  # one debug line per SQL call drowns the rest


def check_environment(config: Config) -> None:
    """Warn about what will hurt later; raise StartupError for what cannot work at all."""
    files = JobFiles.of(config)
    try:
        files.ensure_roots()
        for root in (files.tmp_root, files.output_root):
            marker = root / f".write-test-{config.node_name}-{os.getpid()}"  # nodes may share the root
            marker.write_bytes(b"")
            marker.unlink()
    except OSError as exc:
        raise StartupError(f"WHISPER_TMP_FILES/WHISPER_OUTPUT_DIR not writable: {exc}") from None
    command = Path(config.WHISPER_CMD)
    if not command.is_file() or not os.access(command, os.X_OK):
        log.error("WHISPER_CMD=%s is missing or not executable: every job will fail until it is fixed",
                  config.WHISPER_CMD)
    token_file = Path(config.WHISPER_HF_TOKEN_FILE)
    try:
        mode = token_file.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("WHISPER_HF_TOKEN_FILE %s is readable by group or others: run chmod 600 %s",
                        token_file, token_file)
    except OSError:
        pass  # no token file: diarization falls back with a warning per job
    if not probe.available(config.WHISPER_FFPROBE):
        log.error("WHISPER_FFPROBE=%s not found (install ffmpeg): uploads are queued without checking that "
                  "they are audio", config.WHISPER_FFPROBE)
    free_mb = files.free_disk_mb()
    if free_mb < config.WHISPER_MIN_FREE_DISK_MB:
        log.warning("only %.0f MB free under WHISPER_TMP_FILES/WHISPER_OUTPUT_DIR, below WHISPER_MIN_FREE_DISK_MB=%d:"
                    " uploads are refused with 507 until space is freed", free_mb, config.WHISPER_MIN_FREE_DISK_MB)
    check_auth(config)


def check_auth(config: Config) -> None:
    """Say loudly at every start when the API is open to anyone holding any string."""
    if not config.ENABLE_AUTHORIZATION:
        log.warning("ENABLE_AUTHORIZATION=false: anyone who can reach the port can use the API")
        return
    if config.WHISPER_TOKEN_VALIDATOR:
        if config.WHISPER_API_ALLOW_ANY_TOKEN:
            raise StartupError("WHISPER_TOKEN_VALIDATOR and WHISPER_API_ALLOW_ANY_TOKEN=true are both set: keep one")
        try:
            load_validator(config.WHISPER_TOKEN_VALIDATOR)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        log.info("tokens are checked by WHISPER_TOKEN_VALIDATOR=%s", config.WHISPER_TOKEN_VALIDATOR)
    elif config.WHISPER_API_ALLOW_ANY_TOKEN:
        log.warning("WHISPER_API_ALLOW_ANY_TOKEN=true: every well-formed Bearer token is accepted and all callers"
                    " are one identity; create real tokens with `python whisperd.py token create --name NAME`"
                    " and remove this setting")


def check_tokens(config: Config, live_tokens: int) -> None:
    """After the ledger is migrated: warn when the ledger's tokens are in use and there are none."""
    if not config.ENABLE_AUTHORIZATION or config.WHISPER_TOKEN_VALIDATOR or config.WHISPER_API_ALLOW_ANY_TOKEN:
        return
    if not live_tokens:
        log.warning("no API token exists: every request will be refused with 401 until one is created with"
                    " `python whisperd.py token create --name NAME`")


def recover(config: Config) -> ledger_module.Recovery:
    """Bring the ledger and the disk back to a consistent state after whatever happened last."""
    actor = f"{socket.gethostname()}:{os.getpid()}"
    try:
        report = ledger_module.prepare(config, actor)
    except ledger_module.LedgerUnavailable as exc:
        raise StartupError(str(exc)) from None
    for job_id, pid in report.engine_pids.items():
        if kill_orphan_group(pid, job_id):
            log.warning("stopped engine pid %d left running by the previous server (job %s)", pid, job_id)
    if report.requeued:
        log.warning("requeued %d job(s) left Processing by the previous run", len(report.requeued))
    if report.poisoned:
        log.error("failed %d job(s) that crashed %d times", len(report.poisoned), config.WHISPER_MAX_ATTEMPTS)
    if report.webhooks_pending:
        log.warning("%d webhook notice(s) the previous run left unsent are sent again", len(report.webhooks_pending))
    files = JobFiles.of(config)
    for job_id in report.poisoned:  # failed just now: by the ledger's word, their files go
        files.remove_all(job_id)
    removed = files.sweep(report.live_jobs, nodes.SWEEP_MIN_AGE_SECONDS if config.WHISPER_DB_URL else 0.0)
    if removed:
        log.info("removed %d file(s) or directories that belonged to no job", len(removed))
    return report


async def serve(config: Config, sockets: list[socket.socket], offline: bool) -> int:
    service = Service(config, offline)
    Subprocess.initialize()  # before the service starts its engine worker: its exit needs SIGCHLD
    await service.start()
    lag_watch = asyncio.ensure_future(metrics.watch_loop_lag())
    server = make_server(make_app(service), service)
    server.add_sockets(sockets)
    log.info("whisperd listening on http://%s:%s (engine %s via %s, %s)", config.WHISPER_API_HOST,
             sockets[0].getsockname()[1], config.WHISPER_ENGINE, config.WHISPER_CMD,
             "offline" if offline else "online")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: no new jobs; running jobs get %.0f s to finish", config.WHISPER_SHUTDOWN_GRACE_SECONDS)
    service.draining = True
    await service.stop(config.WHISPER_SHUTDOWN_GRACE_SECONDS)
    await asyncio.sleep(0.2)  # let sync waiters' last answers go out
    server.stop()
    await server.close_all_connections()
    Subprocess.uninitialize()
    lag_watch.cancel()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        config = config_module.load()
    except config_module.ConfigError as exc:
        print(f"whisperd: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.RUST_LOG)
    try:
        check_environment(config)
        log.info("ledger: %s; node %s, role %s", ledger_module.describe(config), config.node_name,
                 config.WHISPER_NODE_ROLE)
        if config.WHISPER_DB_URL:
            others = nodes.mark_shared_storage(config)
            log.info("job files under %s are shared with %d other node(s)%s", config.WHISPER_TMP_FILES, len(others),
                     (": " + ", ".join(others)) if others else "")
        report = recover(config)
        check_tokens(config, report.live_tokens)
        try:
            sockets = bind_sockets(config.WHISPER_API_PORT, config.WHISPER_API_HOST)
        except OSError as exc:
            raise StartupError(f"cannot listen on {config.WHISPER_API_HOST}:{config.WHISPER_API_PORT}: {exc.strerror}") from None
    except StartupError as exc:
        print(f"whisperd: {exc}", file=sys.stderr)
        return 1
    try:
        metrics.setup(config.metrics_dir)
    except OSError as exc:
        print(f"whisperd: cannot prepare WHISPER_METRICS_DIR={config.metrics_dir}: {exc.strerror}", file=sys.stderr)
        return 1
    offline = capabilities.decide_offline(config.WHISPER_OFFLINE)
    workers = config.worker_processes

    def child(_index: int) -> int:
        return asyncio.run(serve(config, sockets, offline))

    if workers == 1:
        return child(0)

    host = socket.gethostname()

    def died(pid: int) -> None:
        report = ledger_module.release_worker(config, f"{host}:{pid}", f"{host}:{os.getpid()}")
        for job_id, engine_pid in report.engine_pids.items():
            kill_orphan_group(engine_pid, job_id)
        metrics.process_died(pid)

    log.info("starting %d worker processes", workers)
    return run_workers(workers, child, died)
