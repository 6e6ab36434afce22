# tvgate: the commands the README names. Every target installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: run test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Runtime install: the package with PostgreSQL support.
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install --quiet -e '.[postgresql]'
	touch $@

# Test install: test and lint tools too.
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[postgresql,test,dev]'
	touch $@

## run: serve tvgate on its embedded defaults (SQLite and the local keyring in ./data)
run: $(VENV)/.installed
	$(BIN)/tvgate serve

## test: install what the tests need, lint, and run every test
test: $(VENV)/.installed-test lint
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check tvgate admin_ui tests bench
	$(BIN)/ruff format --check tvgate admin_ui tests bench
	$(BIN)/mypy

format: $(VENV)/.installed-test
	$(BIN)/ruff check --fix tvgate admin_ui tests bench
	$(BIN)/ruff format tvgate admin_ui tests bench

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
