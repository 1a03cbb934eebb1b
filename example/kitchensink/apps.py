from django.apps import AppConfig


class KitchensinkConfig(AppConfig):
    name = "kitchensink"
    default_auto_field = "django.db.models.BigAutoField"
