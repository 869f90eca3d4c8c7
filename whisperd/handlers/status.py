"""/status: the configuration a client may rely on and the live queue counts, in the spec's shape."""

from __future__ import annotations

from .base import BaseHandler


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


class StatusHandler(BaseHandler):
    async def get(self) -> None:
        config = self.service.config
        error = nodes = None
        try:
            if self.identity.admin:  # the counts and the cluster's nodes in one read
                counts, nodes = await self.service.queue_counts_and_nodes()
            else:
                counts = await self.service.queue_counts()
        except Exception as exc:  # the spec's shape has a place for this: report, don't fail
            counts, error = {"Queued": None, "Processing": None}, f"cannot read the queue: {exc.__class__.__name__}"
        body = {
            "server": {
                "host": config.WHISPER_API_HOST,
                "port": str(config.WHISPER_API_PORT),
                "timeout": config.WHISPER_API_TIMEOUT,
                "keepalive": config.WHISPER_API_KEEPALIVE,
                "worker_number": config.worker_processes,
            },
            "processing": {
                "concurrent_mode": config.ENABLE_CONCURRENCY,
                "max_concurrent_jobs": config.MAX_CONCURRENT_JOBS,
                "device": config.WHISPER_DEVICE,
                "device_index": config.WHISPER_DEVICE_INDEX,
                "default_output_format": config.WHISPER_OUTPUT_FORMAT,
                "default_sync_mode": config.DEFAULT_SYNC_MODE,
                "sync_timeout": _number(config.SYNC_REQUEST_TIMEOUT_SECONDS),
            },
            "resources": {
                "max_file_size": config.MAX_FILE_SIZE,
                "job_retention_hours": _number(config.WHISPER_JOB_RETENTION_HOURS),
                "cleanup_interval_hours": _number(config.WHISPER_CLEANUP_INTERVAL_HOURS),
            },
            "security": {"authorization_enabled": config.ENABLE_AUTHORIZATION},
            "queue_state": {"queued_jobs": counts["Queued"], "processing_jobs": counts["Processing"]},
            "error": error,
        }
        # Beyond the spec, for admins: this node (its name is the host name by default), every node of
        # the cluster and the warm engine's state.
        if self.identity.admin:
            body["node"] = {"name": config.node_name, "role": config.WHISPER_NODE_ROLE}
            body["engine"] = self.service.engine_status()  # beyond the spec: the warm engine's state
            body["nodes"] = nodes  # null when the ledger cannot say
        else:
            # Where the server listens and how its engine is doing (pid, failure reasons) help an
            # attacker more than a client: an ordinary token sees the rest of the spec's fields.
            del body["server"]["host"], body["server"]["port"]
        self.send_json(body)
