# The two commands a new user needs: `make demo` and `make test`. Each sets up .venv on its own.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-oldest setup bench lint format clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: the CPU build. An unpinned torch (or accelerate in an empty venv) pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[langchain,llamaindex,structured,eval,dev]"
	touch $(STAMP)

# The oldest transformers the package supports (pyproject.toml), installed beside the venv's own: the engine
# tests run on it too, since transformers renamed the KV-cache argument in 5.24 (safeinfer_integrations/compat.py).
OLDEST := $(VENV)/oldest-transformers
$(OLDEST)/.installed: $(STAMP)
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(OLDEST) "transformers==5.17.0" "huggingface-hub==1.33.0"
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m safeinfer_integrations.cli download
	$(PY) examples/demo.py

test: lint
	$(PY) -m safeinfer_integrations.cli download
	$(PY) -m pytest -q -p no:cacheprovider --durations=20
	$(MAKE) --no-print-directory test-oldest

test-oldest: $(OLDEST)/.installed
	PYTHONPATH=$(OLDEST) $(PY) -c "import transformers as t; assert t.__version__ == '5.17.0', t.__version__"
	PYTHONPATH=$(OLDEST) SAFEINFER_TEST_NO_DEFAULT_MODEL=1 $(PY) -m pytest -q -p no:cacheprovider \
		tests/test_compat.py tests/test_engine_reference.py tests/test_engine_behaviour.py tests/test_gate_fit.py \
		tests/test_building.py

bench: $(STAMP)
	$(PY) -m safeinfer_integrations.cli bench

# ruff (lint rules and the formatter's check) and mypy; `make format` applies the formatter.
lint: $(STAMP)
	$(VENV)/bin/ruff check safeinfer_integrations tests examples benchmarks
	$(VENV)/bin/ruff format --check safeinfer_integrations tests examples benchmarks
	$(VENV)/bin/mypy safeinfer_integrations

format: $(STAMP)
	$(VENV)/bin/ruff format safeinfer_integrations tests examples benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
