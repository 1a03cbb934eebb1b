"""Settings of the example project: scalepub and the database configured from the environment.

``eval "$(ops/stack env)"`` gives it the local stack, PostgreSQL included (``DATABASE_URL``);
without ``DATABASE_URL`` it uses SQLite, whose file ``EXAMPLE_DB`` moves.
"""

import os
import tempfile
from pathlib import Path

import dj_database_url

from scalepub.settings import env_mapping

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.admin",  # /admin/: the outbox backlog (scalepub.django.admin)
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "scalepub.django",
    "twitter",
    "kitchensink",
    "fieldzoo",  # one field of each kind: the fast serializer's tests, bench_ingest
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "exampleproject.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    }
]
WSGI_APPLICATION = "exampleproject.wsgi.application"

SQLITE = {
    "ENGINE": "django.db.backends.sqlite3",
    "NAME": os.environ.get("EXAMPLE_DB", str(BASE_DIR / "db.sqlite3")),
    "OPTIONS": {
        # WAL lets the outbox relay read while requests write; IMMEDIATE takes the write
        # lock at BEGIN, so concurrent writers wait (timeout) instead of failing to upgrade.
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    },
    # A file, not shared-cache memory: there a reader's table lock fails a writer at once
    # (no busy wait), and the relay thread reads while tests write. One file per process.
    "TEST": {"NAME": str(Path(tempfile.gettempdir()) / f"scalepub-test-{os.getpid()}.db")},
}


def postgres(url: str) -> dict[str, object]:
    """DATABASES entry of a ``postgres://user:password@host:port/name`` URL (psycopg 3)."""
    db = dict(dj_database_url.parse(url, conn_max_age=60, conn_health_checks=True))
    # One test database per process, like SQLite's file: parallel test runs do not collide.
    db["TEST"] = {"NAME": f"test_{db['NAME']}_{os.getpid()}"}
    return db


DATABASES = {
    "default": postgres(os.environ["DATABASE_URL"]) if os.environ.get("DATABASE_URL")
    else SQLITE,
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"
# The browser client's bundle (client/js: `npm run build`).
STATICFILES_DIRS = [BASE_DIR.parent / "client" / "js" / "dist"]

# Every SCALEPUB_* variable of a known setting, e.g. from `eval "$(ops/stack env)"`.
SCALEPUB = env_mapping()

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"scalepub": {"handlers": ["console"], "level": "INFO"}},
}
