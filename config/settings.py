"""VBQ Registry settings. Every knob comes from the environment (django-environ).

The defaults give the *embedded* mode: SQLite under ``var/``, Celery on kombu's filesystem
transport under ``var/``, no server needed. Production sets ``DATABASE_URL``,
``CELERY_BROKER_URL``, ``SECRET_KEY``, ``ALLOWED_HOSTS`` and ``DEBUG=false``.
Every variable is documented in README.md ("Configuration").
"""

from pathlib import Path

import environ

from config.logging import build_logging

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(environ.Env().str("VAR_DIR", default=str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)

env = environ.Env()
if (BASE_DIR / ".env").is_file():
    env.read_env(str(BASE_DIR / ".env"))

# --- Core -------------------------------------------------------------------------------------
DEBUG = env.bool("DEBUG", default=False)
# The embedded default key is only for a laptop demo; production must set SECRET_KEY.
SECRET_KEY = env.str(
    "SECRET_KEY", default="embedded-insecure-key-set-SECRET_KEY-in-production-0123456789abcdef"
)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "registry",
    "scoring",
    "followup",
    "integrations",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Content-Security-Policy + Permissions-Policy (config/security.py).
    "config.security.SecurityHeadersMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    # Idle timeout: refreshes an active session's expiry at most once a minute.
    "config.sessions.SessionRefreshMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # Login is required everywhere unless a view opts out (health checks, token-auth feeds);
    # a page script whose session ended gets 401 JSON instead of a redirect.
    "config.sessions.ScriptAwareLoginRequiredMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # A lost database connection answers 503 + Retry-After instead of 500 (config/security.py).
    "config.security.DatabaseUnavailableMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

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
                "registry.context_processors.clinic",
            ],
        },
    },
]

# --- Database ---------------------------------------------------------------------------------
DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'registry.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web process, worker and beat share the file: WAL + immediate transactions + a busy timeout
    # avoid "database is locked" in the embedded mode.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }
    # A file (not :memory:) so a real Celery worker subprocess can share the test database.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test-registry.sqlite3")}
else:
    DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DB_CONN_MAX_AGE", default=60))
    DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", True)
# The imaging pipeline's hot statements are prepared once per connection (db.pg
# pg_execute(prepare=True)). Behind a transaction-mode PgBouncer keep it only with PgBouncer
# >= 1.22 and max_prepared_statements > 0 (psycopg sends DEALLOCATE ALL after a rollback).
DB_PREPARED_STATEMENTS = env.bool("DB_PREPARED_STATEMENTS", default=True)
if DB_PREPARED_STATEMENTS and DATABASES["default"]["ENGINE"] != "django.db.backends.sqlite3":
    # Django turns psycopg's preparing off (threshold None), which also ignores an explicit
    # execute(prepare=True). A threshold no statement reaches keeps Django's default (nothing
    # prepared automatically) and lets those explicit calls prepare.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("prepare_threshold", 2**31 - 1)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Auth -------------------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {
        "NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
        "OPTIONS": {"min_length": 12},
    },
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"
SESSION_COOKIE_AGE = env.int("SESSION_TIMEOUT_SECONDS", default=30 * 60)
# Idle timeout, not absolute: config.sessions.SessionRefreshMiddleware re-saves an active
# session (new expiry) at most every SESSION_REFRESH_SECONDS instead of on every request.
SESSION_SAVE_EVERY_REQUEST = False
SESSION_REFRESH_SECONDS = env.int("SESSION_REFRESH_SECONDS", default=60)
SESSION_EXPIRE_AT_BROWSER_CLOSE = True

# --- Security (production values come from env; `check --deploy` is clean when DEBUG=false) ---
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=False)
SESSION_COOKIE_SECURE = env.bool("SECURE_COOKIES", default=not DEBUG and SECURE_SSL_REDIRECT)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HSTS_SECONDS > 0
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if env.bool(
    "BEHIND_TLS_PROXY", default=False
) else None
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True

