"""Which node a row of a model that inherits, or is inherited by, a registered one goes to.

scalepub announces a created row from its INSERT (scalepub.django.atomic), no longer from a
``post_save`` receiver, and keeps that receiver's rule: a row is published by the
registration of its own class (``post_save``'s ``sender``), once. The rows: a registered
parent (Animal), a registered multi-table child (Dog, whose save inserts a parent row too),
an unregistered child (Cat) and a registered proxy (LoudAnimal); both deliveries, and a
create inside the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from django.db import transaction
from kitchensink.models import Animal, Cat, Dog, LoudAnimal

from scalepub.django.models import OutboxEntry
from scalepub.settings import Settings
from tests.conftest import django_side
from tests.streams import read_all

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def outbox_kept(settings_for: Settings) -> Iterator[Settings]:
    """``outbox`` delivery with no relay thread: rows stay in the outbox for the checks."""
    yield from django_side(settings_for.replace(delivery="outbox", outbox_relay="external"))


def create_each() -> dict[str, int]:
    """One row of each class; their pks by name."""
    return {"animal": Animal.objects.create(name="animal").pk,
            "dog": Dog.objects.create(name="dog", breed="collie").pk,
            "cat": Cat.objects.create(name="cat").pk,
            "loud": LoudAnimal.objects.create(name="loud").pk}


EXPECTED = [("/kitchensink/Animal", "kitchensink.animal", "animal"),
            ("/kitchensink/Dog", "kitchensink.dog", "dog"),
            ("/kitchensink/LoudAnimal", "kitchensink.loudanimal", "loud")]


def test_outbox_rows_follow_the_rows_own_class(outbox_kept: Settings) -> None:
    pks = create_each()
    rows = [(r.node, r.model, r.object_pk) for r in OutboxEntry.objects.order_by("id")]
    assert rows == [(node, model, str(pks[name])) for node, model, name in EXPECTED]
    # the Dog's payload is its own serialization (the proxy's too: Django labels it so)
    dog = OutboxEntry.objects.get(node="/kitchensink/Dog")
    assert b'model="kitchensink.dog"' in bytes(dog.payload)
    assert b'<field name="breed" type="CharField">collie</field>' in bytes(dog.payload)


def test_inside_the_callers_transaction_too(outbox_kept: Settings) -> None:
    with transaction.atomic():
        pks = create_each()
    rows = [(r.node, r.object_pk) for r in OutboxEntry.objects.order_by("id")]
    assert rows == [(node, str(pks[name])) for node, _, name in EXPECTED]


def test_direct_delivery_appends_the_same(scalepub_django: Settings,
                                          redis_client: redis.Redis) -> None:
    pks = create_each()
    got = sorted((e.env.node, e.env.model, e.env.pk)
                 for e in read_all(redis_client, scalepub_django))
    assert got == sorted((node, model, str(pks[name])) for node, model, name in EXPECTED)
