"""Start-up and shutdown: check the configuration, recover the ledger, serve, stop gracefully."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import stat
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

from tornado.netutil import bind_sockets
from tornado.process import Subprocess

from . import capabilities, config as config_module, ledger as ledger_module, metrics, nodes, probe
from .app import make_app, make_server
from .identity.auth import load_validator
from .config import Config
from .engines.shared import serve_host, socket_path
from .jobfiles import JobFiles, is_job_id
from .store import StoreRefused, open_files
from .service import Service
from .settle import settle
from .supervisor import run_workers

log = logging.getLogger("whisperd")
REQUESTS_GRACE_SECONDS = 5.0  # at shutdown, how long answers under way may take before the ledger closes
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
    # boto3's debug lines carry request headers (the access key id, signatures): never in our log.
    for name in ("boto3", "botocore", "s3transfer", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def check_environment(config: Config) -> None:
    """Warn about what will hurt later; raise StartupError for what cannot work at all."""
    files = open_files(config)
    try:
        files.check()  # the object store's bucket and credentials (store/s3.py); nothing on local disks
    except StoreRefused as exc:
        raise StartupError(str(exc)) from None
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
    for name, program in (("WHISPER_FFPROBE", config.WHISPER_FFPROBE), ("WHISPER_FFMPEG", config.WHISPER_FFMPEG)):
        if not probe.available(program):
            log.error("%s=%s not found (install ffmpeg): every upload is refused with 503 until it is, since "
                      "nothing unchecked may reach the engine", name, program)
    free_mb = files.free_disk_mb()
    if free_mb < config.WHISPER_MIN_FREE_DISK_MB:
        log.warning("only %.0f MB free under WHISPER_TMP_FILES/WHISPER_OUTPUT_DIR, below WHISPER_MIN_FREE_DISK_MB=%d:"
                    " uploads are refused with 507 until space is freed", free_mb, config.WHISPER_MIN_FREE_DISK_MB)
    check_auth(config)


_held_runtime_dirs: list = []  # this node's runtime directory locks, held for the process's life


def check_node_paths(config: Config) -> None:
    """A cluster node: its runtime paths are its own (no other live node holds them), and its
    job directories are the cluster's (marked with the identity the ledger holds). Before the
    start-up sweep: a node pointed at another directory must not sweep it."""
    try:
        _held_runtime_dirs.extend(nodes.hold_runtime_dirs(config))
    except nodes.NodeRefused as exc:
        raise StartupError(str(exc)) from None
    identity = check_job_store_identity(config)
    log.info("cluster %s; node runtime files under %s", identity, config.runtime_dir)


def check_job_store_identity(config: Config) -> str:
    """The job files are the ledger's: the identity the ledger holds is marked where they live
    (the object store, or the two directories), and a ledger that does not match them (reset,
    restored from elsewhere, another cluster's) refuses to start before its sweep could delete
    what it does not know. On one box, run for the object store only: the local directories
    have their own guard (sweep_job_dirs: quarantine, never delete)."""
    try:
        ledger_module.prepare_schema(config)  # the identity's table (migration 0013)
        return nodes.check_cluster_identity(
            config, nodes.ledger_identity(config, f"{socket.gethostname()}:{os.getpid()}"),
            open_files(config).cluster_marks())  # the object store's mark, or (None) the directories
    except (nodes.NodeRefused, ledger_module.LedgerUnavailable) as exc:
        raise StartupError(str(exc)) from None


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


# A ledger with fewer job rows than this many unknown job directories beside it looks reset
# (deleted, replaced, or its WAL lost): start-up refuses unless WHISPER_ACCEPT_LEDGER_RESET=true.
LEDGER_RESET_MIN_DIRS = 5


def recover(config: Config, count_ends: bool = True) -> ledger_module.Recovery:
    """Bring the ledger and the disk back to a consistent state after whatever happened last.
    count_ends: set up the metrics (once the ledger is known to open) so that the ends recovery
    settles are counted."""
    actor = f"{socket.gethostname()}:{os.getpid()}"
    try:
        report = ledger_module.prepare(config, actor)
    except ledger_module.LedgerUnavailable as exc:
        raise StartupError(str(exc)) from None
    if count_ends:
        try:
            metrics.setup(config.metrics_dir)
        except OSError as exc:
            raise StartupError(f"cannot prepare WHISPER_METRICS_DIR={config.metrics_dir}: {exc.strerror}") from None
    files = open_files(config)
    settle(report, files.remove_all)  # the previous run's engines stopped, ended jobs' files gone, ends counted
    if report.requeued:
        log.warning("requeued %d job(s) left Processing by the previous run", len(report.requeued))
    if report.poisoned:
        log.error("failed %d job(s) that crashed %d times", len(report.poisoned), config.WHISPER_MAX_ATTEMPTS)
    if report.canceled:
        log.warning("canceled %d job(s) whose cancel was asked for before the previous run ended",
                    len(report.canceled))
    if report.webhooks_pending:
        log.warning("%d webhook notice(s) the previous run left unsent are sent again", len(report.webhooks_pending))
    sweep_job_dirs(config, files, report)
    return report


def sweep_job_dirs(config: Config, files: JobFiles, report: ledger_module.Recovery) -> None:
    """Directories of jobs that ended go; those the ledger does not know are quarantined, never
    deleted: the ledger may be the one that lost something (a deleted WAL, a restored backup)."""
    # On shared storage (a cluster), younger entries may be another node's upload whose row is
    # about to be committed: they stay until a later start (nodes.SWEEP_MIN_AGE_SECONDS).
    min_age = nodes.SWEEP_MIN_AGE_SECONDS if config.WHISPER_DB_URL else 0.0
    leftovers = files.leftovers(report.live_jobs, min_age)
    names = {path.name for path in leftovers}
    try:
        known = ledger_module.known_jobs(config, {name for name in names if is_job_id(name)})
    except ledger_module.LedgerUnavailable as exc:
        raise StartupError(str(exc)) from None
    unknown_jobs = {name for name in names if is_job_id(name) and name not in known}
    if len(unknown_jobs) >= LEDGER_RESET_MIN_DIRS and len(unknown_jobs) > report.job_rows:
        if not config.WHISPER_ACCEPT_LEDGER_RESET:
            raise StartupError(
                f"the ledger WHISPER_DB_PATH={config.db_path} looks reset: it knows {report.job_rows} job(s) but "
                f"{len(unknown_jobs)} job directories it does not know are on disk. Restore the ledger (with its "
                "-wal file), or set WHISPER_ACCEPT_LEDGER_RESET=true to start anyway (the directories are then "
                "moved to WHISPER_TMP_FILES/.quarantine, not deleted)")
        log.error("WHISPER_ACCEPT_LEDGER_RESET=true: starting beside %d job directories the ledger does not know",
                  len(unknown_jobs))
    removed, quarantine = files.sweep(report.live_jobs, known, min_age)
    removed += files.sweep_store(report.live_jobs, min_age)  # the object store's (store/s3.py); local: none
    if removed:
        log.info("removed %d file(s) or directories of jobs that ended", len(removed))
    if quarantine is not None:
        log.error("moved %d file(s) or directories the ledger does not know to %s (inspect, then delete them)",
                  sum(1 for _ in quarantine.glob("*/*")), quarantine)


def prepare_node(config: Config, count_ends: bool = True) -> ledger_module.Recovery:
    """Before any event loop (and any fork): the directories checked, the ledger migrated and
    recovered, the metrics set up, what recovery found settled (settle.py), the leftovers swept.
    serve() and the fast tests' harness (which keeps no metrics: count_ends=False) start here."""
    check_environment(config)
    log.info("ledger: %s; node %s, role %s", ledger_module.describe(config), config.node_name,
             config.WHISPER_NODE_ROLE)
    if not config.WHISPER_DB_URL and config.WHISPER_STORAGE_URL:
        check_job_store_identity(config)
    if config.WHISPER_DB_URL:
        check_node_paths(config)
        others = nodes.mark_shared_storage(config)
        if config.WHISPER_STORAGE_URL:  # the directories are this node's scratch; the store is shared
            log.info("job files in %s; this node's scratch under %s", config.WHISPER_STORAGE_URL, config.WHISPER_TMP_FILES)
        else:
            log.info("job files under %s are shared with %d other node(s)%s", config.WHISPER_TMP_FILES, len(others),
                     (": " + ", ".join(others)) if others else "")
    report = recover(config, count_ends)
    check_tokens(config, report.live_tokens)
    return report


async def start_service(config: Config, offline: bool, **options: Any) -> Service:
    """A worker process's service, started (Service.start: its parts in order)."""
    service = Service(config, offline, **options)
    Subprocess.initialize()  # before the service starts its engine worker: its exit needs SIGCHLD
    await service.start()
    return service


async def stop_service(service: Service, grace_seconds: float, requests_grace: float = REQUESTS_GRACE_SECONDS,
                       close_http: Callable[[], Awaitable[None]] | None = None) -> None:
    """Service.stop (its parts in reverse), then SIGCHLD handling given back."""
    await service.stop(grace_seconds, requests_grace, close_http)
    Subprocess.uninitialize()


async def serve(config: Config, sockets: list[socket.socket], offline: bool, shared_engine: str | None = None) -> int:
    service = await start_service(config, offline, shared_engine=shared_engine)
    # What start-up made lives as long as the process: out of the collector's sight, so that a
    # collection during a request does not walk it again (a tail-latency cost, paid once here).
    gc.collect()
    gc.freeze()
    lag_watch = asyncio.ensure_future(metrics.watch_loop_lag())  # kept here, cancelled at the end
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
    # From here every new request gets 503 with Retry-After without touching the ledger
    # (handlers/base.py); the HTTP server stops, and the ledger closes, only once the requests
    # under way have their answers (Service.parts: the requests part).

    async def close_http() -> None:
        server.stop()
        await server.close_all_connections()

    await stop_service(service, config.WHISPER_SHUTDOWN_GRACE_SECONDS, REQUESTS_GRACE_SECONDS, close_http)
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
        prepare_node(config)
        try:
            sockets = bind_sockets(config.WHISPER_API_PORT, config.WHISPER_API_HOST)
        except OSError as exc:
            raise StartupError(f"cannot listen on {config.WHISPER_API_HOST}:{config.WHISPER_API_PORT}: {exc.strerror}") from None
    except StartupError as exc:
        print(f"whisperd: {exc}", file=sys.stderr)
        return 1
    offline = capabilities.decide_offline(config.WHISPER_OFFLINE)
    workers = config.worker_processes

    if workers == 1:
        return asyncio.run(serve(config, sockets, offline))

    # One warm engine for the box, not one per HTTP process (each would load its own model).
    # WHISPER_NODE_ROLE=api runs no job: no engine host either.
    shared = socket_path(config) if config.WHISPER_ENGINE == "worker" and config.runs_jobs else None
    if shared and len(shared.encode()) > 107:  # sun_path's limit
        print(f"whisperd: the engine host's socket path {shared} is longer than a Unix socket allows (107 bytes):"
              " put WHISPER_DB_PATH in a shorter directory", file=sys.stderr)
        return 1

    def child(_index: int) -> int:
        return asyncio.run(serve(config, sockets, offline, shared))

    def engine_host() -> int:
        for sock in sockets:
            sock.close()  # the host serves no HTTP
        return asyncio.run(serve_host(config, offline, shared))

    host = socket.gethostname()

    def died(pid: int) -> None:
        report = ledger_module.release_worker(config, f"{host}:{pid}", f"{host}:{os.getpid()}")
        metrics.process_died(pid)
        settle(report, open_files(config).remove_all)

    log.info("starting %d worker processes%s", workers, " and the engine host" if shared else "")
    return run_workers(workers, child, died, engine_host if shared else None)
