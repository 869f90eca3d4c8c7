"""This node in the cluster: its heartbeat, the leases of the jobs it runs, taking back expired ones.

Every WHISPER_LEASE_SECONDS / 3 a process of a node: records the node as alive (the nodes
table /status lists), renews the lease of each job it runs, and takes back every job whose
lease ran out on any node (requeued, or failed after WHISPER_MAX_ATTEMPTS). A job it no longer
holds (another node took it back) is stopped without a word written. When the ledger cannot
be reached, the node stops claiming; once it has gone a lease without renewing, another node
may already run its jobs, so it stops them all and writes nothing (their next runner does).
On SQLite (one box) only the heartbeat applies.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import json
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import IO, Callable

from .config import Config
from . import clock
from .jobs import now_iso
from .ledger import Ledger, Recovery
from .ledger.core import run_sync

log = logging.getLogger("whisperd.nodes")
from .jobfiles import CLUSTER_MARK, MARKERS  # noqa: E402  (MARKERS: one file per node that uses this storage)
LOCK_NAME = "node.lock"  # in a node's runtime directory: held (flock) while any of its processes lives
ABANDONED = "abandoned"  # the stop reason of a job whose lease this node lost
# On shared storage, a start leaves younger entries without a row alone: an upload on another
# node may be between its rename into place and its row's commit.
SWEEP_MIN_AGE_SECONDS = 3600.0


def mark_shared_storage(config: Config) -> list[str]:
    """Leave this node's marker beside the job files; returns the other nodes seen there
    (with several nodes, the storage must be one that all of them mount at the same path)."""
    directory = Path(config.WHISPER_TMP_FILES) / MARKERS
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / config.node_name
    marker.write_text(json.dumps({"node": config.node_name, "role": config.WHISPER_NODE_ROLE,
                                  "host": socket.gethostname(), "pid": os.getpid(), "started_at": now_iso()}) + "\n")
    return sorted(p.name for p in directory.iterdir() if p.name != config.node_name)


class NodeRefused(Exception):
    """This node must not start; the message is the one line the operator sees."""


def check_cluster_identity(config: Config, identity_of: Callable[[str], tuple[str, bool]],
                           places: dict[str, tuple[str, str, Callable[[], str | None], Callable[[str], None]]] | None = None) -> str:
    """Refuse a node whose WHISPER_TMP_FILES or WHISPER_OUTPUT_DIR is not the cluster's.

    The ledger holds the cluster's identity (`identity_of(proposed)` makes it the first time).
    The node that makes it marks both directories; every later node must find that mark in
    both, or it looks at another directory than the cluster does (a local disk, a mount that
    failed): its jobs would fail "the uploaded audio is missing" and its results answer 410.
    places: {setting: (its value, where its mark is, read, write)} where the job files are shared
    (the object store's, store/s3.py); by default the two directories.
    """
    if places is None:
        places = {}
        for setting in ("WHISPER_TMP_FILES", "WHISPER_OUTPUT_DIR"):
            path = Path(getattr(config, setting)).resolve()
            places[setting] = (str(path), str(path / CLUSTER_MARK), functools.partial(read_cluster_mark, path),
                               functools.partial(write_cluster_mark, path))
    identity, made = identity_of(str(uuid.uuid4()))
    for name, (root, where, read, write) in places.items():
        mark = read()
        if mark == identity:
            continue
        if mark is None and made:
            write(identity)
            log.info("marked %s=%s as the job directory of cluster %s", name, root, identity)
            continue
        if mark is None:
            raise NodeRefused(
                f"{name}={root} is not this cluster's shared directory (it has no {CLUSTER_MARK} mark, and the "
                f"cluster's directories carry {identity}): mount the shared directory there, or, if this empty "
                f"directory is to become the cluster's, write {identity} into {where}")
        raise NodeRefused(
            f"{name}={root} belongs to another cluster (its {CLUSTER_MARK} says {mark}, this ledger's cluster is "
            f"{identity}): point the node at this cluster's shared directory, or at the ledger that directory "
            "belongs to")
    return identity


def ledger_identity(config: Config, actor: str) -> Callable[[str], tuple[str, bool]]:
    """identity_of for check_cluster_identity: one short ledger session on a thread of its own
    (start-up runs before any event loop, and must leave none behind before workers fork)."""
    from .ledger import open_ledger

    def identity_of(proposed: str) -> tuple[str, bool]:
        async def ask() -> tuple[str, bool]:
            ledger = open_ledger(config, actor)
            await ledger.open()
            try:
                return await ledger.cluster_identity(proposed)
            finally:
                await ledger.close()

        return run_sync(ask)

    return identity_of


def read_cluster_mark(root: Path) -> str | None:
    try:
        return (root / CLUSTER_MARK).read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def write_cluster_mark(root: Path, identity: str) -> None:
    """Atomically (a rename), so a node starting beside never reads half a mark."""
    partial = root / f"{CLUSTER_MARK}.{os.getpid()}"
    partial.write_text(identity + "\n", encoding="utf-8")
    os.replace(partial, root / CLUSTER_MARK)


def hold_runtime_dirs(config: Config) -> list[IO[str]]:
    """Lock this node's runtime directory (engine socket, metrics) and an explicit
    WHISPER_METRICS_DIR for as long as the node lives; NodeRefused when another live node
    holds one. The lock (flock) goes with the last process of the node, even after kill -9.
    One box (no WHISPER_DB_URL) keeps its old paths and takes no lock."""
    if not config.WHISPER_DB_URL:
        return []
    held = []
    directories = [Path(config.runtime_dir)]
    if config.WHISPER_METRICS_DIR and Path(config.WHISPER_METRICS_DIR).resolve() != directories[0] / "metrics":
        directories.append(Path(config.WHISPER_METRICS_DIR).resolve())
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        handle = open(directory / LOCK_NAME, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip()[:200] or "another process"
            handle.close()
            for other in held:
                other.close()
            raise NodeRefused(f"{directory} is in use by another live whisperd node ({holder}): give each node on "
                              "this host its own WHISPER_NODE_NAME (and its own WHISPER_METRICS_DIR, if set)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"node {config.node_name}, pid {os.getpid()}, host {socket.gethostname()}\n")
        handle.flush()
        held.append(handle)
    return held


class NodeKeeper:
    def __init__(self, config: Config, ledger: Ledger, running: Callable[[], dict], wake: Callable[[], None],
                 on_taken_back: Callable[[Recovery], None]) -> None:
        self.config = config
        self.ledger = ledger
        self._running = running  # job id -> RunningJob, those this process runs now
        self._wake = wake
        self._on_taken_back = on_taken_back
        self.lease = config.WHISPER_LEASE_SECONDS
        self.interval = max(0.2, self.lease / 3)
        self.started_at = now_iso()
        self.connected = True  # False while the ledger cannot be reached: claim nothing
        self._last_renewed = clock.monotonic()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.beat()  # registered before the first request is served
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.beat()

    async def beat(self) -> None:
        """One round: heartbeat and renewals, then take-backs (each failure handled here)."""
        running = self._running()
        try:
            lost = await self.ledger.heartbeat(self.config.WHISPER_NODE_ROLE, self.started_at, list(running))
        except Exception as exc:
            await self._unreachable(exc, running)
            return
        self._last_renewed = clock.monotonic()
        if not self.connected:
            log.warning("ledger reachable again: claiming jobs again")
            self.connected = True
            self._wake()
        for job_id in lost:
            if job_id in running:
                log.error("job %s: its lease was taken back by another node; stopping it here", job_id)
                await running[job_id].stop(ABANDONED)
        if not self.ledger.shared:  # any live node takes back, an api node too (it may be the last)
            return
        try:
            report = await self.ledger.take_back_expired(self.config.WHISPER_MAX_ATTEMPTS)
        except Exception as exc:
            log.warning("could not look for expired leases: %s", exc.__class__.__name__)
            return
        if report.requeued or report.poisoned or report.canceled:
            log.warning("took back %d job(s) whose node stopped renewing its lease (%d requeued, %d failed, "
                        "%d canceled as asked)", len(report.requeued) + len(report.poisoned) + len(report.canceled),
                        len(report.requeued), len(report.poisoned), len(report.canceled))
            self._on_taken_back(report)  # the ended lose their files (settle.py)
            self._wake()

    async def _unreachable(self, exc: Exception, running: dict) -> None:
        if not self.ledger.shared:
            log.warning("node heartbeat failed: %s", exc.__class__.__name__)
            return
        if self.connected:
            log.error("ledger unreachable (%s): claiming nothing until it is back", exc.__class__.__name__)
            self.connected = False
        # Our leases were last renewed at _last_renewed; past one lease, another node may
        # have taken the jobs back: keep nothing we cannot prove is still ours.
        if running and clock.monotonic() - self._last_renewed >= self.lease - self.interval:
            log.error("could not renew the leases of %d job(s) in time: abandoning them (another node "
                      "runs them again)", len(running))
            await asyncio.gather(*(job.stop(ABANDONED) for job in list(running.values())))
