"""The documentation stays true: every sqlite3 recipe of docs/operations.md runs on a real ledger,
docs/performance.md is what bench/report.py makes of bench/results/latest.json, the README is
short, and no doc links to a file that is not there."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from whisperd.ledger import sqlite as ledger_sqlite

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


def audit_recipes() -> list[str]:
    text = (DOCS / "operations.md").read_text()
    section = text[text.index("## Auditing with sqlite3"):]
    block = section[section.index("```sh"):section.index("```\n", section.index("```sh") + 5)]
    return [line for line in block.splitlines() if line.startswith("sqlite3 ")]


@pytest.fixture(scope="module")
def ledger_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ledger") / "whisperd.db"
    ledger_sqlite.prepare(str(path), 3, "docs-test")
    return path


def test_there_are_audit_recipes():
    assert len(audit_recipes()) >= 8


@pytest.mark.parametrize("recipe", audit_recipes())
def test_each_audit_recipe_runs(recipe, ledger_path):
    if shutil.which("sqlite3") is None:
        pytest.fail("sqlite3 is missing (scripts/setup.sh installs it)")
    command = recipe.replace("$DB", str(ledger_path)).replace("JOB_ID", "00000000-0000-4000-8000-000000000000")
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and not done.stderr, done.stderr


def test_readme_is_short_and_starts_with_the_two_commands():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    commands = re.findall(r"^\./scripts/\S+", readme, re.M)
    assert commands[:2] == ["./scripts/serve.sh", "./scripts/test.sh"]


def test_performance_doc_is_generated_from_the_latest_results():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "report.py"), "--check"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_relative_link_in_the_docs_points_to_a_file():
    for doc in [REPO / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(REPO)} links to {target}, which is not there"
