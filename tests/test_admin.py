"""The outbox backlog in Django's admin: read-only, its count and oldest age on top."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from twitter.models import Tweet

from scalepub.django.admin import format_age
from scalepub.django.models import OutboxEntry
from scalepub.settings import Settings
from tests.conftest import django_side

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/scalepub/outboxentry/"


@pytest.fixture(autouse=True)
def no_relay() -> Iterator[Settings]:
    """Outbox delivery and no relay thread (external): entries wait, no request starts one."""
    yield from django_side(Settings(delivery="outbox", outbox_relay="external"))


@pytest.fixture
def waiting() -> list[OutboxEntry]:
    """Three saved tweets whose outbox entries wait, the oldest saved ten minutes ago."""
    for i in range(3):
        Tweet.objects.create(author=f"adm{i}", text=f"hello {i}")
    entries = list(OutboxEntry.objects.order_by("id"))
    assert len(entries) == 3
    OutboxEntry.objects.filter(id=entries[0].id).update(ts_ns=time.time_ns() - 600 * 10**9)
    return entries


def staff(username: str, *perms: str) -> Client:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=perms))
    client = Client()
    client.force_login(user)
    return client


def test_an_admin_sees_the_rows_the_count_and_the_oldest_age(
        admin_client: Client, waiting: list[OutboxEntry]) -> None:
    page = admin_client.get(CHANGELIST)
    assert page.status_code == 200
    html = page.content.decode()
    for entry in waiting:
        assert f"/admin/scalepub/outboxentry/{entry.id}/change/" in html
        assert entry.node in html and entry.object_pk in html
    assert "twitter.tweet" in html
    assert "3 entries waiting for the relay, the oldest saved 10 min ago." in html
    assert [row.pk for row in page.context["cl"].result_list] == [e.id for e in waiting]


def test_nothing_can_be_added_or_changed(admin_client: Client,
                                         waiting: list[OutboxEntry]) -> None:
    entry = waiting[0]
    assert admin_client.get("/admin/scalepub/outboxentry/add/").status_code == 403
    detail = admin_client.get(f"/admin/scalepub/outboxentry/{entry.id}/change/")
    assert detail.status_code == 200  # shown read-only
    assert f"{len(entry.payload)} bytes" in detail.content.decode()  # its size, not its bytes
    changed = admin_client.post(f"/admin/scalepub/outboxentry/{entry.id}/change/",
                                {"node": "/elsewhere", "model": "x.y", "object_pk": "1"})
    assert changed.status_code == 403
    entry.refresh_from_db()
    assert entry.node != "/elsewhere"


def test_only_a_superuser_deletes(admin_client: Client, waiting: list[OutboxEntry]) -> None:
    victim, kept = waiting[0], waiting[1]
    others = staff("ops", "view_outboxentry", "delete_outboxentry")
    assert others.get(CHANGELIST).status_code == 200  # may look
    refused = others.post(f"/admin/scalepub/outboxentry/{kept.id}/delete/", {"post": "yes"})
    assert refused.status_code == 403
    assert OutboxEntry.objects.filter(id=kept.id).exists()
    done = admin_client.post(f"/admin/scalepub/outboxentry/{victim.id}/delete/", {"post": "yes"})
    assert done.status_code == 302
    assert not OutboxEntry.objects.filter(id=victim.id).exists()


def test_staff_without_the_view_permission_sees_nothing(waiting: list[OutboxEntry]) -> None:
    assert staff("nobody").get(CHANGELIST).status_code == 403


def test_an_empty_outbox_says_so(admin_client: Client) -> None:
    page = admin_client.get(CHANGELIST)
    assert "No entries waiting for the relay." in page.content.decode()


@pytest.mark.parametrize(("seconds", "shown"), [
    (-1.0, "0.0 s"), (0.42, "0.4 s"), (59.94, "59.9 s"), (600, "10 min"), (5.25 * 3600, "5.2 h"),
    (3.1 * 86400, "3.1 d"),
])
def test_format_age(seconds: float, shown: str) -> None:
    assert format_age(seconds) == shown