# --- Cache and rate limits (config/ratelimit.py) ----------------------------------------------
# Redis when REDIS_CACHE_URL is set (shared by every web process), else per-process memory.
REDIS_CACHE_URL = env.str("REDIS_CACHE_URL", default="")
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_CACHE_URL,
    }
    if REDIS_CACHE_URL
    else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "vbq"}
}
LOGIN_RATE_LIMIT = env.int("LOGIN_RATE_LIMIT", default=5)  # failures per IP+username per window
LOGIN_RATE_WINDOW_SECONDS = env.int("LOGIN_RATE_WINDOW_SECONDS", default=300)
# Password-reset requests per IP + address per window (4x that per IP); counted success or not.
PASSWORD_RESET_RATE_LIMIT = env.int("PASSWORD_RESET_RATE_LIMIT", default=5)
PASSWORD_RESET_RATE_WINDOW_SECONDS = env.int("PASSWORD_RESET_RATE_WINDOW_SECONDS", default=3600)
FEED_AUTH_FAILURE_LIMIT = env.int("FEED_AUTH_FAILURE_LIMIT", default=20)  # per IP per window
FEED_AUTH_WINDOW_SECONDS = env.int("FEED_AUTH_WINDOW_SECONDS", default=300)

# --- I18N / time ------------------------------------------------------------------------------
LANGUAGE_CODE = "en-us"
USE_I18N = True
USE_TZ = True
TIME_ZONE = "UTC"  # storage zone; clinical day counts use CLINIC_TIME_ZONE
CLINIC_TIME_ZONE = env.str("CLINIC_TIME_ZONE", default="America/New_York")

# --- Static -----------------------------------------------------------------------------------
STATIC_URL = "static/"
STATIC_ROOT = Path(env.str("STATIC_ROOT", default=str(BASE_DIR / "staticfiles")))
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STATICFILES_DIRS = [BASE_DIR / "static"] if (BASE_DIR / "static").is_dir() else []
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"
        if not DEBUG
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = True
MEDIA_ROOT = Path(env.str("MEDIA_ROOT", default=str(VAR_DIR / "media")))

# --- Clinical definitions (see DESIGN.md "Clinical definitions") ------------------------------
VBQ_HIGH_THRESHOLD = env.float("VBQ_HIGH_THRESHOLD", default=3.0)
# VBQ runs lower at 3 T than at 1.5 T: a site that has calibrated sets one cut-off per field
# strength (registry.followup.threshold_for); unset (None), VBQ_HIGH_THRESHOLD applies.
VBQ_HIGH_THRESHOLD_1_5T = env.float("VBQ_HIGH_THRESHOLD_1_5T", default=None)
VBQ_HIGH_THRESHOLD_3T = env.float("VBQ_HIGH_THRESHOLD_3T", default=None)
# An automatic result moves alerts only with no QC warning and at least this confidence
# (scoring.trust); any other result only once a reviewer accepts it.
VBQ_TRUST_MIN_CONFIDENCE = env.float("VBQ_TRUST_MIN_CONFIDENCE", default=0.8)
FOLLOWUP_DAYS = env.int("FOLLOWUP_DAYS", default=60)
VBQ_ALERT_VALUE = env.str("VBQ_ALERT_VALUE", default="excluding_fractured")
if VBQ_ALERT_VALUE not in {"excluding_fractured", "all_levels"}:
    raise environ.ImproperlyConfigured(
        "VBQ_ALERT_VALUE must be 'excluding_fractured' or 'all_levels'"
    )
PRE_PROCEDURE_MRI_WINDOW_DAYS = env.int("PRE_PROCEDURE_MRI_WINDOW_DAYS", default=180)
VBQ_MISSING_AFTER_DAYS = env.int("VBQ_MISSING_AFTER_DAYS", default=14)
ALERT_ESCALATE_AFTER_DAYS = env.int("ALERT_ESCALATE_AFTER_DAYS", default=7)
# How long a person's resolve of an alert can be undone (worklist "Undo resolve", audited).
ALERT_REOPEN_WINDOW_SECONDS = env.int("ALERT_REOPEN_WINDOW_SECONDS", default=24 * 3600)
FOLLOWUP_LOOKBACK_DAYS = env.int("FOLLOWUP_LOOKBACK_DAYS", default=730)
SMALL_CELL_MIN = env.int("SMALL_CELL_MIN", default=5)
DEFAULT_CARE_TEAM = env.str("DEFAULT_CARE_TEAM", default="fracture-liaison")

