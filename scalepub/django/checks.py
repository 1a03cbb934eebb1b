"""Django system checks: what a newcomer gets wrong, reported by ``manage.py check`` (and
before ``runserver`` and ``migrate``) with a hint, instead of a traceback later.

- ``scalepub.E001``: a bad ``SCALEPUB`` setting (the message names it).
- ``scalepub.E002``: ``HISTORY_ACCESS`` does not name an importable callable.
- ``scalepub.E003``: ``HISTORY_RATE_LIMIT`` does not name an importable callable.
- ``scalepub.W001``: the scalepub migration is not applied: registered saves would fail.
- ``scalepub.W002``: ``SHARDS`` differs from the shard count the pool recorded in Redis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, connections
from django.db.migrations.loader import MigrationLoader

from scalepub.connections import sync_client
from scalepub.django.runtime import load_settings, outbox_databases
from scalepub.settings import DJANGO_SETTING, Settings, SettingsError
from scalepub.sharding import Keys

# The shard-count check asks Redis at most this long: a check must not hang a command.
REDIS_CHECK_TIMEOUT_S = 0.5
_SETTINGS_HINT = (f"Fix {DJANGO_SETTING} in settings.py; the settings and their defaults are "
                  "listed in scalepub's README (section Settings).")


def install() -> None:
    """Register the checks (``AppConfig.ready``)."""
    register(check_settings)
    register(check_history_access)
    register(check_history_rate_limit)
    register(check_migrations, Tags.database)
    register(check_shard_count)


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """E001: the ``SCALEPUB`` dict builds a valid Settings."""
    try:
        load_settings()
    except SettingsError as exc:
        return [Error(str(exc), hint=_SETTINGS_HINT, id="scalepub.E001")]
    return []


def check_history_access(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """E002: ``HISTORY_ACCESS`` imports and is callable (not only at the first request)."""
    return _hook_check("history_access", "scalepub.E002", (
        "Give the dotted path of a callable (request, node) -> bool, e.g. "
        "'myapp.access.can_read_history', or remove HISTORY_ACCESS to leave the history "
        "open."))


def check_history_rate_limit(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """E003: ``HISTORY_RATE_LIMIT`` imports and is callable (not only at the first request)."""
    return _hook_check("history_rate_limit", "scalepub.E003", (
        "Give the dotted path of a callable (request, node) -> bool that returns False or "
        "raises scalepub.django.views.HistoryRateLimited to refuse, e.g. "
        "'myproject.limits.history', or remove HISTORY_RATE_LIMIT for no limit."))


def _hook_check(name: str, check_id: str, hint: str) -> list[CheckMessage]:
    """The setting ``name`` (a dotted path of a history view hook) loads as a callable."""
    settings = _settings()
    path = getattr(settings, name, "") if settings is not None else ""
    if not path:
        return []
    from scalepub.django.views import load_hook

    try:
        load_hook(name.upper(), path)
    except ImproperlyConfigured as exc:
        return [Error(str(exc), id=check_id, hint=hint)]
    return []


def check_migrations(app_configs: Any = None, databases: Sequence[str] | None = None,
                     **kwargs: Any) -> list[CheckMessage]:
    """W001: the scalepub migrations are applied where the outbox lives."""
    aliases = outbox_databases() if databases is None else [
        alias for alias in databases if alias in outbox_databases()]
    found: list[CheckMessage] = []
    for alias in aliases:
        missing = _unapplied(alias)
        if missing:
            # without 0001 there is no outbox table; later ones (0002: PostgreSQL's commit
            # notifications) leave saves working
            effect = ("every save of a registered model will fail until they are"
                      if "0001_initial" in missing else
                      "saves work, but on PostgreSQL the relay is not woken by other "
                      "processes' commits (it looks once a second) until they are")
            found.append(Warning(
                f"scalepub migration(s) {', '.join(missing)} not applied to database "
                f"{alias!r}: {effect}",
                hint=f"Run `manage.py migrate` (or `manage.py migrate scalepub --database "
                     f"{alias}`).", id="scalepub.W001"))
    return found


def check_shard_count(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """W002: SHARDS agrees with the pool's recorded shard count (skipped if Redis is away)."""
    settings = _settings()
    if settings is None:
        return []
    key = Keys(settings.key_prefix).shard_count
    client = sync_client(settings, timeout=min(settings.redis_timeout, REDIS_CHECK_TIMEOUT_S))
    try:
        recorded = client.get(key)
    except redis.RedisError:
        return []  # unreachable now: nothing to compare with, and a check must not fail here
    finally:
        client.close()
    if recorded is None or int(recorded) == settings.shards:
        return []
    return [Warning(
        f"{DJANGO_SETTING}['SHARDS'] is {settings.shards} but the pool recorded "
        f"{int(recorded)} shards in Redis ({key} at {settings.redis_url_redacted}): appends "
        "will be refused (SHARDMISMATCH) and entries wait in the outbox",
        hint=f"Set {DJANGO_SETTING}['SHARDS'] = {int(recorded)} to match `scalepub run "
             f"--shards {int(recorded)}`, or restart the pool with --shards {settings.shards} "
             "once its streams are drained.", id="scalepub.W002")]


def _settings() -> Settings | None:
    """The settings, or None when they are bad (E001 reports that)."""
    try:
        return load_settings()
    except SettingsError:
        return None


def _unapplied(alias: str) -> list[str]:
    try:
        loader = MigrationLoader(connections[alias], ignore_no_migrations=True)
    except DatabaseError:
        return []  # the database is unreachable: Django's own checks and commands say so
    mine = sorted(name for app, name in loader.graph.nodes if app == "scalepub")
    return [name for name in mine if ("scalepub", name) not in loader.applied_migrations]
