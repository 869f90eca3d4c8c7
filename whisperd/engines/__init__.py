"""The engines that run jobs, behind one interface (base.Engine): the spec's CLI per job, the warm
worker in this process, or the box's one warm worker shared by every HTTP process over a socket."""

from __future__ import annotations

import os

from ..config import Config
from .base import Engine, EngineOptions, EngineResult, killed_reason
from .cli import CliEngine, kill_orphan_group

__all__ = ["Engine", "EngineOptions", "EngineResult", "killed_reason", "kill_orphan_group", "make_engine",
           "worker_threads"]


def worker_threads(config: Config) -> int | None:
    """Threads per job: the cores shared by the jobs that may run at once (None: the engine's own choice)."""
    return max(1, (os.cpu_count() or 1) // config.max_running) if config.max_running > 1 else None


def make_engine(config: Config, offline: bool, shared_socket: str | None = None) -> Engine:
    """The engine this process runs jobs with. `shared_socket`: the engine host's socket, when the
    supervisor runs one warm worker for all HTTP processes."""
    if config.WHISPER_ENGINE == "cli":
        return CliEngine(config)
    if shared_socket is not None:
        from .shared import SharedEngine
        return SharedEngine(config, shared_socket)
    if len(config.devices) > 0:
        from .devices import DeviceEngines
        return DeviceEngines(config, offline, config.devices, config.slots_per_device, worker_threads(config))
    from .worker import EngineWorker
    # One warm worker serves every slot (docs/warm-engine.md: one shared model beats one per slot).
    return EngineWorker(config, offline, config.max_running, worker_threads(config))
