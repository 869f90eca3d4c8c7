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


def architecture_map() -> dict[str, int]:
    """Every path docs/architecture.md's module map names (relative to the repository), with its line."""
    text = (DOCS / "architecture.md").read_text()
    section = text[text.index("## Module map"):]
    block = section[section.index("```\n") + 4:section.index("```\n", section.index("```\n") + 4)]
    named: dict[str, int] = {}
    folders: list[tuple[int, str]] = []  # (indent, path) of the folders above the current line
    for number, line in enumerate(block.splitlines(), 1):
        if not line.strip() or line.startswith(" " * 28):
            continue  # a description's continuation
        indent = len(line) - len(line.lstrip())
        while folders and folders[-1][0] >= indent:
            folders.pop()
        name = line.split()[0]
        if not re.fullmatch(r"[\w.]+(/[\w.]+)*/?", name) or name == "...":
            continue
        path = (folders[-1][1] if folders else "") + name
        named[path] = number
        if name.endswith("/"):
            folders.append((indent, path))
    return named


def test_every_path_the_architecture_map_names_exists():
    named = architecture_map()
    assert len(named) > 50
    missing = [path for path in named if not (REPO / path).exists()]
    assert not missing, f"docs/architecture.md names what the tree does not have: {missing}"


def test_every_module_is_in_the_architecture_map():
    named = architecture_map()
    modules = sorted(str(path.relative_to(REPO)) for path in (REPO / "whisperd").rglob("*.py")
                     if "__pycache__" not in path.parts)
    absent = [module for module in modules if module not in named]
    assert not absent, f"docs/architecture.md's module map leaves out {absent}: add a line for each"


def test_no_module_cites_a_file_the_repository_does_not_have():
    for path in (REPO / "whisperd").rglob("*.py"):
        for cited in re.findall(r"\b([A-Z][A-Z_]+\.md)\b", path.read_text()):
            assert (REPO / cited).exists() or (DOCS / cited).exists(), f"{path.relative_to(REPO)} cites {cited}"


def test_every_environment_variable_the_server_reads_is_documented():
    from whisperd.config import SETTINGS
    from whisperd.configdoc import FOREIGN_ENVIRONMENT
    from whisperd.engines.base import PASSED_ENV, PASSED_PREFIXES

    documented = {setting.name for setting in SETTINGS}
    documented |= {name for names, _ in FOREIGN_ENVIRONMENT for name in names.split(", ")}
    read = set(PASSED_ENV) | {prefix + "*" for prefix in PASSED_PREFIXES}
    for path in (REPO / "whisperd").rglob("*.py"):
        read |= set(re.findall(r"""(?:environ\.get\(|environ\[|getenv\()["']([A-Z][A-Z0-9_]+)["']""", path.read_text()))
    assert {"HF_HOME", "HF_HUB_CACHE"} <= read
    undocumented = sorted(read - documented)
    assert not undocumented, f"read by the server but documented nowhere (configdoc.FOREIGN_ENVIRONMENT): {undocumented}"
