"""Settings, driven by environment variables (README lists each one).

Embedded defaults need no server: SQLite in var/ and Celery's filesystem broker.
Set DATABASE_URL (PostgreSQL) and REDIS_URL or CELERY_BROKER_URL (Redis) in production.
"""

import os
from datetime import timedelta
from pathlib import Path

import dj_database_url
from celery.schedules import crontab
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("VAR_DIR", BASE_DIR / "var"))


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in {"1", "true", "yes", "on"}:
        return True
    if value.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean (use true or false)")


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_bool("DJANGO_DEBUG", False)
# Signs sessions and the acknowledgement links in pages: it must be secret. Only the embedded
# demo (DJANGO_DEBUG=true) may run on the built-in, public key.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is not set: set it to a long random value "
            "(python -c 'import secrets; print(secrets.token_urlsafe(50))')."
        )
    SECRET_KEY = "django-insecure-embedded-demo-key-change-me"  # noqa: S105 - demo only
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver")
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", "")
# Absolute base URL used in links that leave the site (emails, pages).
SITE_URL = os.environ.get("SITE_URL", "http://127.0.0.1:8000").rstrip("/")
# The name customers see on the status page and in notices.
SITE_NAME = os.environ.get("SITE_NAME", "Service status")
# Seconds browsers, proxies and the server-side cache may keep /status/ and its Atom feed
# (docs/status-page.md): long enough to absorb a crowd refreshing during an outage, short
# enough that customers see a new update within a minute.
STATUS_PAGE_MAX_AGE = int(os.environ.get("STATUS_PAGE_MAX_AGE", "60"))
if STATUS_PAGE_MAX_AGE < 1:
    raise ImproperlyConfigured("STATUS_PAGE_MAX_AGE must be at least 1 second")

INSTALLED_APPS = [
    "config.apps.TrackerAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "escalation",
    "incidents",
    "postmortems",
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
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "config" / "templates"],
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

DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'db.sqlite3'}"
DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60)}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # One writer at a time: IMMEDIATE takes the write lock up front, so web, worker and beat
    # wait for each other instead of failing with "database is locked" mid-transaction.
    DATABASES["default"]["OPTIONS"] = {"timeout": 20, "transaction_mode": "IMMEDIATE"}
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    VAR_DIR.mkdir(parents=True, exist_ok=True)
DATABASES["default"]["TEST"] = {"NAME": os.environ.get("TEST_DATABASE_NAME") or None}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
USE_I18N = True
USE_TZ = True
# Stored times are UTC; this is the zone the admin displays them in.
TIME_ZONE = os.environ.get("DJANGO_TIME_ZONE", "UTC")

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "whitenoise.storage.CompressedManifestStaticFilesStorage"
            if env_bool("STATIC_MANIFEST", False)
            else "django.contrib.staticfiles.storage.StaticFilesStorage"
        )
    },
}

EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
EMAIL_HOST = os.environ.get("EMAIL_HOST", "localhost")
EMAIL_PORT = int(os.environ.get("EMAIL_PORT", "25"))
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_TIMEOUT = 10
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "incidents@localhost")

# How often the heartbeat sweep runs; a missed heartbeat is noticed within this.
HEARTBEAT_CHECK_SECONDS = float(os.environ.get("HEARTBEAT_CHECK_SECONDS", "30"))
# How often a worker applies accepted alert deliveries (see incidents/ingestion/intake.py).
ALERT_APPLY_SECONDS = float(os.environ.get("ALERT_APPLY_SECONDS", "1"))

