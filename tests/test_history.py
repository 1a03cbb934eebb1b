"""The history endpoint subscribers catch up from."""

from __future__ import annotations

import contextlib

import pytest
import redis
from django.test import Client, override_settings
from twitter.models import Tweet

from scalepub.settings import Settings
from scalepub.sharding import CONSUMER_GROUP, Keys

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]


def get(client: Client, **params: object) -> dict:  # type: ignore[type-arg]
    response = client.get("/scalepub/history", params)
    assert response.status_code == 200, response.content
    return response.json()


def test_entries_after_a_seq_in_order(scalepub_django: Settings) -> None:
    for i in range(30):
        Tweet.objects.create(author=f"h{i % 3}", text=f"t{i}")
    client = Client()
    body = get(client, node="/twitter/Tweet/h1", after=4)
    assert [e["seq"] for e in body["entries"]] == [5, 6, 7, 8, 9, 10]
    assert body["last_seq"] == 10 and body["lost"] is False
    assert all(e["node"] == "/twitter/Tweet/h1" for e in body["entries"])
    assert body["entries"][0]["payload"].startswith("<django-objects")
    assert get(client, node="/twitter/Tweet/h1", after=10)["entries"] == []
    paged = get(client, node="/twitter/Tweet/h1", after=0, limit=4)
    assert [e["seq"] for e in paged["entries"]] == [1, 2, 3, 4]


def test_trimmed_history_says_lost(scalepub_django: Settings) -> None:
    small = {"REDIS_URL": scalepub_django.redis_url, "KEY_PREFIX": scalepub_django.key_prefix,
             "SHARDS": 1, "STREAM_MAXLEN": 10, "DELIVERY": "direct"}
    client = redis.Redis.from_url(scalepub_django.redis_url)
    stream = Keys(scalepub_django.key_prefix).stream(0)
    with override_settings(SCALEPUB=small):
        for i in range(300):
            Tweet.objects.create(author="trim", text=f"t{i}")
            if i % 5 == 4:  # a pool's part: only published (acknowledged) entries are trimmed
                acknowledge_all(client, stream)
        body = get(Client(), node="/twitter/Tweet/trim", after=0)
    assert body["lost"] is True and body["last_seq"] == 300
    seqs = [e["seq"] for e in body["entries"]]
    assert seqs and seqs[-1] == 300 and seqs == sorted(seqs) and seqs[0] > 1


def acknowledge_all(client: redis.Redis, stream: str) -> None:
    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP
        client.xgroup_create(stream, CONSUMER_GROUP, id="0")
    for _, entries in client.xreadgroup(CONSUMER_GROUP, "test", {stream: ">"}):
        client.xack(stream, CONSUMER_GROUP, *[sid for sid, _ in entries])


def test_bad_requests() -> None:
    client = Client()
    assert client.get("/scalepub/history", {"node": "no slash"}).status_code == 400
    assert client.get("/scalepub/history", {"node": "/a", "after": "x"}).status_code == 400
    assert client.post("/scalepub/history").status_code == 405
