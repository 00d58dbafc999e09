# The README's two commands are `make demo` and `make test`; both set everything up from nothing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup demo test test-all bench lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --constraint constraints.txt --editable '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## demo: set up, then run the main job on the embedded default (no Docker needed)
demo: setup
	$(BIN)/casm demo

## test: set up, then run the default test suite (unit + integration, not slow)
test: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

## test-all: everything, the slow checks included
test-all: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