# --- Escalation engine ---------------------------------------------------------------------
# The engine tick: how often beat asks the database what is due. Short, because lateness of a
# page is bounded by it; cheap, because each tick reads indexes of what is due only.
ENGINE_TICK_SECONDS = float(os.environ.get("ENGINE_TICK_SECONDS", "5"))
# An escalation due this long ago and still not done is reported by the auditor.
ESCALATION_OVERDUE_AFTER = float(os.environ.get("ESCALATION_OVERDUE_AFTER", "60"))
# Webhook channels: seconds to wait, and whether loopback/private/link-local targets are
# allowed (off in production: a webhook must not reach into the tracker's own network).
WEBHOOK_TIMEOUT = float(os.environ.get("WEBHOOK_TIMEOUT", "5"))
WEBHOOK_ALLOW_PRIVATE = env_bool("WEBHOOK_ALLOW_PRIVATE", False)
# A page still `sending` after this many seconds was being sent by a worker that died: its
# outcome is unknown. Longer than a task's hard time limit, so a slow send is never cut off.
PAGE_SENDING_STUCK_AFTER = float(os.environ.get("PAGE_SENDING_STUCK_AFTER", "180"))
# How long an acknowledgement link in a page stays valid.
ACK_LINK_MAX_AGE = int(os.environ.get("ACK_LINK_MAX_AGE", str(7 * 24 * 3600)))

# --- Status updates (docs/status-updates.md) ------------------------------------------------
# A public incident (on a public service, not a drill) owes its first public update within
# this many minutes of becoming public; an overdue one is recorded as a breach by the engine
# tick, like the severity targets. 15 minutes is the playbooks' rule.
PUBLIC_UPDATE_DUE_MINUTES = float(os.environ.get("PUBLIC_UPDATE_DUE_MINUTES", "15"))
if PUBLIC_UPDATE_DUE_MINUTES <= 0:
    raise ImproperlyConfigured("PUBLIC_UPDATE_DUE_MINUTES must be more than zero")
PUBLIC_UPDATE_DUE = timedelta(minutes=PUBLIC_UPDATE_DUE_MINUTES)

# --- Celery -------------------------------------------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "")
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL") or REDIS_URL or "filesystem://"
if CELERY_BROKER_URL.startswith("filesystem://"):
    # Embedded default: messages are files in var/celery, so no broker server is needed.
    _broker_dir = VAR_DIR / "celery"
    for _sub in ("processed", "control"):
        (_broker_dir / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir),
        "data_folder_out": str(_broker_dir),
        "processed_folder": str(_broker_dir / "processed"),
        # Newer kombu keeps its exchange table in ./control unless told otherwise.
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
    }
