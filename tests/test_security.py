"""Tokens, per-identity isolation and secrets, through real HTTP and the real command line."""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from pathlib import Path

import pytest

from conftest import Server
from whisperd.identity.tokens import RECHECK_SECONDS

TOKEN_SHAPE = re.compile(r"^wd_[0-9a-f]{8}_[0-9a-f]{48}$")


@pytest.fixture
def secure(make_server):
    """A server that checks the ledger's tokens (the harness default is the spec's any-token)."""

    def factory(start: bool = True, **env) -> Server:
        env.setdefault("WHISPER_API_ALLOW_ANY_TOKEN", "false")
        return make_server(start=start, **env)

    return factory


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- tokens ---------------------------------------------------------------------------------


def test_no_token_yet_refuses_everything_and_says_how_to_make_one(secure):
    server = secure()
    assert "no API token exists" in server.log()
    for token in (None, "whatever", "wd_00000000_" + "0" * 48):
        response = server.api("GET", "/status", token=token)
        assert response.status_code == 401
        assert "python whisperd.py token create --name" in response.json()["error"]
    assert server.submit().status_code == 401
    assert server.rows("SELECT id FROM jobs") == [] and server.files_gone()


def test_token_create_prints_it_once_last_and_stores_only_a_hash(secure):
    server = secure()
    done = server.cli("token", "create", "--name", "alice")
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip().splitlines()[-1]
    assert TOKEN_SHAPE.match(token)
    assert done.stdout.count(token) == 1 and token not in done.stderr
    prefix = token.split("_")[1]
    assert server.api("GET", "/status", token=token).status_code == 200

    (row,) = server.rows("SELECT * FROM api_tokens")
    assert row["name"] == "alice" and row["prefix"] == prefix and row["admin"] == 0
    assert row["algorithm"].startswith("pbkdf2_sha256$") and len(row["salt"]) == 32
    assert token not in "|".join(str(v) for v in tuple(row))
    secret_part = token.split("_")[2]
    for path in server.root.glob("whisperd.db*"):
        data = path.read_bytes()
        assert token.encode() not in data and secret_part.encode() not in data

    listing = server.cli("token", "list")
    assert listing.returncode == 0
    assert "alice" in listing.stdout and prefix in listing.stdout and "in force" in listing.stdout
    assert secret_part not in listing.stdout

    again = server.cli("token", "create", "--name", "alice")
    assert again.returncode == 1 and "already exists" in again.stderr and "revoke" in again.stderr


def test_wrong_revoked_and_expired_tokens_are_401(secure):
    server = secure()
    token = server.create_token("alice")
    prefix = token.split("_")[1]
    for wrong in (f"wd_{prefix}_" + "0" * 48, token[:-1] + ("0" if token[-1] != "0" else "1"), token + "0",
                  "wd_ffffffff_" + "0" * 48, "alice"):
        response = server.api("GET", "/status", token=wrong)
        assert response.status_code == 401, wrong
        assert response.json()["error"] == "invalid, expired or revoked token"

    assert server.api("GET", "/status", token=token).status_code == 200  # its row is now remembered
    assert server.cli("token", "revoke", "alice").returncode == 0
    server.pass_time(RECHECK_SECONDS)  # a row is remembered at most this long
    assert server.api("GET", "/status", token=token).status_code == 401
    missing = server.cli("token", "revoke", "alice")
    assert missing.returncode == 1 and "no token in force" in missing.stderr
    assert "revoked" in server.cli("token", "list").stdout
    fresh = server.create_token("alice")  # the name is free again
    assert fresh != token and server.api("GET", "/status", token=fresh).status_code == 200

    short = server.create_token("brief", "--expires-in", "0.00002")  # under two seconds
    assert server.api("GET", "/status", token=short).status_code == 200
    server.pass_time(2)
    assert server.api("GET", "/status", token=short).status_code == 401
    assert "expired" in server.cli("token", "list").stdout


def test_bad_token_commands_are_refused(secure):
    server = secure(start=False)
    for args, needle in ((["--name", "no spaces"], "--name"), (["--name", "a", "--expires-in", "0"], "--expires-in")):
        done = server.cli("token", "create", *args)
        assert done.returncode == 2 and needle in done.stderr


