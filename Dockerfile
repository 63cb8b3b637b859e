# syntax=docker/dockerfile:1
# Kasa image: one image, two roles. Default command = web (daphne on 0.0.0.0:8000);
# the worker runs the same image with `python manage.py qcluster`.
#   docker build -t kasa .
# See docker-compose.yml for PostgreSQL + Redis + web + worker, and README.md.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: /opt/venv with the runtime dependencies at the lock's exact versions ---------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_NO_INPUT=1
WORKDIR /build
COPY pyproject.toml requirements.lock ./
# requirements.lock pins everything, dev tools included (pytest, ruff, playwright). The image
# installs only pyproject's [project] dependencies, constrained to the lock's versions.
RUN python -m venv /opt/venv \
 && python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
      > runtime-requirements.txt \
 && /opt/venv/bin/pip install -r runtime-requirements.txt -c requirements.lock \
 && /opt/venv/bin/pip check

# --- runtime -----------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# Database client tools the operations run (pg_dump/psql, mariadb-dump/mariadb), zstd for archives.
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-client mariadb-client zstd ca-certificates nodejs npm \
 && rm -rf /var/lib/apt/lists/*
# Non-root user with a fixed uid/gid (10001), so bind mounts can be chowned to it.
RUN groupadd --system --gid 10001 kasa \
 && useradd --system --uid 10001 --gid kasa --home-dir /var/lib/kasa --no-create-home --shell /usr/sbin/nologin kasa \
 && install -d -o kasa -g kasa -m 0750 /var/lib/kasa /srv/customers

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# Code is owned by root and read-only for kasa; everything Kasa writes goes to KASA_VAR_DIR.
COPY . /app
# Bytecode at build time: the code is read-only for kasa and PYTHONDONTWRITEBYTECODE is set below, so
# without it every manage.py command and worker start would compile Kasa's modules again.
RUN /opt/venv/bin/python -m compileall -q /app/config /app/core /app/customers /app/backups /app/releases /app/upgrades /app/console \
    /app/operations /app/audit /app/engines /app/manage.py
# PM2 (customer services run under it), at package-lock.json's versions.
RUN npm ci --omit=dev --no-audit --no-fund --loglevel=error

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
