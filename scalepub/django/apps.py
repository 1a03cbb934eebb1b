"""The Django app: validates settings at start, nothing else."""

from __future__ import annotations

from django.apps import AppConfig


class ScalepubConfig(AppConfig):
    """``scalepub.django`` in INSTALLED_APPS."""

    name = "scalepub.django"
    label = "scalepub"
    verbose_name = "scalepub"
    default = True

    def ready(self) -> None:
        """Fail at start, naming the setting, if ``settings.SCALEPUB`` is wrong."""
        from django.core.signals import setting_changed

        from scalepub.django import producer

        producer.get_settings()
        setting_changed.connect(producer.on_setting_changed, dispatch_uid="scalepub.settings")
