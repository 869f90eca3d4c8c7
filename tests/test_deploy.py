"""deploy/: the systemd unit is one systemd itself accepts, with whisperd's own commands."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "whisperd.service"
INSTALLED_AT = "/opt/whisperd"


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing (scripts/setup.sh --dev installs the systemd package)")
        pytest.skip("systemd-analyze is missing: apt-get install systemd (CI fails instead of skipping)")
    return found


def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart's program exists: point the unit at this checkout.
    text = UNIT.read_text().replace(INSTALLED_AT, str(REPO))
    if not Path(REPO / ".venv" / "bin" / "python").exists():
        text = text.replace(f"{REPO}/.venv/bin/python", sys.executable)
    unit = tmp_path / "whisperd.service"
    unit.write_text(text)
    done = subprocess.run([systemd_analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines() if "whisperd.service" in line]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr


def test_a_broken_unit_is_caught(tmp_path):
    unit = tmp_path / "whisperd.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_AT, str(REPO)).replace("KillMode=mixed", "KillMode=mixd"))
    done = subprocess.run([systemd_analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "kill mode" in done.stderr


def test_the_unit_runs_serve_stops_gently_and_keeps_secrets_out():
    text = UNIT.read_text()
    service = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    assert service["ExecStart"].endswith("whisperd.py serve")
    assert service["KillMode"] == "mixed"  # TERM to whisperd only: it drains and requeues itself
    assert int(service["TimeoutStopSec"]) > 10 + 5  # the default shutdown grace plus kill grace
    assert "HF_TOKEN=" not in text and "SECRET=" not in text
