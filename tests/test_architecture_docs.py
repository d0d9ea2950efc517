"""docs/architecture.md: every extension example on the page runs and is accepted by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.doc_blocks import fenced_blocks, write_doc_files

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "architecture.md"


def test_every_extension_point_has_an_example() -> None:
    code = "\n".join(block for lang, block in fenced_blocks(PAGE) if lang == "python")
    for decorator in (
        "@SOLVERS.register",
        "@BACKWARDS.register",
        "@PARTITIONERS.register",
        "@register_quality",
        "@ENGINES.register",
    ):
        assert decorator in code, decorator


def test_the_page_code_runs(tmp_path) -> None:
    """The blocks run in a fresh interpreter in a folder outside the repository (plugins are files there)."""
    code = write_doc_files(PAGE, tmp_path)
    script = tmp_path / "page.py"
    script.write_text("\n\n".join(code), encoding="utf-8")
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert {"halpern.py", "two_step.py", "blocks.py", "inverse_loss.py", "timed_engine.py"} <= {
        p.name for p in tmp_path.iterdir()
    }


def test_the_documented_layout_matches_the_tree() -> None:
    layout = next(block for lang, block in fenced_blocks(PAGE) if lang == "text")
    for line in layout.splitlines():
        name = line.strip().split(" ")[0]
        if name.endswith("/") and not line.startswith(" " * 4):
            folder = ROOT / "fedeq" / name if line.startswith("  ") else ROOT / name
            assert folder.is_dir(), name


@pytest.mark.slow
def test_the_documented_strategy_command_runs(tmp_path) -> None:
    (command,) = [block.strip() for lang, block in fenced_blocks(PAGE) if lang == "bash"]
    args = command.removeprefix("fedeq ").split()
    out = subprocess.run(
        [sys.executable, "-m", "fedeq.cli.main", *args, "--quiet"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (summary,) = (tmp_path / "outputs").glob("*/summary.json")
    data = json.loads(summary.read_text())
    assert data["rounds_completed"] == 3 and data["strategy"].endswith("FedMedian")
