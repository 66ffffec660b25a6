# relay: the two commands a newcomer needs are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config.example.yaml

.PHONY: run test lint bench clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "relay needs Python 3.11 or newer; run: make PYTHON=python3.11 ..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@ $(VENV)/.installed

## run: set up .venv, start the example receiver (relay sink, port 9000) and the relay with
## config.example.yaml on 127.0.0.1:8080; Ctrl-C stops both
run: $(VENV)/.installed
	@$(BIN)/relay sink --port 9000 -c $(CONFIG) & sink=$$!; \
	  trap 'kill $$sink 2>/dev/null' EXIT INT TERM; \
	  $(BIN)/relay serve -c $(CONFIG)

## test: set up .venv with the test extra, then lint, type-check and run the whole test suite
test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/mypy

## bench: run every benchmark in bench/ (prints tables; takes a few minutes)
## (bench/hotpath.py first: it runs ingest.py, e2e.py and latency.py's measurements and
## prints issue 21's targets table; the other scripts follow)
bench: $(VENV)/.installed-test
	@echo "== bench/hotpath.py"; $(BIN)/python bench/hotpath.py || exit 1
	@for script in bench/[!_]*.py; do \
	  case $$script in bench/hotpath.py|bench/ingest.py|bench/e2e.py|bench/latency.py) continue;; esac; \
	  echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis relay-spool.db*
