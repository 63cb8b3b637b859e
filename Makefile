# Kasa: two commands matter. `make run` starts Kasa on its embedded defaults;
# `make test` installs what is missing and passes every test (CI runs it).
SHELL := /bin/bash
.DEFAULT_GOAL := help
# Targets run one after the other, in the order written, even under `make -j`.
.NOTPARALLEL:

# The interpreter that creates .venv: the first of these that is Python 3.11 and
# can make a virtual environment (on Debian: packages python3.11 and python3.11-venv).
# Recursive (?= on an undefined name) on purpose: evaluated when a recipe needs it, i.e. after
# `system-deps` may have installed it in the same `make` run.
PY_CANDIDATES ?= python3.11 /usr/bin/python3.11 python3
PY ?= $(shell for p in $(PY_CANDIDATES); do \
	"$$p" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info[:2] != (3, 11)); ' >/dev/null 2>&1 \
	&& { "$$p" -c 'import sys; print(sys.executable)'; break; }; done)
VENV := .venv
KASA_PACKAGES := config core customers hosts backups releases upgrades rollouts operations audit engines console
BIN := $(VENV)/bin
PG_TEST_URL ?= postgres://postgres@127.0.0.1:5432/kasa
TEST_VAR ?= $(CURDIR)/var/test
# The SQLite pass's Redis database (the PostgreSQL pass uses db 15: tests/conftest.py); they run at once.
SQLITE_TEST_REDIS_URL ?= redis://127.0.0.1:6379/14
SQLITE_SELECT ?= -m smoke
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_NO_INPUT := 1

.PHONY: help install python run test lint lock system-deps services reachable test-pg test-sqlite clean image test-image

help:   ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 16

install: $(BIN)/.installed node_modules/.bin/pm2   ## create .venv, install the locked Python dependencies and PM2
	@# Bytecode for Kasa's own modules, written even where PYTHONDONTWRITEBYTECODE is set (as in the Docker
	@# image): otherwise every manage.py command compiles them again (~0.1 s each). Up-to-date files are skipped.
	@$(BIN)/python -m compileall -q -j 0 $(KASA_PACKAGES) manage.py

$(BIN)/.installed: requirements.lock pyproject.toml
	@if ! { $(BIN)/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
		&& $(BIN)/python -m pip --version; } >/dev/null 2>&1; then \
		py="$(PY)"; \
		if [ -z "$$py" ]; then \
			echo "no Python 3.11 with venv support found (tried: $(PY_CANDIDATES))." \
				"On Debian: apt-get install python3.11 python3.11-venv, or 'make python' as root." >&2; \
			exit 1; \
		fi; \
		echo "creating $(VENV) with $$py"; rm -rf $(VENV) && "$$py" -m venv $(VENV) || exit 1; \
	fi
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	@touch $@

# PM2 (customer services run under it) at package-lock.json's exact versions, in node_modules/.
# npm unpacks files with old timestamps, hence the touch: `make install` stays a no-op until
# package-lock.json changes.
node_modules/.bin/pm2: package-lock.json package.json
	@command -v npm >/dev/null 2>&1 || { echo "npm is missing: run scripts/system-deps.sh as root" \
		"(Debian package npm) or install Node.js with npm" >&2; exit 1; }
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

python:   ## Debian: install python3.11 and python3.11-venv when missing (as root)
	@scripts/system-deps.sh --python

run: python install   ## migrate, create the admin login and demo customer, run web + worker (S3=1: + SeaweedFS)
	@scripts/reachable.sh --warn
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py kasa_setup
	@$(if $(S3),KASA_S3=$(S3) )exec scripts/run.sh

system-deps:   ## Debian packages the suite needs (installs only what is missing)
	@scripts/system-deps.sh

reachable:   ## customer users must pass through this checkout (PM2, PostgreSQL, var/): o+x on it
	@scripts/reachable.sh

services: system-deps   ## start PostgreSQL, MariaDB and Redis when they are down
	@scripts/services.sh

