"""Django → Redis Streams hand-off, against the real Redis of the session stack."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import cast

import pytest
import redis
from django.core import serializers
from django.core.management import call_command
from django.db import transaction
from django.test import override_settings
from prometheus_client import REGISTRY
from twitter.models import Tweet

import scalepub
from scalepub.django.announce import NodeError
from scalepub.django.models import OutboxEntry
from scalepub.django.producer import get_producer
from scalepub.django.registry import registry
from scalepub.settings import Settings
from scalepub.sharding import shard_for
from tests.streams import read_all

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("scalepub_enqueue_failures_total", {"reason": reason}) or 0.0


def test_thousand_tweets_fifty_nodes(scalepub_django: Settings, redis_client: redis.Redis) -> None:
    for i in range(1000):
        Tweet.objects.create(author=f"user{i % 50}", text=f"tweet {i}")
    entries = read_all(redis_client, scalepub_django)
    assert len(entries) == 1000
    seqs: dict[str, list[int]] = defaultdict(list)
    for e in entries:
        assert e.shard == shard_for(e.env.node, scalepub_django.shards)
        seqs[e.env.node].append(e.env.seq)
    assert len(seqs) == 50
    for node, got in seqs.items():
        assert got == list(range(1, 21)), node  # per node: 1..n, no gap, in stream order
    by_pk = {t.pk: t for t in Tweet.objects.all()}
    for e in entries:
        [obj] = serializers.deserialize("xml", e.env.payload.decode())
        original = by_pk[int(e.env.pk)]
        assert obj.object.pk == original.pk and obj.object.text == original.text
        assert e.env.node == f"/twitter/Tweet/{original.author}"
        assert e.env.model == "twitter.tweet"


def test_updates_raw_loads_and_rollbacks_publish_nothing(
    scalepub_django: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    tweet = Tweet.objects.create(author="alice", text="first")
    tweet.text = "edited"
    tweet.save()
    with pytest.raises(RuntimeError), transaction.atomic():
        Tweet.objects.create(author="alice", text="never committed")
        raise RuntimeError("roll back")
    fixture = tmp_path / "tweets.json"
    fixture.write_text(
        '[{"model": "twitter.tweet", "pk": 9001, "fields": {"author": "bob", "text": "loaded",'
        ' "created_at": "2026-01-01T00:00:00Z"}}]'
    )
    call_command("loaddata", str(fixture), verbosity=0)
    entries = read_all(redis_client, scalepub_django)
    assert [(e.env.pk, e.env.seq) for e in entries] == [(str(tweet.pk), 1)]
    assert Tweet.objects.filter(pk=9001).exists()


def test_inside_transaction_published_after_commit(
    scalepub_django: Settings, redis_client: redis.Redis
) -> None:
    with transaction.atomic():
        Tweet.objects.create(author="carol", text="a")
        Tweet.objects.create(author="carol", text="b")
        assert read_all(redis_client, scalepub_django) == []
    assert [e.env.seq for e in read_all(redis_client, scalepub_django)] == [1, 2]


def test_redis_down_save_succeeds_and_failure_counted(scalepub_django: Settings) -> None:
    closed = f"redis://127.0.0.1:{_closed_port()}/0"
    before = failures("redis")
    with override_settings(SCALEPUB={"REDIS_URL": closed, "REDIS_TIMEOUT": "0.5",
                                     "DELIVERY": "direct"}):
        tweet = Tweet.objects.create(author="dave", text="redis is down")
    assert Tweet.objects.filter(pk=tweet.pk).exists()
    assert failures("redis") == before + 1
    # direct delivery spills to the outbox: the relay appends it once Redis is back
    [kept] = OutboxEntry.objects.all()
    assert (kept.node, kept.object_pk) == ("/twitter/Tweet/dave", str(tweet.pk))


def test_unreachable_redis_bounds_the_save(scalepub_django: Settings) -> None:
    # A blackholed address never answers the SYN: only the timeout ends the wait.
    with override_settings(SCALEPUB={"REDIS_URL": "redis://10.255.255.1:6379/0",
                                     "REDIS_TIMEOUT": "0.3", "DELIVERY": "direct"}):
        started = time.monotonic()
        Tweet.objects.create(author="erin", text="slow network")
        elapsed = time.monotonic() - started
    # One connect attempt plus one retry, each bounded by REDIS_TIMEOUT; generous slack.
    assert elapsed < 0.3 * 2 + 1.0


def test_publish_many_after_bulk_create(scalepub_django: Settings, redis_client: redis.Redis) -> None:
    tweets = Tweet.objects.bulk_create(
        [Tweet(author=f"bulk{i % 7}", text=str(i)) for i in range(70)]
    )
    assert read_all(redis_client, scalepub_django) == []  # bulk_create sends no signals
    scalepub.publish_many(tweets)
    entries = read_all(redis_client, scalepub_django)
    assert sorted(int(e.env.pk) for e in entries) == sorted(t.pk for t in tweets)
    per_node: dict[str, list[int]] = defaultdict(list)
    for e in entries:
        per_node[e.env.node].append(e.env.seq)
    assert all(seqs == list(range(1, 11)) for seqs in per_node.values())
    scalepub.publish(tweets[0], node="/twitter/Explicit")
    assert [e.env.node for e in read_all(redis_client, scalepub_django)].count(
        "/twitter/Explicit") == 1


@pytest.mark.parametrize("delivery", ["scalepub_django", "outbox_django"])
def test_bad_node_rule_fails_the_save(
    delivery: str, request: pytest.FixtureRequest, redis_client: redis.Redis
) -> None:
    settings: Settings = request.getfixturevalue(delivery)
    before = failures("node")
    with pytest.raises(NodeError, match=r"twitter\.Tweet pk=\d+ to node '/twitter/Tweet/has\\ttab'"
                                        r".*U\+0009"):
        Tweet.objects.create(author="has\ttab", text="invalid node name")
    assert failures("node") == before + 1
    assert not Tweet.objects.exists()  # never a row without its entry
    assert not OutboxEntry.objects.exists()
    assert read_all(redis_client, settings) == []


def test_json_format(scalepub_django: Settings, redis_client: redis.Redis) -> None:
    with override_settings(SCALEPUB={"REDIS_URL": scalepub_django.redis_url,
                                     "KEY_PREFIX": scalepub_django.key_prefix,
                                     "SHARDS": 4, "PAYLOAD_FORMAT": "json",
                                     "DELIVERY": "direct"}):
        tweet = Tweet.objects.create(author="frank", text="json please")
        get_producer()
    [entry] = read_all(redis_client, scalepub_django)
    assert entry.env.fmt == "json"
    [obj] = serializers.deserialize("json", entry.env.payload.decode())
    assert obj.object.text == tweet.text


def _closed_port() -> int:
    from tests.stack import free_port

    return free_port()


@pytest.mark.parametrize(("rule", "says"), [
    (lambda t: 42, "must be a str, got int"),
    (lambda t: "", "must start with /"),
    (lambda t: "/" + "é" * 200, "401 bytes of UTF-8, more than 255"),
    (lambda t: cast(dict[str, str], {})["missing"], "raised KeyError"),
])
def test_every_kind_of_bad_node_rule_fails_the_save(
    outbox_django: Settings, rule: object, says: str
) -> None:
    original = registry.get(Tweet)
    assert original is not None
    scalepub.register(Tweet, node=rule)
    try:
        with pytest.raises(NodeError, match=r"twitter\.Tweet pk=\d+") as failed:
            Tweet.objects.create(author="x", text="bad rule")
    finally:
        scalepub.register(Tweet, node=original.node)
    assert says in str(failed.value)
    assert not Tweet.objects.exists() and not OutboxEntry.objects.exists()
