# tvgate: the commands the README names. Every target installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# Test processes for `make test` (pytest-xdist; tests/parallel.py groups the tests); 0 runs
# in one process. 0 until a measurement shows more pays: on this 2-core machine, 6 files
# (101 tests) took 195 s in one process and 189-216 s with -n 4, CPU-bound (every test
# starts tvgate processes), and a loaded -n 4 run failed more timing-sensitive tests.
# Bytecode is written even where PYTHONDONTWRITEBYTECODE is set: every worker imports the
# whole suite (its plugins assertion-rewritten) and every `tvgate serve` the package, and
# without .pyc files each does it from source again.
TEST_WORKERS ?= 0
DEV_VAULT_PORT ?= 8200
DEV_VAULT_DIR ?= data
CLIENTS_DIR ?= .clients

.PHONY: run test lint format bench bench-quick bench-tools clean dev-vault browser clients

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
test: $(VENV)/.installed-test browser clients lint
	PYTHONDONTWRITEBYTECODE= $(BIN)/pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

## clients: the real coding tools the tests run through tvgate (Claude Code, Codex CLI), at the
## versions pinned in tests/npm/package-lock.json, from the npm registry into $(CLIENTS_DIR)/.
## Both ship their native binary as an npm platform package (optionalDependencies); Claude
## Code's postinstall only copies it from there, so nothing is fetched from elsewhere.
clients: $(CLIENTS_DIR)/.installed

$(CLIENTS_DIR)/.installed: tests/npm/package.json tests/npm/package-lock.json
	@command -v npm >/dev/null || { echo "clients: npm (Node.js) is needed to install the real coding tools"; exit 1; }
	mkdir -p $(CLIENTS_DIR)
	cp tests/npm/package.json tests/npm/package-lock.json $(CLIENTS_DIR)/
	npm ci --prefix $(CLIENTS_DIR) --no-audit --no-fund --loglevel=error
	touch $@

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

## bench: the benchmark harness (about 10 minutes); writes bench/RESULTS.md
bench: $(VENV)/.installed bench-tools
	$(BIN)/python -m bench.run

## bench-quick: the same workloads, one short repeat each (about 2 minutes)
bench-quick: $(VENV)/.installed bench-tools
	$(BIN)/python -m bench.run --quick

# nginx (the upstream) and wrk (the load generator) from Debian's packages when they
# are missing and this machine can install them; otherwise the harness falls back to
# its built-in upstream and load generator, and says so in RESULTS.md.
bench-tools:
	@if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx wrk \
			|| { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx wrk; } \
			|| echo "bench: nginx/wrk not installed; using the built-in upstream and load generator"; \
		else \
			echo "bench: nginx/wrk missing and not installable here; using the built-in ones"; \
		fi; \
	fi

lint: $(VENV)/.installed-test
	$(BIN)/ruff check tvgate admin_ui tests bench
	$(BIN)/ruff format --check tvgate admin_ui tests bench
	$(BIN)/mypy

format: $(VENV)/.installed-test
	$(BIN)/ruff check --fix tvgate admin_ui tests bench
	$(BIN)/ruff format tvgate admin_ui tests bench

clean:
	rm -rf $(VENV) $(CLIENTS_DIR) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
