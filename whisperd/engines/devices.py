"""One warm engine per device (WHISPER_DEVICES): a job goes to the device that holds its model, else the least busy.

`WHISPER_DEVICES=cuda:0,cuda:1` (or `cpu,cpu` to try it on a CPU box) starts one EngineWorker per
entry, each its own process with its own models, restarts and back-off. DeviceEngines is an Engine
over them:

- Placement: among the devices with a free slot (MAX_CONCURRENT_JOBS each, or one without
  ENABLE_CONCURRENCY) and a worker that is not failed, the one whose worker holds the job's model
  (or was just given a job for it, while it loads) wins; else the least busy, and between equals the
  one holding fewest models, so that a load evicts nothing it need not. The job's device
  and device index become that device's: the form's `device` is a CPU/GPU choice that the box's
  device list overrides.
- Isolation: a worker that dies takes back only the jobs it was running (EngineWorker's suspects
  and charges, unchanged); the other devices go on.
- `/status`'s engine keeps the single-worker keys (summed or joined) and adds `devices`: each
  device's state, pid, models, running jobs and restarts.
"""

from __future__ import annotations

import os
from typing import Any

from ..config import Config, device_batch_sizes
from .base import EngineOptions, EngineResult, ProgressCallback, StartedCallback
from .worker import EngineWorker, job_message, with_batch_size


class DeviceEngines:
    """The Engine of a box with several devices: one EngineWorker per WHISPER_DEVICES entry."""

    mode = "worker"

    def __init__(self, config: Config, offline: bool, devices: list[tuple[str, str]], slots: int,
                 threads: int | None) -> None:
        self.config = config
        self.times_words = config.WHISPER_WORD_TIMES
        self.devices = devices
        self.batch_sizes = device_batch_sizes(config.WHISPER_DEVICES)  # None: WHISPER_BATCH_SIZE
        self.slots = max(1, slots)
        self.workers = [EngineWorker(config, offline, self.slots, threads, device=device) for device in devices]
        self._busy = [0] * len(devices)
        self._placed: dict[str, int] = {}  # job id -> device number
        self._recent: list[set[str]] = [set() for _ in devices]  # models sent there, loaded or loading

    # -- placement

    def place(self, model: str) -> int:
        """The device number a job for `model` goes to."""
        name = os.path.basename(model.rstrip("/")) or model
        numbers = range(len(self.workers))
        usable = [n for n in numbers if self.workers[n].state != "failed"] or list(numbers)
        free = [n for n in usable if self._busy[n] < self.slots] or usable
        holding = [n for n in free if name in self.workers[n].loaded or name in self._recent[n]]
        # Least busy first; between equals, the one holding fewest models (a load there evicts nothing).
        chosen = min(holding or free,
                     key=lambda n: (self._busy[n], len(set(self.workers[n].loaded) | self._recent[n]), n))
        self._recent[chosen].add(name)
        return chosen

    # -- the Engine interface

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    async def run(self, job_id: str, opts: EngineOptions, on_progress: ProgressCallback | None = None,
                  on_started: StartedCallback | None = None, timeout: float | None = None) -> EngineResult:
        return await self.run_message(job_id, job_message(self.config, opts), on_progress, timeout)

    async def run_message(self, job_id: str, message: dict[str, Any], on_progress: ProgressCallback | None = None,
                          timeout: float | None = None) -> EngineResult:
        number = self.place(message["model"])
        device, index = self.devices[number]
        compute_type = self.config.WHISPER_CPU_COMPUTE_TYPE if device == "cpu" else self.config.WHISPER_CUDA_COMPUTE_TYPE
        # A job's own batch_size wins; else the device entry's =N; else WHISPER_BATCH_SIZE.
        message = {**with_batch_size(message, self.batch_sizes[number] or self.config.WHISPER_BATCH_SIZE),
                   "device": device, "device_index": int(index), "compute_type": compute_type or "default"}
        self._busy[number] += 1
        self._placed[job_id] = number
        try:
            return await self.workers[number].run_message(job_id, message, on_progress, timeout)
        finally:
            self._busy[number] -= 1
            self._placed.pop(job_id, None)
            self._recent[number] &= set(self.workers[number].loaded)  # forget loads that did not stay

    async def stop(self, job_id: str, because: str) -> None:
        number = self._placed.get(job_id)
        if number is not None:
            await self.workers[number].stop(job_id, because)

    def status(self) -> dict[str, Any]:
        snapshots = [worker.snapshot() for worker in self.workers]
        states = [s["state"] for s in snapshots]
        state = next((wanted for wanted in ("ready", "starting", "restarting", "failed") if wanted in states), "stopped")
        devices = []
        for number, ((device, index), snapshot) in enumerate(zip(self.devices, snapshots)):
            devices.append({"device": device if device == "cpu" else f"{device}:{index}", "device_index": int(index),
                            "slots": self.slots,
                            "batch_size": self.batch_sizes[number] or self.config.WHISPER_BATCH_SIZE,
                            **{k: v for k, v in snapshot.items() if k != "mode"},
                            "rss_mib": _rss_mib(snapshot["pid"])})
        loaded: list[str] = []
        for snapshot in snapshots:
            loaded += [name for name in snapshot["loaded_models"] if name not in loaded]
        return {"mode": "worker", "state": state, "pid": next((s["pid"] for s in snapshots if s["pid"]), None),
                "loaded_models": loaded, "running_jobs": sum(s["running_jobs"] for s in snapshots),
                "restarts": sum(s["restarts"] for s in snapshots),
                "reason": next((s["reason"] for s in snapshots if s["reason"]), None), "devices": devices}

    def healthy(self) -> tuple[bool, str | None]:
        """Healthy while one device can run jobs (the others' jobs go there meanwhile)."""
        answers = [worker.healthy() for worker in self.workers]
        if any(ok for ok, _ in answers):
            return True, None
        return False, "; ".join(f"{device}:{index}: {why}" for (device, index), (_, why) in zip(self.devices, answers))

    async def close(self) -> None:
        for worker in self.workers:
            await worker.close()


def _rss_mib(pid: int | None) -> float | None:
    """The engine process's resident memory (its GPU memory is not read here)."""
    try:
        for line in open(f"/proc/{pid}/status", encoding="ascii"):
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, TypeError):
        return None
    return None
