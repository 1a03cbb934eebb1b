"""Fixtures: one real Redis + ejabberd per test session, isolated key prefixes per test."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import hypothesis  # imported before any test thread: CPython 3.11.7's gh-106905
import pytest
import redis
from django.test import override_settings

from scalepub.settings import Settings, env_mapping
from tests.stack import Stack, running

# No per-example deadline: property tests check what the code does, not how fast (a 200 ms
# deadline failed test_policy's 300-entry resolutions on the shared box under load).
hypothesis.settings.register_profile("scalepub", deadline=None)
hypothesis.settings.load_profile("scalepub")

# The database Django's tests run on: `sqlite` (the example project's default) or `postgres`
# (the session stack's PostgreSQL). `make test` runs the Django modules once more on the latter.
TEST_DATABASE_VAR = "SCALEPUB_TEST_DATABASE"
TEST_DATABASES = ("sqlite", "postgres")


def chosen_database() -> str:
    """The value of SCALEPUB_TEST_DATABASE (default sqlite); a bad one names the variable."""
    value = os.environ.get(TEST_DATABASE_VAR, "sqlite")
    if value not in TEST_DATABASES:
        raise pytest.UsageError(f"{TEST_DATABASE_VAR} must be one of {', '.join(TEST_DATABASES)} "
                                f"(got {value!r})")
    return value


# The suite's own knobs; every other SCALEPUB_* variable, and DATABASE_URL, configures a
# stack or the app and is left out of the run: a shell that ran `eval "$(ops/stack env)"`
# (as the benchmarks ask) would otherwise point the example project at that stack's
# PostgreSQL, or `ops/stack up` of a test stack at a Redis Cluster. Each test stack exports
# its own values.
KEPT_VARIABLES = frozenset({TEST_DATABASE_VAR, "SCALEPUB_FAULT_RESULTS",
                            "SCALEPUB_EJABBERD_START_TIMEOUT", "SCALEPUB_EJABBERD_ERL_FLAGS"})


def inherited_settings(environ: Mapping[str, str]) -> list[str]:
    """The variables of ``environ`` a test run leaves out (``KEPT_VARIABLES`` stay)."""
    return sorted(name for name in environ
                  if (name.startswith("SCALEPUB_") or name == "DATABASE_URL")
                  and name not in KEPT_VARIABLES)


def pytest_configure(config: pytest.Config) -> None:
    chosen_database()  # a bad value stops the run before any test
    config.stash[_LEFT_OUT] = inherited_settings(os.environ)
    for name in config.stash[_LEFT_OUT]:
        del os.environ[name]


def pytest_report_header(config: pytest.Config) -> str | None:
    left_out = config.stash.get(_LEFT_OUT, [])
    return f"left out of this run's environment: {', '.join(left_out)}" if left_out else None


_LEFT_OUT = pytest.StashKey[list[str]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``postgres`` need Django on PostgreSQL: they run in the PostgreSQL pass."""
    if chosen_database() == "postgres":
        return
    keep = [item for item in items if item.get_closest_marker("postgres") is None]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """A private Redis + ejabberd + PostgreSQL on free loopback ports, stopped after the
    session."""
    yield from running(SCALEPUB_POSTGRES="on")


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix: None,
                                 request: pytest.FixtureRequest) -> None:
    """pytest-django's hook before it creates the test database: in the PostgreSQL pass, the
    default database becomes the session stack's PostgreSQL."""
    if chosen_database() == "postgres":
        use_database_url(request.getfixturevalue("stack").env["DATABASE_URL"])


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None) -> Iterator[None]:
    """pytest-django's test database; this process's relay threads (and their LISTEN
    sessions) stop before it is dropped: PostgreSQL refuses to drop a database in use."""
    yield
    from scalepub.django.runtime import runtime

    runtime.stop()


def use_database_url(url: str) -> None:
    """Point Django's default database at ``url``, in place (the connection handler and the
    settings share the dict), before any connection to it is opened."""
    from django.conf import settings
    from django.db import connections
    from exampleproject.settings import postgres

    fresh = connections.configure_settings({"default": postgres(url)})["default"]
    db = settings.DATABASES["default"]
    db.clear()
    db.update(fresh)
    connections["default"].close()
    del connections["default"]  # the next use makes a wrapper of the new engine


@pytest.fixture
def redis_client(stack: Stack) -> Iterator[redis.Redis]:
    """A client of the session's Redis."""
    client = redis.Redis.from_url(stack.env["SCALEPUB_REDIS_URL"])
    yield client
    client.close()


@pytest.fixture
def settings_for(stack: Stack, redis_client: redis.Redis) -> Iterator[Settings]:
    """Settings of the session's stack under a fresh key prefix; its keys are deleted after."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    yield Settings.from_mapping(env_mapping(stack.env), key_prefix=prefix, shards=4)
    for key in redis_client.scan_iter(match=f"{prefix}:*", count=1000):
        redis_client.delete(key)


@pytest.fixture
def scalepub_django(settings_for: Settings) -> Iterator[Settings]:
    """The Django side pointed at the session's stack, ``direct`` delivery (append on commit)."""
    yield from django_side(settings_for.replace(delivery="direct"))


@pytest.fixture
def outbox_django(settings_for: Settings) -> Iterator[Settings]:
    """The Django side pointed at the session's stack, ``outbox`` delivery (the default)."""
    yield from django_side(settings_for.replace(delivery="outbox"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (tests/test_browser.py's Browser), shared by the browser tests."""
    from tests.test_browser import BUNDLE, CHROMIUM, REPO, Browser

    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `ops/stack install` (as root)")
    if not BUNDLE.exists():
        pytest.fail(f"{BUNDLE.relative_to(REPO)} is missing: "
                    "cd client/js && npm ci && npm run build")
    b = Browser()
    try:
        yield b
    finally:
        b.close()


def django_side(settings: Settings) -> Iterator[Settings]:
    """``settings.SCALEPUB`` set to ``settings`` while the generator is suspended."""
    with override_settings(SCALEPUB=env_mapping(_as_env(settings))):
        yield settings


def _as_env(settings: Settings) -> dict[str, str]:
    return {"SCALEPUB_" + k.upper(): str(v) for k, v in dataclasses.asdict(settings).items()}
