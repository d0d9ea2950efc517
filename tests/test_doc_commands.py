"""Every ``fedeq simulate`` and ``fedeq sweep`` command shown in the docs and the README is valid as written:
each runs with ``--dry-run`` (the config, the overrides and the grids validate, the plan prints) and exits 0.
The pages' runnable examples are run in full by the tests of their features."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from fedeq.cli.main import main
from tests.doc_blocks import fenced_blocks

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
SKIP = (
    "<",
    "--resume",
    "$",
    "...",
    "data.name=hf",
    "plugins=[my_data.py]",
    "my_run.yaml",
    "ray.address=auto",
)
"""Not commands to run here: placeholders, shell variables, a run folder to resume, and commands on the
user's own files, a Hugging Face download or a running Ray cluster (``tests/test_hf_data.py``
and ``tests/test_ray_cluster.py`` run those on local stand-ins)."""


def _commands() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for lang, block in fenced_blocks(page):
            if lang not in ("bash", "sh", "shell", "console"):
                continue
            text = block.replace("\\\n", " ")
            for line in text.splitlines():
                line = line.split(" #", 1)[0].strip().removeprefix("$ ")
                if line.startswith(("fedeq simulate", "fedeq sweep")) and not any(s in line for s in SKIP):
                    found.append((page.name, line))
    return found


COMMANDS = _commands()


def test_the_pages_show_commands() -> None:
    pages = {page for page, _ in COMMANDS}
    assert {"personalization.md", "heterogeneity.md", "sweep.md", "README.md"} <= pages


@pytest.mark.parametrize(("page", "line"), COMMANDS, ids=[f"{p}:{i}" for i, (p, _) in enumerate(COMMANDS)])
def test_documented_command_is_valid(page: str, line: str, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(ROOT)
    args = shlex.split(line)[1:]
    args = [a for a in args if a not in ("--quiet", "--verbose", "--overwrite")]
    code = main([*args, "--dry-run"])
    err = capsys.readouterr().err
    assert code == 0, f"{page}: {line}\n{err[-2000:]}"
