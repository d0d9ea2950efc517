"""Run the code of a Markdown page: the ```python blocks, with ``# file: NAME`` blocks saved as files."""

from __future__ import annotations

import re
from pathlib import Path

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def fenced_blocks(page: Path) -> list[tuple[str, str]]:
    """The fenced blocks of ``page`` as ``(language, code)``, in order."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(page.read_text(encoding="utf-8"))]


def write_doc_files(page: Path, folder: Path) -> list[str]:
    """Write the python blocks starting ``# file: NAME`` into ``folder``; return the other python blocks.

    The ``# file:`` line itself is kept out of the written file."""
    code = []
    for lang, block in fenced_blocks(page):
        if lang != "python":
            continue
        first, _, rest = block.partition("\n")
        if first.startswith("# file: "):
            (folder / first.removeprefix("# file: ").strip()).write_text(rest, encoding="utf-8")
        else:
            code.append(block)
    return code


def run_doc(page: Path, folder: Path, namespace: dict | None = None) -> dict:
    """Save the page's files in ``folder`` and execute its other python blocks in order (cwd must be
    ``folder`` when the blocks use relative paths); return the namespace they ran in."""
    namespace = {"__name__": f"doc_{page.stem}"} if namespace is None else namespace
    for block in write_doc_files(page, folder):
        exec(compile(block, str(page), "exec"), namespace)
    return namespace
