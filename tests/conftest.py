"""Test fixtures: real whisperd servers started by the shared launcher (tests/harness.py)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from harness import (FAKE_ENGINE, JFK, JFK_TEXT, REPO, SHARED, TOKEN, Server, alive, free_port,  # noqa: F401
                     make_wav, metric, wait_until, words)

# `-m "not slow"` is the inner loop (tests/fast and the unit tests); these are left to the full run.
SLOW_FIXTURES = {"make_server"}  # a whisperd process of its own (and its engines): black-box, seconds each
SLOW_FILES = {"test_web.py"}  # a real browser


def pytest_configure(config):
    config.addinivalue_line("markers", "engine: runs the real WhisperX engine (slow, needs scripts/setup-engine.sh)")
    config.addinivalue_line("markers", "slow: real engine, browser, soak or whisperd processes; "
                                       "set by pytest_collection_modifyitems, skipped by -m 'not slow'")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (item.get_closest_marker("engine") or SLOW_FIXTURES & set(item.fixturenames)
                or item.path.name in SLOW_FILES):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def make_server(tmp_path):
    servers: list[Server] = []

    def factory(start: bool = True, **env) -> Server:
        server = Server(tmp_path / f"srv{len(servers)}", {k: str(v) for k, v in env.items()})
        server.root.mkdir(parents=True, exist_ok=True)
        servers.append(server)
        return server.start() if start else server

    yield factory
    for server in servers:
        if server.proc is not None and server.proc.poll() is None:
            try:
                os.killpg(server.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            server.proc.wait(10)
    _kill_leftover_engines(tmp_path)


def _kill_leftover_engines(tmp_path: Path) -> None:
    # A failing test must not leave fake engines (or their sleeps) running into the next one.
    for run_log in tmp_path.rglob("engine-runs.jsonl"):
        for line in run_log.read_text().splitlines():
            run = json.loads(line)
            for pid in (run.get("pgid"), run.get("grandchild_pid")):
                if pid:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass


@pytest.fixture
def server(make_server) -> Server:
    return make_server()
