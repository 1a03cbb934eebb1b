"""register() as call, on a list, as decorator; twice is harmless."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from django.db.models import Model
from django.db.models.signals import post_save
from twitter.models import Tweet

import scalepub
from scalepub.django.registry import registry
from scalepub.nodes import InvalidNodeName
from scalepub.settings import Settings
from tests.streams import read_all

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def restore_tweet() -> Iterator[None]:
    original = registry.get(Tweet)
    yield
    assert original is not None
    scalepub.register(Tweet, node=original.node)


def receivers() -> int:
    return len(post_save._live_receivers(Tweet)[0])


def test_register_twice_one_entry_per_row(
    scalepub_django: Settings, redis_client: redis.Redis, restore_tweet: None
) -> None:
    count = receivers()
    assert scalepub.register(Tweet) is Tweet
    scalepub.register([Tweet])
    scalepub.register()(Tweet)
    assert receivers() == count
    Tweet.objects.create(author="x", text="once")
    [entry] = read_all(redis_client, scalepub_django)
    assert entry.env.node == "/twitter/Tweet"  # the default node name


def test_unregister_stops_publishing(
    scalepub_django: Settings, redis_client: redis.Redis, restore_tweet: None
) -> None:
    scalepub.unregister(Tweet)
    Tweet.objects.create(author="x", text="not published")
    assert read_all(redis_client, scalepub_django) == []


def test_register_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="Django model classes"):
        scalepub.register(object)
    with pytest.raises(InvalidNodeName, match="invalid node name"):
        scalepub.register(Tweet, node="no leading slash")
    with pytest.raises(TypeError, match="node must be"):
        scalepub.register(Tweet, node=42)


def test_register_wraps_save_once_and_unregister_restores_it(restore_tweet: None) -> None:
    wrapped = Tweet.__dict__["_do_insert"]
    scalepub.register(Tweet)
    assert Tweet.__dict__["_do_insert"] is wrapped  # registering again: no second wrapper
    scalepub.unregister(Tweet)
    assert "_do_insert" not in Tweet.__dict__  # Django's own _do_insert again
    assert Tweet._do_insert is Model._do_insert
    assert "save_base" not in Tweet.__dict__  # the save around it is Django's, untouched
