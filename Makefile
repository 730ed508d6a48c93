# Two set-up commands, each working on a fresh machine with only Python 3.10+:
#   make demo   create .venv, install Kiln, fetch the demo model, run the main job on it
#   make test   create .venv with the test dependencies, lint, run the whole test suite
# Each installs only what it needs (the test extras, transformers among them, only for make
# test), remembered by a stamp file in the venv; pip shows its progress.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_STAMP := $(VENV)/.kiln-demo
TEST_STAMP := $(VENV)/.kiln-test

.PHONY: demo test lint venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(DEMO_STAMP): pyproject.toml requirements-cpu.txt | $(PY)
	$(PY) -m pip install -r requirements-cpu.txt -e .
	touch $(DEMO_STAMP)

$(TEST_STAMP): $(DEMO_STAMP)
	$(PY) -m pip install -r requirements-cpu.txt -e '.[test]'
	touch $(TEST_STAMP)

venv: $(DEMO_STAMP)

DEMO_PROMPT ?= The three primary colors are

demo: $(DEMO_STAMP)
	$(VENV)/bin/kiln info smollm2-135m
	$(VENV)/bin/kiln run -p "$(DEMO_PROMPT)" -n 64 --temp 0

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check kiln tests scripts benchmarks
	$(VENV)/bin/ruff format --check kiln tests scripts benchmarks

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
