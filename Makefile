# tvgate: the commands the README names. Every target installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
DEV_VAULT_PORT ?= 8200
DEV_VAULT_DIR ?= data

.PHONY: run test lint format bench clean dev-vault browser

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
test: $(VENV)/.installed-test browser lint
	$(BIN)/pytest $(PYTEST_ARGS)

# The browser tests drive Debian's Chromium through Playwright (never `playwright install`,
# which would download a browser build of its own).
browser:
	@command -v chromium >/dev/null || (apt-get update && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -o DPkg::Lock::Timeout=600 chromium)

## dev-vault: a local OpenBao dev server (in memory) on 127.0.0.1:$(DEV_VAULT_PORT), set up by
## `tvgate vault setup`; prints the settings a gateway needs. Ctrl-C stops it, and loses its
## transit key: keys added while it ran cannot be decrypted by another server.
dev-vault: $(VENV)/.installed-test
	@set -e; mkdir -p $(DEV_VAULT_DIR); \
	addr=http://127.0.0.1:$(DEV_VAULT_PORT); \
	root=dev-root-$$($(BIN)/python -c 'import secrets; print(secrets.token_hex(12))'); \
	$(BIN)/bao server -dev -dev-root-token-id=$$root -dev-listen-address=127.0.0.1:$(DEV_VAULT_PORT) \
	  > $(DEV_VAULT_DIR)/openbao-dev.log 2>&1 & pid=$$!; \
	trap 'kill $$pid 2>/dev/null || true; wait $$pid 2>/dev/null || true' EXIT; trap 'exit 0' INT TERM; \
	for i in $$(seq 300); do \
	  $(BIN)/bao status -address=$$addr >/dev/null 2>&1 && break; \
	  kill -0 $$pid 2>/dev/null || { cat $(DEV_VAULT_DIR)/openbao-dev.log; exit 1; }; \
	  sleep 0.1; \
	done; \
	VAULT_TOKEN=$$root $(BIN)/tvgate vault setup --addr $$addr --output $(DEV_VAULT_DIR)/dev-vault.env; \
	echo; \
	echo "OpenBao dev server on $$addr, root token $$root (in memory: Ctrl-C loses its transit key)."; \
	echo "Settings for a gateway (also in $(DEV_VAULT_DIR)/dev-vault.env, mode 0600):"; \
	sed 's/^/  export /' $(DEV_VAULT_DIR)/dev-vault.env; \
	echo "Ctrl-C stops it."; \
	wait $$pid

lint: $(VENV)/.installed-test
	$(BIN)/ruff check tvgate admin_ui tests bench
	$(BIN)/ruff format --check tvgate admin_ui tests bench
	$(BIN)/mypy

format: $(VENV)/.installed-test
	$(BIN)/ruff check --fix tvgate admin_ui tests bench
	$(BIN)/ruff format tvgate admin_ui tests bench

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
