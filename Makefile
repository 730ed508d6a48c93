# Two set-up commands, each working on a fresh machine with only Python 3.10+:
#   make demo   create .venv, install Kiln, fetch the demo model, run the main job on it
#   make test   create .venv with the test dependencies, lint, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kiln-installed

.PHONY: demo test lint venv clean

$(STAMP): pyproject.toml requirements-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-cpu.txt -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

DEMO_PROMPT ?= The three primary colors are

demo: $(STAMP)
	$(VENV)/bin/kiln info smollm2-135m
	$(VENV)/bin/kiln run -p "$(DEMO_PROMPT)" -n 64 --temp 0

lint: $(STAMP)
	$(VENV)/bin/ruff check kiln tests scripts benchmarks
	$(VENV)/bin/ruff format --check kiln tests scripts benchmarks

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
