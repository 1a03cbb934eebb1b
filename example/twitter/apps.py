"""The example app."""

from django.apps import AppConfig


class TwitterConfig(AppConfig):
    """A tiny Twitter: tweets, published live per author."""

    name = "twitter"
    default_auto_field = "django.db.models.BigAutoField"
