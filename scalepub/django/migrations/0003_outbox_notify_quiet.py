"""PostgreSQL: the notify trigger skips a statement whose session set ``scalepub.notify`` to
'off' for its transaction (the one-statement create, when this process's relay leads and is
woken in-process: scalepub.django.notify.QUIET_SETTING). Nothing on other databases.
"""

from typing import Any

from django.db import migrations

from scalepub.django import notify


def gate(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(notify.CREATE_SQL, params=None)


def ungate(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(notify.UNGATED_SQL, params=None)


class Migration(migrations.Migration):

    dependencies = [("scalepub", "0002_outbox_notify")]

    operations = [migrations.RunPython(gate, ungate, elidable=False)]