lint: install   ## ruff, and the import graph's contracts (pyproject.toml [tool.importlinter])
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: system-deps services install lint reachable   ## everything CI checks: both passes, side by side
	@# Two passes side by side, one per core (most of the suite waits on servers, PM2 and sshd, not on the CPU):
	@# the SQLite pass runs the smoke tests and the tests of other hosts, Redis and the random-tree round trips
	@# (KASA_TEST_PASS, tests/conftest.py); the PostgreSQL pass runs everything else, its end-to-end tests last.
	@# Each pass has its own var folder, control database and Redis database; the SQLite pass's output follows
	@# the PostgreSQL pass's, and either failing fails `make test`. `make test-pg` alone runs the whole suite.
	@mkdir -p $(dir $(TEST_VAR)); \
	KASA_TEST_PASS=sqlite $(MAKE) --no-print-directory test-sqlite SQLITE_SELECT= > $(TEST_VAR)-sqlite.log 2>&1 & sqlite=$$!; \
	KASA_TEST_PASS=pg $(MAKE) --no-print-directory test-pg; pg=$$?; \
	wait $$sqlite; sq=$$?; \
	echo "=== the SQLite pass (make test-sqlite), run beside the PostgreSQL pass: exit status $$sq ==="; \
	cat $(TEST_VAR)-sqlite.log; \
	exit $$(( pg != 0 || sq != 0 ))

test-pg: install reachable   ## the whole suite on PostgreSQL as the control database
	@rm -rf $(TEST_VAR) && mkdir -p $(TEST_VAR)
	KASA_VAR_DIR=$(TEST_VAR)/kasa KASA_CUSTOMERS_ROOT=$(TEST_VAR)/customers DATABASE_URL=$(PG_TEST_URL) \
		$(BIN)/pytest $(PYTEST_ARGS)

test-sqlite: install reachable   ## the smoke tests that use a database, on the default SQLite control database
	@rm -rf $(TEST_VAR)-sqlite && mkdir -p $(TEST_VAR)-sqlite
	env -u DATABASE_URL KASA_VAR_DIR=$(TEST_VAR)-sqlite/kasa KASA_CUSTOMERS_ROOT=$(TEST_VAR)-sqlite/customers \
		KASA_TEST_REDIS_URL=$(SQLITE_TEST_REDIS_URL) KASA_TEST_DATABASE_ONLY=1 $(BIN)/pytest $(SQLITE_SELECT) $(PYTEST_ARGS)

# The image: podman builds the Dockerfile on a Debian bookworm base made with mmdebstrap (scripts/image.sh).
IMAGE ?= kasa:latest
image:   ## build the Docker image with podman (IMAGE=kasa:latest) on a Debian base made here
	@scripts/system-deps.sh --image
	KASA_IMAGE=$(IMAGE) scripts/image.sh

# Not part of `make test` (a build takes minutes): CI runs it after `make test` (.ci/run). KASA_TEST_IMAGE makes
# tests/test_image.py run, and fail rather than skip when podman or the image is missing.
test-image: system-deps services install image   ## build the image, then run it: migrate, web, worker, backup, restore
	@mkdir -p $(dir $(TEST_VAR))
	KASA_TEST_IMAGE=$(IMAGE) KASA_VAR_DIR=$(TEST_VAR)-image/kasa KASA_CUSTOMERS_ROOT=$(TEST_VAR)-image/customers \
		DATABASE_URL=$(PG_TEST_URL) KASA_TEST_REDIS_URL=redis://127.0.0.1:6379/13 \
		$(BIN)/pytest -p no:cacheprovider tests/test_image.py $(PYTEST_ARGS)

lock:   ## re-resolve requirements.lock from pyproject.toml (needs network)
	$(PY) -m venv /tmp/kasa-uv && /tmp/kasa-uv/bin/pip install --quiet uv
	/tmp/kasa-uv/bin/uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

clean:   ## remove .venv and test leftovers
	rm -rf $(VENV) $(TEST_VAR) $(TEST_VAR)-sqlite $(TEST_VAR)-sqlite.log .pytest_cache .ruff_cache
