"""Writers that commit out of id order on PostgreSQL: the relay skips and reorders nothing.

The classic outbox-relay trap: ids are taken at INSERT, rows become visible at COMMIT, so a
transaction holding a lower id can commit after the relay moved a higher one. A relay that
remembered "moved up to id N" would skip the late row for ever. scalepub's relay reads what
the table holds and deletes what it moved, so the late row is simply found by a later round,
and a node's seqs follow the order the rows became visible (docs/reliability.md §1, "Relay
order"). SQLite cannot produce the situation: its writers hold the write lock from BEGIN
(``transaction_mode = IMMEDIATE``) to COMMIT, so ids are taken in commit order.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict

import pytest
import redis
from django.db import connection, transaction
from twitter.models import Tweet

from scalepub.django.models import OutboxEntry
from scalepub.settings import Settings
from tests.streams import StoredEntry, read_all, wait_for_entries

pytestmark = [pytest.mark.stack, pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


class HeldWriter(threading.Thread):
    """Creates a tweet in a transaction and commits only when told to."""

    def __init__(self, text: str) -> None:
        super().__init__(daemon=True)
        self.text = text
        self.inserted, self.commit = threading.Event(), threading.Event()
        self.pk: int | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with transaction.atomic():
                self.pk = Tweet.objects.create(author="order", text=self.text).pk
                self.inserted.set()
                assert self.commit.wait(60), "never told to commit"
        except BaseException as exc:
            self.error = exc
            self.inserted.set()
        finally:
            connection.close()


def test_a_lower_id_that_commits_last_is_neither_skipped_nor_reordered(
        outbox_django: Settings, redis_client: redis.Redis) -> None:
    assert connection.vendor == "postgresql"
    first = HeldWriter("takes the lower id, commits last")
    first.start()
    assert first.inserted.wait(30) and first.error is None, first.error
    second = Tweet.objects.create(author="order", text="takes the higher id, commits first")
    assert first.pk is not None and first.pk < second.pk
    # The relay runs meanwhile: it moves the committed higher id without waiting for the
    # lower one (which it cannot see yet).
    [moved] = wait_for_entries(redis_client, outbox_django, 1)
    assert (moved.env.pk, moved.env.seq) == (str(second.pk), 1)
    time.sleep(0.3)  # more relay rounds while the lower id is still uncommitted
    assert len(read_all(redis_client, outbox_django)) == 1
    first.commit.set()
    first.join(30)
    assert first.error is None, first.error
    entries = wait_for_entries(redis_client, outbox_django, 2)
    # every row once; the node's order is the order the rows became visible (commit order)
    assert [(e.env.pk, e.env.seq) for e in entries] == [(str(second.pk), 1), (str(first.pk), 2)]
    deadline = time.monotonic() + 10
    while OutboxEntry.objects.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not OutboxEntry.objects.exists()


def test_concurrent_writers_committing_in_random_order_lose_and_repeat_nothing(
        outbox_django: Settings, redis_client: redis.Redis) -> None:
    """4 writers, each holding its transaction a random while, on 3 nodes; a writer's own
    saves are sequential, so each writer's rows must keep their order within a node."""
    writers, per_writer = 4, 25
    errors: list[BaseException] = []

    def write(w: int) -> None:
        rnd = random.Random(w)
        try:
            for i in range(per_writer):
                with transaction.atomic():
                    Tweet.objects.create(author=f"n{i % 3}", text=f"{w}:{i}")
                    time.sleep(rnd.random() * 0.01)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    total = writers * per_writer
    entries = wait_for_entries(redis_client, outbox_django, total, timeout=60)
    pks = [e.env.pk for e in entries]
    assert len(pks) == total and len(set(pks)) == total  # none lost, none twice
    assert set(pks) == {str(pk) for pk in Tweet.objects.values_list("pk", flat=True)}
    by_node: dict[str, list[StoredEntry]] = defaultdict(list)
    for e in entries:
        by_node[e.env.node].append(e)
    texts = dict(Tweet.objects.values_list("pk", "text"))
    for node, got in by_node.items():
        assert [e.env.seq for e in got] == list(range(1, len(got) + 1)), node
        for w in range(writers):  # a writer's commits are ordered: so are its entries
            mine = [int(texts[int(e.env.pk)].split(":")[1]) for e in got
                    if texts[int(e.env.pk)].startswith(f"{w}:")]
            assert mine == sorted(mine), (node, w, mine)
