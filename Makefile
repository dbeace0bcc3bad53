# The two commands a new user needs: `make demo` and `make test`. Each sets up .venv on its own.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test setup bench lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: the CPU build. An unpinned torch (or accelerate in an empty venv) pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[langchain,llamaindex,eval,dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m safeinfer_integrations.cli download
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m safeinfer_integrations.cli download
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m safeinfer_integrations.cli bench

lint: $(STAMP)
	$(VENV)/bin/ruff check safeinfer_integrations tests examples benchmarks
	$(VENV)/bin/mypy safeinfer_integrations

clean:
	rm -rf $(VENV) build *.egg-info