def test_last_use_is_recorded_but_not_on_every_request(secure):
    server = secure()
    token = server.create_token("alice")
    assert server.rows("SELECT last_used_at FROM api_tokens")[0][0] is None
    server.api("GET", "/status", token=token)
    (first,) = server.rows("SELECT last_used_at FROM api_tokens")[0]
    assert first and first.endswith("Z")
    for _ in range(5):
        assert server.api("GET", "/status", token=token).status_code == 200
    assert server.rows("SELECT last_used_at FROM api_tokens")[0][0] == first
    assert first in server.cli("token", "list").stdout


def test_any_token_needs_the_explicit_setting_and_is_warned_about(make_server):
    server = make_server()  # the harness sets WHISPER_API_ALLOW_ANY_TOKEN=true
    assert "WHISPER_API_ALLOW_ANY_TOKEN=true" in server.log()
    assert server.api("GET", "/status", token="anything-at-all").status_code == 200


def test_site_validator_is_pluggable(secure, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "mysite_auth.py").write_text(
        "from whisperd.identity.auth import Identity\n"
        "async def check(token):\n"
        "    return {'alice-secret': 'alice', 'root-secret': Identity('root', admin=True)}.get(token)\n"
    )
    server = secure(WHISPER_TOKEN_VALIDATOR="mysite_auth:check", PYTHONPATH=str(site))
    assert server.api("GET", "/status", token="nope").status_code == 401
    response = server.submit(token="alice-secret", diarize="false")
    assert response.status_code == 202
    job_id = response.json()["job_id"]
    assert server.rows("SELECT owner FROM jobs")[0][0] == "alice"
    assert server.api("GET", f"/transcription/{job_id}", token="root-secret").status_code == 200


def test_broken_validator_setting_stops_start_up(secure):
    server = secure(start=False, WHISPER_TOKEN_VALIDATOR="no_such_module_here:check")
    server.start(wait=False)
    assert server.proc.wait(20) == 1
    assert "cannot import no_such_module_here" in server.log()


# -- isolation ------------------------------------------------------------------------------


def test_jobs_are_invisible_to_other_identities_and_admins_see_all(secure):
    server = secure()
    alice, bob = server.create_token("alice"), server.create_token("bob")
    admin = server.create_token("ops", "--admin")
    blocker = server.submit(token=alice, diarize="false", prompt="fake:slow").json()["job_id"]
    queued = server.submit(token=alice, diarize="false").json()["job_id"]
    kept = server.submit(token=alice, diarize="false").json()["job_id"]
    assert server.rows("SELECT DISTINCT owner FROM jobs")[0][0] == "alice"

    unknown = str(uuid.uuid4())
    for job_id in (blocker, queued):
        for method, path in (("GET", f"/transcription/{job_id}"), ("GET", f"/transcription/{job_id}/result"),
                             ("DELETE", f"/transcription/{job_id}")):
            theirs = server.api(method, path, token=bob)
            nobodys = server.api(method, path.replace(job_id, unknown), token=bob)
            assert theirs.status_code == 404, (method, path)
            assert theirs.json()["error"].replace(job_id, unknown) == nobodys.json()["error"]
    assert server.api("GET", f"/transcription/{queued}", token=alice).json()["status"] == "Queued"

    status = server.api("GET", "/status", token=bob).json()
    assert status["queue_state"]["queued_jobs"] + status["queue_state"]["processing_jobs"] == 3
    assert alice not in str(status) and queued not in str(status)

    assert server.api("GET", f"/transcription/{queued}", token=admin).status_code == 200
    assert server.api("DELETE", f"/transcription/{queued}", token=admin).json()["success"] is True
    (event,) = server.rows("SELECT actor FROM job_events WHERE job_id=? AND event='canceled'", (queued,))
    assert event[0] == "ops"
    server.wait_status(kept, token=admin)
    result = server.api("GET", f"/transcription/{kept}/result", token=alice)
    assert result.status_code == 200


def test_auth_disabled_is_one_identity(secure):
    server = secure(ENABLE_AUTHORIZATION="false")
    job_id = server.submit(token=None, diarize="false").json()["job_id"]
    assert server.api("GET", f"/transcription/{job_id}", token="someone-else").status_code == 200


