"""The outbox backlog in Django's admin: the entries waiting for the relay, read-only.

Django's admin imports this module by itself (autodiscovery) when ``django.contrib.admin``
is installed; without it nothing here runs.
"""

from __future__ import annotations

import time
from typing import Any

from django.contrib import admin
from django.db.models import Count, Min, QuerySet
from django.http import HttpRequest, HttpResponse

from scalepub.django.models import OutboxEntry


@admin.register(OutboxEntry)
class OutboxEntryAdmin(admin.ModelAdmin):
    """Outbox entries, oldest first, with their count and the oldest one's age on top.

    Nothing can be added or changed here: entries are written by saves and removed by the
    relay once Redis holds them. Superusers alone may delete.

    WARNING: deleting an entry loses it. The row it announces stays in the database but is
    never published: no subscriber and no history request will see it. Do it only for an
    entry that can never be delivered, after reading its node and model.
    """

    list_display = ("id", "node", "model", "object_pk", "age")
    search_fields = ("node", "model", "object_pk")
    ordering = ("id",)
    exclude = ("payload",)  # bytes: shown as their size
    readonly_fields = ("payload_bytes",)
    list_per_page = 100

    @admin.display(description="age", ordering="-ts_ns")  # type: ignore[untyped-decorator]
    def age(self, entry: OutboxEntry) -> str:
        """How long ago the row was saved."""
        return format_age(time.time() - entry.ts_ns / 1e9)

    @admin.display(description="payload size")  # type: ignore[untyped-decorator]
    def payload_bytes(self, entry: OutboxEntry) -> str:
        """The serialized row's size (its bytes are not worth showing)."""
        return f"{len(entry.payload)} bytes"

    def has_add_permission(self, request: HttpRequest) -> bool:
        """Entries come from saves only."""
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """An entry is what was committed: editing it would publish something else."""
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Superusers only: a deleted entry is never published (see the class docstring)."""
        return bool(request.user.is_superuser) and super().has_delete_permission(request, obj)

    def changelist_view(self, request: HttpRequest,
                        extra_context: dict[str, Any] | None = None) -> HttpResponse:
        """The list, under a line with the whole backlog: its count and its oldest age."""
        summary = backlog_summary(self.get_queryset(request))
        return super().changelist_view(request, {**(extra_context or {}), "subtitle": summary})


def backlog_summary(entries: QuerySet[OutboxEntry]) -> str:
    """``"3 entries waiting for the relay, the oldest saved 12.0 s ago"`` (one query)."""
    found = entries.aggregate(count=Count("id"), oldest=Min("ts_ns"))
    if not found["count"]:
        return "No entries waiting for the relay."
    waiting = "1 entry" if found["count"] == 1 else f"{found['count']} entries"
    age = format_age(time.time() - found["oldest"] / 1e9)
    return f"{waiting} waiting for the relay, the oldest saved {age} ago."


def format_age(seconds: float) -> str:
    """``0.4 s``, ``59.9 s``, ``12 min``, ``5.2 h``, ``3.1 d``."""
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
