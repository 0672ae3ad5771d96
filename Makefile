# Set-up and checks. `make test` and `make demo` create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

export HF_HUB_OFFLINE := 1

.PHONY: install demo demo-generation demo-comprehension lint test test-all

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-cache-dir --upgrade pip
	$(PY) -m pip install --quiet --no-cache-dir -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/toklip-demo

demo-generation: $(STAMP)
	$(VENV)/bin/toklip-demo-generation

demo-comprehension: $(STAMP)
	$(VENV)/bin/toklip-demo-comprehension

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

test-all: lint
	$(PY) -m pytest -m ''