else:
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = 120
CELERY_TASK_SOFT_TIME_LIMIT = 100
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Workers keep reconnecting through a broker outage of any length (the default gives up
# after 100 tries, about 47 minutes): pages wait in the database meanwhile.
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
# The beat schedule is code. Each entry says why its cadence is what it is; the escalation
# engine's tick joins it with the escalation issue.
CELERY_BEAT_SCHEDULE: dict = {
    # The engine tick: due escalations, breaches, backup methods, stuck sends and deliveries.
    # A page's lateness is bounded by this interval; the tick is cheap (indexed reads of what
    # is due), and expires after one interval so ticks queued during an outage do not pile up.
    "escalation-engine-tick": {
        "task": "escalation.engine_tick",
        "schedule": ENGINE_TICK_SECONDS,
        "options": {"expires": ENGINE_TICK_SECONDS},
    },
    # The auditor: escalations more than ESCALATION_OVERDUE_AFTER late mean the tick is not
    # running (or cannot keep up). Half that period bounds how late the report is.
    # Handoff notices: a minute's granularity is plenty for a notice an hour ahead.
    "escalation-handoff-notices": {
        "task": "escalation.notify_handoffs",
        "schedule": 60.0,
        "options": {"expires": 60.0},
    },
    # The weekly on-call summary, Monday morning; a unique row per team and week keeps a
    # repeated or late run from sending it twice.
    "escalation-weekly-summaries": {
        "task": "escalation.weekly_summaries",
        "schedule": crontab(minute=0, hour=8, day_of_week=1),
    },
    # Integrations that expect a heartbeat: a missed one opens an incident. Cheap (an indexed
    # read of integrations whose heartbeat is due), so twice a minute.
    # Accepted alert deliveries are applied (deduplicated, grouped, incidents opened) by this
    # task: an alert's time from webhook to incident is bounded by the interval, so short.
    # An idle run is one indexed read of pending deliveries; a busy one applies for at most
    # 20 s, so it expires after an interval and runs do not pile up behind a long one.
    "incidents-apply-alert-deliveries": {
        "task": "incidents.apply_alert_deliveries",
        "schedule": ALERT_APPLY_SECONDS,
        "options": {"expires": ALERT_APPLY_SECONDS},
    },
    # Deleting applied deliveries past their retention: hourly keeps each run small.
    "incidents-prune-alert-deliveries": {
        "task": "incidents.prune_alert_deliveries",
        "schedule": 3600.0,
        "options": {"expires": 3600.0},
    },
    # Customer notices: sends left by a dead worker become "unknown" (never re-sent), lost
    # batches are queued again, finished notices close. Reads only notices still sending.
    # Overdue-update reminders whose queueing was lost while the broker was down: a minute
    # bounds how late such a reminder goes; reads only open incidents with a recorded breach.
    "incidents-requeue-update-reminders": {
        "task": "incidents.requeue_update_reminders",
        "schedule": 60.0,
        "options": {"expires": 60.0},
    },
    "incidents-notices-sweep": {
        "task": "incidents.notices_sweep",
        "schedule": 60.0,
        "options": {"expires": 60.0},
    },
    "incidents-heartbeats": {
        "task": "incidents.check_heartbeats",
        "schedule": HEARTBEAT_CHECK_SECONDS,
        "options": {"expires": HEARTBEAT_CHECK_SECONDS},
    },
    "escalation-auditor": {
        "task": "escalation.audit_escalations",
        "schedule": ESCALATION_OVERDUE_AFTER / 2,
        "options": {"expires": ESCALATION_OVERDUE_AFTER / 2},
    },
}

# Seconds the health check waits for the broker before it reports "down".
HEALTHZ_BROKER_TIMEOUT = float(os.environ.get("HEALTHZ_BROKER_TIMEOUT", "1.0"))

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # Domain errors, Django validation errors and an unreachable database become JSON 4xx/503.
    "EXCEPTION_HANDLER": "config.api.exception_handler",
    "DEFAULT_PAGINATION_CLASS": "config.api.PageNumberPagination",
    "PAGE_SIZE": 50,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Incident tracker API",
    "DESCRIPTION": "Incidents, alerts, on-call and escalation. See docs/api.md.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # The docs page's JavaScript and CSS come from this server, not a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
}

# Alert ingestion. Bodies larger than this are refused with 413 before they are parsed.
ALERT_MAX_BODY_BYTES = int(os.environ.get("ALERT_MAX_BODY_BYTES", str(1024 * 1024)))
# A web process keeps an authenticated integration this long, so a steady sender costs no
# token lookup; a token rotation or deactivation reaches every process within this time.
INTEGRATION_CACHE_SECONDS = float(os.environ.get("INTEGRATION_CACHE_SECONDS", "5"))
# Applied alert deliveries (the request bodies as received) are deleted after this long;
# the alerts they made keep their own payloads. Pending and failed ones are kept.
ALERT_DELIVERY_RETENTION = timedelta(days=int(os.environ.get("ALERT_DELIVERY_RETENTION_DAYS", "7")))

# The webhook throttle counts requests per integration in the cache: Redis when configured
# (shared by every web process), else per process. A cache that cannot be reached lets
# requests through rather than refusing alerts.
CACHES = {
    "default": (
        {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "tracker",
            "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
        }
        if REDIS_URL
        else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    )
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "filters": {"redact_tokens": {"()": "config.logging.RedactTokens"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "filters": ["redact_tokens"],
        }
    },
    "root": {"handlers": ["console"], "level": os.environ.get("DJANGO_LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "INFO"}},
}

if not DEBUG:
    SESSION_COOKIE_SECURE = env_bool("DJANGO_SECURE_COOKIES", False)
    CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
