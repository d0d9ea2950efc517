"""The documentation pages: no references outside the repository, the README's model list, the tutorial."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from fedeq.registry import MODELS
from tests.doc_blocks import fenced_blocks, run_doc

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
TUTORIAL = ROOT / "docs" / "tutorial.md"

PARENT_PATH = re.compile(r"(?<![\w.:/-])((?:\.\./)+[\w.\-/]*)")
"""A path that climbs out of the page's folder (``../README.md``, ``../../other/file``)."""
ABSOLUTE_PATH = re.compile(
    r"(?<![\w.:/~-])(/(?:work|home|root|tmp|mnt|Users|opt|srv|var|data)/[\w.\-/]*|~/[\w.\-/]+)"
)
"""An absolute path on some machine (URLs are excluded by the look-behind on ``:`` and ``/``)."""
TOOL_FOLDERS = {"~/.flwr"}
"""Default folders of the tools fedeq uses, named as facts about them (Flower's ``$FLWR_HOME``)."""


def _outside(page: Path, root: Path = ROOT) -> list[str]:
    """``page:line: path`` for each path of ``page`` outside ``root`` (a ``../`` path must name a file
    there)."""
    found = []
    for lineno, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        for match in PARENT_PATH.finditer(line):
            target = (page.parent / match.group(1).split("#")[0]).resolve()
            if not (target.is_relative_to(root) and target.exists()):
                found.append(f"{page.name}:{lineno}: {match.group(1)}")
        found += [
            f"{page.name}:{lineno}: {m.group(1)}"
            for m in ABSOLUTE_PATH.finditer(line)
            if m.group(1).rstrip(".") not in TOOL_FOLDERS
        ]
    return found


def test_the_checker_finds_paths_outside_the_repository(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# x\n")
    page = tmp_path / "docs" / "probe.md"
    page.write_text(
        "../shared/tools/x, [ok](../README.md#layout), `/work/main/x`, ~/data, https://a.org/tmp/x\n"
    )
    assert _outside(page, tmp_path) == [
        "probe.md:1: ../shared/tools/x",
        "probe.md:1: /work/main/x",
        "probe.md:1: ~/data",
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_reference_no_path_outside_the_repository(page: Path) -> None:
    assert _outside(page) == []


def test_readme_names_every_registered_model() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert [name for name in MODELS.names() if f"`{name}`" not in text] == []


def test_readme_links_the_tutorial() -> None:
    assert "(docs/tutorial.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def _fedeq_commands() -> list[list[str]]:
    lines = [line for lang, block in fenced_blocks(TUTORIAL) if lang == "bash" for line in block.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("fedeq ")]


@pytest.mark.slow
def test_tutorial_commands_and_code_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tutorial's two runs as written (in this process, to spare two interpreter starts), then its Python
    blocks on their output."""
    from fedeq.cli.main import main

    (tmp_path / "simulations" / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "simulations" / "configs" / "quick.yaml", tmp_path / "simulations" / "configs")
    monkeypatch.chdir(tmp_path)
    commands = _fedeq_commands()
    assert [c[:2] for c in commands] == [["fedeq", "simulate"]] * 2
    for command in commands:
        assert main([*command[1:], "--quiet"]) == 0, command
    run_doc(TUTORIAL, tmp_path)
    for name in ("fedavg", "quality"):
        pngs = {p.name for p in (tmp_path / "outputs" / "tutorial" / name).glob("*.png")}
        assert pngs == {
            "accuracy.png",
            "accuracy_vs_sim_time.png",
            "solver_per_tier.png",
            "accuracy_vs_budget.png",
        }
    assert (tmp_path / "outputs" / "tutorial" / "fedavg_vs_quality.png").stat().st_size > 0