# --- Integrations -----------------------------------------------------------------------------
FHIR_MAX_PAYLOAD_BYTES = env.int("FHIR_MAX_PAYLOAD_BYTES", default=50 * 1024 * 1024)
# Deepest nesting of JSON arrays/objects a FHIR payload may have (checked before parsing:
# a Bundle of resources is ~12 deep; ~150 nested extensions exhaust the FHIR models' stack).
FHIR_MAX_JSON_DEPTH = env.int("FHIR_MAX_JSON_DEPTH", default=64)
# Most entries in one Bundle, and most items in any other JSON array of a FHIR payload (413:
# bounds the work one request can ask for within the size limit).
FHIR_MAX_BUNDLE_ENTRIES = env.int("FHIR_MAX_BUNDLE_ENTRIES", default=10_000)
FHIR_MAX_ARRAY_ITEMS = env.int("FHIR_MAX_ARRAY_ITEMS", default=1_000)
DATA_UPLOAD_MAX_MEMORY_SIZE = FHIR_MAX_PAYLOAD_BYTES + 1024 * 1024
PACS_DICOMWEB_URL = env.str("PACS_DICOMWEB_URL", default="")
PACS_DICOMWEB_USERNAME = env.str("PACS_DICOMWEB_USERNAME", default="")
PACS_DICOMWEB_PASSWORD = env.str("PACS_DICOMWEB_PASSWORD", default="")
# VBQ results stored back in the PACS as DICOM SR + overlay Secondary Capture
# (integrations/dicom/export.py): DICOMweb base URLs whose studies get them ("default" =
# PACS_DICOMWEB_URL, "*" = every endpoint). Empty (the default, and the embedded demo): off.
PACS_EXPORT_ENDPOINTS = [
    url.strip() for url in env.list("PACS_EXPORT_ENDPOINTS", default=[]) if url.strip()]
# An automatic (unreviewed) result is exported only with no QC flag and at least this confidence.
PACS_EXPORT_MIN_CONFIDENCE = env.float("PACS_EXPORT_MIN_CONFIDENCE", default=0.9)
if not 0 <= PACS_EXPORT_MIN_CONFIDENCE <= 1:
    raise environ.ImproperlyConfigured("PACS_EXPORT_MIN_CONFIDENCE must be between 0 and 1")
PACS_EXPORT_EVERY_SECONDS = env.int("PACS_EXPORT_EVERY_SECONDS", default=60)
# Further DICOMweb endpoints of the site a study's recorded endpoint may select (without the
# PACS credentials); any other recorded address is provenance only, never contacted.
PACS_DICOMWEB_ALLOWED_URLS = env.list("PACS_DICOMWEB_ALLOWED_URLS", default=[])
READYZ_PACS_TIMEOUT_SECONDS = env.float("READYZ_PACS_TIMEOUT_SECONDS", default=2.0)
DICOM_STORAGE_ROOT = Path(env.str("DICOM_STORAGE_ROOT", default=str(VAR_DIR / "dicom")))
DICOM_SCP_AE_TITLE = env.str("DICOM_SCP_AE_TITLE", default="VBQREGISTRY")
DICOM_SCP_PORT = env.int("DICOM_SCP_PORT", default=11112)
DICOM_SCP_BIND = env.str("DICOM_SCP_BIND", default="127.0.0.1")
DICOM_STUDY_COMPLETE_SECONDS = env.int("DICOM_STUDY_COMPLETE_SECONDS", default=30)
# DICOM PatientID of received studies is looked up under this identifier system (the MRN).
DICOM_PATIENT_ID_SYSTEM = env.str(
    "DICOM_PATIENT_ID_SYSTEM", default="https://vbq-registry.example.org/fhir/sid/synthetic-mrn"
)
EHR_OUTBOUND_FHIR_URL = env.str("EHR_OUTBOUND_FHIR_URL", default="")
EHR_OUTBOUND_FHIR_TOKEN = env.str("EHR_OUTBOUND_FHIR_TOKEN", default="")

# --- Email ------------------------------------------------------------------------------------
EMAIL_BACKEND = env.str(
    "EMAIL_BACKEND",
    default="django.core.mail.backends.console.EmailBackend"
    if DEBUG
    else "django.core.mail.backends.smtp.EmailBackend",
)
EMAIL_HOST = env.str("EMAIL_HOST", default="127.0.0.1")
EMAIL_PORT = env.int("EMAIL_PORT", default=25)
EMAIL_HOST_USER = env.str("EMAIL_HOST_USER", default="")
EMAIL_HOST_PASSWORD = env.str("EMAIL_HOST_PASSWORD", default="")
EMAIL_USE_TLS = env.bool("EMAIL_USE_TLS", default=False)
EMAIL_TIMEOUT = env.int("EMAIL_TIMEOUT", default=10)
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="vbq-registry@localhost")
# Email digest recipients per care team: "team=a@x.org;b@x.org,other=c@x.org" ("*" = any team).
CARE_TEAM_EMAILS: dict[str, list[str]] = {
    team.strip(): [a.strip() for a in addresses.split(";") if a.strip()]
    for team, _, addresses in (
        item.partition("=") for item in env.list("CARE_TEAM_EMAILS", default=[]) if "=" in item
    )
}
SITE_URL = env.str("SITE_URL", default="http://127.0.0.1:8000")
# CDS Hooks: identifier system of the EHR's patient ids (context.patientId).
CDS_PATIENT_ID_SYSTEM = env.str(
    "CDS_PATIENT_ID_SYSTEM", default="https://vbq-registry.example.org/fhir/sid/synthetic-mrn"
)

