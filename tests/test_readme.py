"""README.md: its Python code runs, and every `fedeq simulate` line of its examples is a valid config."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fedeq.config import load_config
from tests.doc_blocks import fenced_blocks

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _simulate_lines() -> list[str]:
    lines = []
    for lang, block in fenced_blocks(README):
        if lang != "bash":
            continue
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("fedeq simulate ") and "<" not in line:
                lines.append(line)
    return lines


def test_readme_python_code_runs(tmp_path) -> None:
    code = [block for lang, block in fenced_blocks(README) if lang == "python"]
    assert code
    for block in code:
        out = subprocess.run(
            [sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("line", _simulate_lines())
def test_readme_simulate_examples_are_valid_configs(line: str, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    args = [a for a in shlex.split(line)[2:] if not a.startswith("--")]
    path = args[0] if args and args[0].endswith((".yaml", ".yml")) else None
    overrides = args[1:] if path else args
    cfg = load_config(path, overrides)
    for item in overrides:
        key = item.split("=", 1)[0]
        assert key.split(".")[0] in type(cfg).model_fields, key
