"""The Django app: registers the system checks and hooks the runtime into Django.

``ready()`` raises nothing for a bad setting: ``manage.py check`` reports it (scalepub.E001),
and a process that runs no checks gets the SettingsError at its first use.
"""

from __future__ import annotations

from django.apps import AppConfig


class ScalepubConfig(AppConfig):
    """``scalepub.django`` in INSTALLED_APPS."""

    name = "scalepub.django"
    label = "scalepub"
    verbose_name = "scalepub"
    default = True

    def ready(self) -> None:
        """Checks, relay start hooks, and forgetting the outbox table after a migration."""
        from django.db.models.signals import post_migrate

        from scalepub.django import checks, outbox, runtime

        checks.install()
        runtime.install()
        post_migrate.connect(outbox.forget_tables, dispatch_uid="scalepub.outbox.tables")
