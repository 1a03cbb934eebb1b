"""PostgreSQL: a commit that inserted outbox rows notifies the relays (scalepub.django.notify).

Nothing on other databases: their relay polls.
"""

from typing import Any

from django.db import migrations

from scalepub.django import notify


def create(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(notify.UNGATED_SQL, params=None)  # 0003 adds its WHEN


def drop(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(notify.DROP_SQL, params=None)


class Migration(migrations.Migration):

    dependencies = [("scalepub", "0001_initial")]

    operations = [migrations.RunPython(create, drop, elidable=False)]
