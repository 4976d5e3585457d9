# Two commands on a fresh machine:  make serve   |   make test
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=

.PHONY: install serve test test-fast lint bench prepare-model clean

install:
	@scripts/install.sh

serve: install
	$(VENV)/bin/t2serve serve --host $(HOST) --port $(PORT) $(ARGS)

prepare-model: install
	$(VENV)/bin/t2serve prepare-model

test: install
	$(PY) -m pytest -q $(ARGS)

# The suite without the tests marked slow (CI runs everything through `make test`).
test-fast: install
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: install
	$(VENV)/bin/ruff check server estimator tests benchmarks
	$(VENV)/bin/ruff format --check server estimator tests benchmarks

bench: install
	$(PY) benchmarks/frontend_overhead.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