# -- secrets --------------------------------------------------------------------------------


def _cmdlines() -> list[bytes]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found.append((entry / "cmdline").read_bytes())
            except OSError:
                continue
    return found


@pytest.mark.parametrize("level", ["trace", "info"])
def test_secrets_stay_out_of_argv_logs_ledger_and_error_bodies(secure, level):
    hf_token = "hf_" + uuid.uuid4().hex
    server = secure(RUST_LOG=level, WHISPER_OFFLINE="false")
    token = server.create_token("alice")
    bodies = []

    response = server.submit(token=token, diarize="true", hf_token=hf_token, prompt="fake:slow")
    assert response.status_code == 202
    bodies.append(response.text)
    job_id = response.json()["job_id"]
    deadline = time.monotonic() + 10
    while not server.engine_runs() and time.monotonic() < deadline:
        time.sleep(0.05)
    for cmdline in _cmdlines():  # while the engine runs
        assert token.encode() not in cmdline and hf_token.encode() not in cmdline
    server.wait_status(job_id, token=token)
    for method, path, kwargs in (
        ("GET", f"/transcription/{job_id}/result", {}),
        ("GET", f"/transcription/{job_id}/result", {}),  # 410 the second time
        ("GET", f"/transcription/{uuid.uuid4()}", {}),
        ("POST", "/transcription", {"data": {"hf_token": hf_token, "model": "../x"}, "files": {"file": ("a.wav", b"x")}}),
        ("POST", "/transcription", {"data": {"hf_token": hf_token}, "files": {"file": ("a.txt", b"not audio")}}),
        ("POST", "/transcription", {"json": {"hf_token": hf_token}}),
    ):
        bodies.append(server.api(method, path, token=token, **kwargs).text)
    bodies.append(server.api("GET", "/status", token=token + "x").text)
    bodies.append(server.api("GET", "/status", headers={"Authorization": f"Basic {token}"}, token=None).text)

    sync = server.submit(token=token, diarize="true", hf_token=hf_token, sync="true")
    assert sync.status_code == 200
    bodies.append(sync.text)
    server.stop()

    (run, second) = server.engine_runs()
    for argv in (run["argv"], second["argv"]):
        assert token not in " ".join(argv) and hf_token not in " ".join(argv)
    assert run["hf_token_sha256"] == hashlib.sha256(hf_token.encode()).hexdigest()  # it did reach the engine
    log = server.log()
    assert "/transcription" in log  # the access log ran
    assert token not in log and hf_token not in log and token.split("_")[2] not in log
    assert "Authorization" not in log and "hf_token" not in log
    for path in server.root.rglob("whisperd.db*"):
        data = path.read_bytes()
        assert token.encode() not in data and hf_token.encode() not in data
    for body in bodies:
        assert token not in body and hf_token not in body
    assert server.files_gone()


def test_hf_token_file_readable_by_others_is_warned_about_by_name(make_server):
    server = make_server(start=False)
    token_file = server.root / "hf_token.txt"
    token_file.write_text("hf_" + "x" * 20 + "\n")
    token_file.chmod(0o640)
    server.start()
    assert f"WHISPER_HF_TOKEN_FILE {token_file} is readable by group or others: run chmod 600 {token_file}" in server.log()
    server.stop()

    quiet = make_server(start=False)
    private = quiet.root / "hf_token.txt"
    private.write_text("hf_" + "y" * 20 + "\n")
    os.chmod(private, 0o600)
    quiet.start()
    assert "chmod 600" not in quiet.log()
    assert "hf_" + "y" * 20 not in quiet.log()


def test_tokens_work_in_every_worker_process(secure):
    server = secure(HTTP_WORKER_NUMBER="2")
    token = server.create_token("alice")
    assert all(server.api("GET", "/status", token=token).status_code == 200 for _ in range(20))
    server.cli("token", "revoke", "alice")
    server.pass_time(RECHECK_SECONDS)  # every process reads the row again within this
    assert all(server.api("GET", "/status", token=token).status_code == 401 for _ in range(20))
