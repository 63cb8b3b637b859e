# syntax=docker/dockerfile:1
# Kasa image: one image, two roles. Default command = web (daphne on 0.0.0.0:8000);
# the worker runs the same image with `python manage.py qcluster`.
#   docker build -t kasa .                 on the public Python image (needs Docker Hub)
#   make image                             with podman, on a Debian bookworm base made here (scripts/image.sh)
# See docker-compose.yml for PostgreSQL + Redis + web + worker, and README.md.
#
# PYTHON_IMAGE is the base: the public python:3.11-slim-bookworm, or any Debian bookworm image without Python
# (the one `make image` makes with mmdebstrap), which then gets Debian's python3.11: the same Python as the tests.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# A CA bundle for pip and npm in the build stages only (a machine whose egress passes a TLS-inspecting proxy:
# `make image` mounts the host's bundle there). Empty: the tools' own CAs. Never in the runtime stage.
ARG BUILD_CA_FILE=

# --- python: the base, with a `python` 3.11 that can make a virtual environment ------------------------
FROM ${PYTHON_IMAGE} AS python
RUN if ! command -v python >/dev/null 2>&1; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
      && apt-get clean && rm -rf /var/lib/apt/lists/* \
      && ln -s /usr/bin/python3.11 /usr/local/bin/python; \
    fi \
 && python -c 'import sys, venv, ensurepip; sys.exit(sys.version_info[:2] != (3, 11))'

# --- builder: /opt/venv with the runtime dependencies at the lock's exact versions ---------
FROM python AS builder
ARG BUILD_CA_FILE
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_NO_INPUT=1
WORKDIR /build
COPY pyproject.toml requirements.lock ./
# requirements.lock pins everything, dev tools included (pytest, ruff, playwright). The image
# installs only pyproject's [project] dependencies, constrained to the lock's versions.
RUN python -m venv /opt/venv \
 && python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
      > runtime-requirements.txt \
 && /opt/venv/bin/pip install ${BUILD_CA_FILE:+--cert "$BUILD_CA_FILE"} -r runtime-requirements.txt -c requirements.lock \
 && /opt/venv/bin/pip check

# --- pm2: PM2 (customer services run under it) at package-lock.json's versions -------------
# npm stays here: the runtime needs only node (npm brings hundreds of packages and node-gyp's toolchain hooks).
FROM python AS pm2
ARG BUILD_CA_FILE
RUN apt-get update \
 && apt-get install -y --no-install-recommends npm \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY package.json package-lock.json ./
RUN NODE_EXTRA_CA_CERTS=$BUILD_CA_FILE npm ci --omit=dev --no-audit --no-fund --loglevel=error

# --- runtime -----------------------------------------------------------------------------
FROM python AS runtime
# Database client tools the operations run (pg_dump/psql, mariadb-dump/mariadb), zstd for archives, node for
# PM2, passwd for the user below (a minimal Debian base has no useradd).
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-client mariadb-client zstd ca-certificates nodejs passwd \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
# Non-root user with a fixed uid/gid (10001), so bind mounts can be chowned to it.
RUN groupadd --system --gid 10001 kasa \
 && useradd --system --uid 10001 --gid kasa --home-dir /var/lib/kasa --no-create-home --shell /usr/sbin/nologin kasa \
 && install -d -o kasa -g kasa -m 0750 /var/lib/kasa /srv/customers

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# Code is owned by root and read-only for kasa; everything Kasa writes goes to KASA_VAR_DIR.
COPY . /app
COPY --from=pm2 /build/node_modules /app/node_modules
# Bytecode at build time: the code is read-only for kasa and PYTHONDONTWRITEBYTECODE is set below, so
# without it every manage.py command and worker start would compile Kasa's modules again.
RUN /opt/venv/bin/python -m compileall -q /app/config /app/core /app/customers /app/hosts /app/backups /app/releases \
    /app/upgrades /app/rollouts /app/console /app/operations /app/audit /app/engines /app/manage.py

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DJANGO_SETTINGS_MODULE=config.settings \
    KASA_ENV=production \
    KASA_VAR_DIR=/var/lib/kasa \
    KASA_CUSTOMERS_ROOT=/srv/customers

USER kasa
# Fail the build early if the static files (with the production manifest) cannot be collected.
# The keys here are throwaway values for this one command and are not kept in the image.
RUN SECRET_KEY=build-only-not-a-secret-$(python -c 'import secrets; print(secrets.token_urlsafe(40))') \
    KASA_SECRET_KEYS=$(python -c 'import secrets; print(secrets.token_urlsafe(40))') \
    python manage.py collectstatic --noinput --verbosity 0

VOLUME ["/var/lib/kasa", "/srv/customers"]
EXPOSE 8000
# Static files are collected again at start: a volume on /var/lib/kasa hides (or keeps a stale
# copy of) what the build collected. With the manifest unchanged this takes a second or two.
CMD ["sh", "-c", "python manage.py collectstatic --noinput --verbosity 0 && exec daphne --bind 0.0.0.0 --port 8000 --proxy-headers config.asgi:application"]
