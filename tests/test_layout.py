"""The package layout rules: small modules, the import-linter layers, benchmarks independent of tests/."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedeq", "strategies", "clients")
MAX_LINES = 400


def _modules(*roots: str) -> list[Path]:
    return sorted(p for root in roots for p in (ROOT / root).rglob("*.py"))


def test_no_module_over_the_size_limit() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in _modules(*PACKAGES)}
    too_long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def test_benchmarks_and_scripts_do_not_import_tests() -> None:
    pattern = re.compile(r"^\s*(from|import)\s+tests\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in _modules("simulations") if pattern.search(p.read_text())]
    assert not offenders


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed")
def test_import_layers_are_kept() -> None:
    out = subprocess.run(["lint-imports"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "1 kept, 0 broken" in out.stdout
