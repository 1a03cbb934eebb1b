"""``path("scalepub/", include("scalepub.django.urls"))`` adds ``scalepub/history``."""

from django.urls import path

from scalepub.django import views

app_name = "scalepub"
urlpatterns = [path("history", views.history, name="history")]