# --- Celery -----------------------------------------------------------------------------------
BROKER_DIR = VAR_DIR / "broker"
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="filesystem://")
if CELERY_BROKER_URL.startswith("filesystem://"):
    for sub in ("queue", "processed", "control"):
        (BROKER_DIR / sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "processed_folder": str(BROKER_DIR / "processed"),
        "control_folder": str(BROKER_DIR / "control"),
        "store_processed": False,
    }
else:
    # A task not acknowledged within this many seconds is re-delivered (acks_late tasks).
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": env.int("CELERY_VISIBILITY_TIMEOUT", default=3600),
    }
CELERY_RESULT_BACKEND = env.str("CELERY_RESULT_BACKEND", default="") or None
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = CLINIC_TIME_ZONE
CELERY_ENABLE_UTC = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Workers keep their PostgreSQL connection between tasks (Celery's Django fixup otherwise
# closes it before and after every task: a new connection, ~5 ms, twice per task).
# config/celery.py still runs close_old_connections() around each task, so CONN_MAX_AGE,
# CONN_HEALTH_CHECKS and dropping a broken connection (database restarted) keep working.
CELERY_DB_REUSE_MAX = env.int("CELERY_DB_REUSE_MAX", default=1_000_000)
# Workers keep large freed blocks in their heap between jobs (config/worker_memory.py).
WORKER_MALLOC_TUNING = env.bool("WORKER_MALLOC_TUNING", default=True)
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_CONNECTION_TIMEOUT = env.float("CELERY_BROKER_CONNECTION_TIMEOUT", default=4.0)
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
FOLLOWUP_SWEEP_HOUR = env.int("FOLLOWUP_SWEEP_HOUR", default=6)
FOLLOWUP_SWEEP_MINUTE = env.int("FOLLOWUP_SWEEP_MINUTE", default=0)
# Testing/ops override: run the sweep every N seconds instead of daily (0 = daily crontab).
FOLLOWUP_SWEEP_EVERY_SECONDS = env.int("FOLLOWUP_SWEEP_EVERY_SECONDS", default=0)
DELIVERY_EVERY_SECONDS = env.int("DELIVERY_EVERY_SECONDS", default=60)


def _beat_schedule() -> dict[str, dict]:
    from celery.schedules import crontab

    sweep_schedule = (
        float(FOLLOWUP_SWEEP_EVERY_SECONDS)
        if FOLLOWUP_SWEEP_EVERY_SECONDS
        else crontab(hour=FOLLOWUP_SWEEP_HOUR, minute=FOLLOWUP_SWEEP_MINUTE)
    )
    return {
        "followup-sweep": {"task": "registry.followup_sweep", "schedule": sweep_schedule},
        "alert-deliveries": {
            "task": "registry.deliveries_send",
            "schedule": float(DELIVERY_EVERY_SECONDS),
        },
        "vbq-requeue-stale": {"task": "scoring.vbq_requeue_stale", "schedule": 120.0},
        **({"pacs-exports": {"task": "integrations.dicom_exports_send",
                             "schedule": float(PACS_EXPORT_EVERY_SECONDS)}}
           if PACS_EXPORT_ENDPOINTS else {}),
    }


CELERY_BEAT_SCHEDULE: dict[str, dict] = _beat_schedule()

# --- REST framework ---------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # JSON only: DRF's browsable HTML pages use inline styles and scripts that the
    # Content-Security-Policy blocks (a broken page in a browser); /api/docs/ documents the API.
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "VBQ Registry API",
    "DESCRIPTION": "Non-FHIR API of the VBQ Registry (FHIR endpoints are described by "
    "/fhir/metadata).",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    # Swagger UI / Redoc served from our own static files (drf-spectacular-sidecar), no CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# --- Logging: ids only, never names, MRNs or birth dates --------------------------------------
LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
# "plain" (default) or "json" (one object per line, config/logging.py); both redact MRN-like text.
LOG_FORMAT = env.str("LOG_FORMAT", default="plain")
LOGGING = build_logging(log_format=LOG_FORMAT, level=LOG_LEVEL)

# The demo cohort and demo logins exist only where this is on (embedded `make run`).
DEMO_MODE = env.bool("DEMO_MODE", default=False)
