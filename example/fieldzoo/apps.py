from django.apps import AppConfig


class FieldzooConfig(AppConfig):
    name = "fieldzoo"
    default_auto_field = "django.db.models.BigAutoField"
