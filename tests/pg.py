"""A throwaway PostgreSQL for the tests: Debian's binaries, initdb and pg_ctl in a temporary
directory, on a free loopback port, as the postgres user when we are root (initdb refuses root)."""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

PASSWORD = "pg-secret-" + uuid.uuid4().hex[:12]  # the tests look for it in logs: it must never appear


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (scripts/setup.sh does)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """One cluster; each test gets a database of its own (database_url)."""

    def __init__(self) -> None:
        self.bin = _bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="whisperd-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.user = "whisperd"
        self._as_postgres = os.geteuid() == 0

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, check=check, timeout=120, cwd="/")

    def start(self) -> "PostgresServer":
        if self._as_postgres:
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        os.chmod(self.root, 0o755)
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self._as_postgres:
            os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
        # Password authentication over TCP, as in a real deployment; trust on the local socket
        # lets the harness's own psql calls go without one.
        self._run("initdb", "-D", str(self.data), "-U", self.user, "--pwfile", str(pwfile),
                  "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--no-sync")
        pwfile.unlink()
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"
                   " -c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "postgres.log"),
                  "-w", "-t", "60", "start")
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop the server hard (every connection drops), wait, start it again."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        if down_seconds:
            import time
            time.sleep(down_seconds)
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"
                   " -c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "postgres.log"),
                  "-w", "-t", "60", "start")

    def url(self, database: str, password: str = PASSWORD) -> str:
        return f"postgresql://{self.user}:{password}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:16]
        self.psql("postgres", f"CREATE DATABASE {name}")
        return self.url(name)

    def psql(self, database: str, sql: str) -> str:
        """psql on the local socket: what an operator would type."""
        done = self._run("psql", "-h", str(self.root), "-p", str(self.port), "-U", self.user, "-d", database,
                         "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql)
        return done.stdout


def fetch(url: str, sql: str, params: tuple = ()) -> list:
    """Rows of one query; `?` placeholders (the SQLite tests' style) become $1, $2, ..."""
    import asyncpg

    parts = sql.split("?")
    text = parts[0] + "".join(f"${i}{part}" for i, part in enumerate(parts[1:], start=1))

    async def run():
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetch(text, *params)
        finally:
            await conn.close()

    return asyncio.run(run())
