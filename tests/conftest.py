"""Test fixtures: real whisperd servers started by the shared launcher (tests/harness.py)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from harness import (FAKE_ENGINE, JFK, JFK_TEXT, REPO, SHARED, TOKEN, Server, _job_file, alive, free_port,  # noqa: F401
                     make_wav, metric, wait_until, words)

# `-m "not slow"` is the inner loop (tests/fast and the unit tests); these are left to the full run.
SLOW_FIXTURES = {"make_server"}  # a whisperd process of its own (and its engines): black-box, seconds each
SLOW_FILES = {"test_web.py", "test_web_live.py"}  # a real browser


# These API test files run twice: on SQLite (the default ledger) and on PostgreSQL (the
# cluster's). WHISPERD_TEST_BACKENDS=sqlite (or postgresql) runs one of the two only.
BOTH_BACKENDS = {"test_api", "test_security", "test_durability", "test_tenants", "test_tus", "test_voices"}
BACKENDS = [name for name in os.environ.get("WHISPERD_TEST_BACKENDS", "sqlite,postgresql").split(",") if name]
# WHISPERD_TEST_STORAGE=s3: every server make_server starts keeps its job files in a SeaweedFS
# started for the run (tests/seaweed.py), under a prefix of its own; Server.job_files() then
# lists its objects too. Unset (or "local"): the local directories, the default backend.
STORAGE = os.environ.get("WHISPERD_TEST_STORAGE", "local")
# These run a third time with their job files in S3 (SeaweedFS), on PostgreSQL as a shared-nothing
# cluster runs: "The whole API suite on the S3 backend" (issue 29), at the cost of one more pass of
# these two files only. Not added when WHISPERD_TEST_STORAGE=s3 already puts every server there.
ON_S3_TOO = {"test_api", "test_tus"}


def pytest_configure(config):
    config.addinivalue_line("markers", "engine: runs the real WhisperX engine (slow, needs scripts/setup-engine.sh)")
    config.addinivalue_line("markers", "slow: real engine, browser, soak or whisperd processes; "
                                       "set by pytest_collection_modifyitems, skipped by -m 'not slow'")
    config.addinivalue_line("markers", "sqlite_only: about the SQLite file itself (not run on PostgreSQL)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if (item.get_closest_marker("engine") or SLOW_FIXTURES & set(item.fixturenames)
                or item.path.name in SLOW_FILES):
            item.add_marker(pytest.mark.slow)


def pytest_generate_tests(metafunc):
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if module in BOTH_BACKENDS and "make_server" in metafunc.fixturenames \
            and not metafunc.definition.get_closest_marker("sqlite_only"):
        runs = [(name, STORAGE) for name in BACKENDS]
        if module in ON_S3_TOO and STORAGE != "s3" and BACKENDS:
            runs.append(("postgresql" if "postgresql" in BACKENDS else BACKENDS[0], "s3"))
        metafunc.parametrize(("backend", "storage"), runs, indirect=True,
                             ids=[name if storage == STORAGE else f"{name}-{storage}" for name, storage in runs])


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL for the whole run (each test gets a database of its own)."""
    from pg import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweed():
    """One SeaweedFS S3 server for the whole run (each server gets a prefix of its own)."""
    from seaweed import SeaweedServer

    store = SeaweedServer().start()
    yield store
    store.destroy()


@pytest.fixture
def storage(request) -> str:
    """Where the test's servers keep job files: "local" or "s3" (WHISPERD_TEST_STORAGE, or the test's parameter)."""
    return getattr(request, "param", STORAGE)


@pytest.fixture
def storage_env(request, storage):
    """The S3 settings a new server gets when the test runs on S3 (a new prefix per call); {} otherwise."""
    if storage != "s3":
        return lambda: {}
    return request.getfixturevalue("seaweed").storage_env


@pytest.fixture
def backend(request) -> str:
    return getattr(request, "param", "sqlite")


@pytest.fixture
def new_ledger_url(backend, request):
    """Makes a fresh PostgreSQL database's URL per call when the test runs on PostgreSQL; None on SQLite."""
    if backend != "postgresql":
        return lambda: None
    return request.getfixturevalue("postgres").new_database


@pytest.fixture
def make_server(tmp_path, new_ledger_url, storage_env):
    servers: list[Server] = []

    def factory(start: bool = True, **env) -> Server:
        if "WHISPER_STORAGE_URL" not in env:
            env = {**storage_env(), **env}
        server = Server(tmp_path / f"srv{len(servers)}", {k: str(v) for k, v in env.items()},
                        db_url=None if "WHISPER_DB_URL" in env else new_ledger_url())
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
