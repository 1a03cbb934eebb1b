"""Fixtures: one real Redis + ejabberd per test session, isolated key prefixes per test."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from typing import Any

import hypothesis  # noqa: F401  (imported before any test thread: CPython 3.11.7's gh-106905)
import pytest
import redis
from django.test import override_settings

from scalepub.settings import Settings, env_mapping
from tests.stack import Stack, running


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """A private Redis + ejabberd on free loopback ports, stopped after the session."""
    yield from running()


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
