"""docs/performance.md is generated from bench/results/latest.json, never edited by hand."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

REPORT = REPO / "bench" / "report.py"


def test_performance_page_is_what_the_latest_run_gives():
    done = subprocess.run([sys.executable, str(REPORT), "--check"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_changed_figure_makes_the_page_stale(tmp_path):
    report = json.loads((REPO / "bench" / "results" / "latest.json").read_text())
    row = next(r for r in report["table"] if r["met"] is not None)
    row["value"], row["met"] = "p50 999.99 / p99 999.99 ms", not row["met"]
    changed = tmp_path / "latest.json"
    changed.write_text(json.dumps(report))
    page = tmp_path / "performance.md"
    assert subprocess.run([sys.executable, str(REPORT), "--results", str(changed), "--out", str(page)]).returncode == 0
    assert "999.99" in page.read_text()
    stale = subprocess.run([sys.executable, str(REPORT), "--results", str(changed), "--check"],
                           cwd=REPO, capture_output=True, text=True)
    assert stale.returncode == 1 and "not what" in stale.stderr
