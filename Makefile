# Kasa: two commands matter. `make run` starts Kasa on its embedded defaults;
# `make test` installs what is missing and passes every test (CI runs it).
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PG_TEST_URL ?= postgres://postgres@127.0.0.1:5432/kasa
TEST_VAR := $(CURDIR)/var/test

.PHONY: install run test lint lock system-deps services test-pg test-sqlite clean

install: $(BIN)/.installed   ## create .venv and install the locked Python dependencies

$(BIN)/.installed: requirements.lock pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	@touch $@

run: install   ## migrate, create the admin login and demo customer, run web + worker
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py kasa_setup
	@exec scripts/run.sh

system-deps:   ## Debian packages the suite needs (no-op when present)
	@scripts/system-deps.sh

services: system-deps   ## start PostgreSQL, MariaDB and Redis when they are down
	@scripts/services.sh

lint: install
	$(BIN)/ruff check .

test: install services lint test-pg test-sqlite   ## everything CI checks

test-pg: install
	@rm -rf $(TEST_VAR) && mkdir -p $(TEST_VAR)
	KASA_VAR_DIR=$(TEST_VAR) DATABASE_URL=$(PG_TEST_URL) $(BIN)/pytest $(PYTEST_ARGS)

test-sqlite: install
	@rm -rf $(TEST_VAR)-sqlite && mkdir -p $(TEST_VAR)-sqlite
	env -u DATABASE_URL KASA_VAR_DIR=$(TEST_VAR)-sqlite $(BIN)/pytest -m smoke $(PYTEST_ARGS)

lock:   ## re-resolve requirements.lock from pyproject.toml (needs network)
	$(PY) -m venv /tmp/kasa-uv && /tmp/kasa-uv/bin/pip install --quiet uv
	/tmp/kasa-uv/bin/uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

clean:
	rm -rf $(VENV) var/test var/test-sqlite .pytest_cache .ruff_cache
