"""Settings of the example project: SQLite, scalepub configured from the environment.

``eval "$(ops/stack env)"`` gives it the local stack; ``EXAMPLE_DB`` moves the database file.
"""

import os
from pathlib import Path

from scalepub.settings import env_mapping

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.staticfiles",
    "scalepub.django",
    "twitter",
]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "exampleproject.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {},
    }
]
WSGI_APPLICATION = "exampleproject.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("EXAMPLE_DB", str(BASE_DIR / "db.sqlite3")),
    }
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
