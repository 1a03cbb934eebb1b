"""URLs of the example project: the demo page, scalepub's history endpoint, the admin."""

from django.contrib import admin
from django.urls import include, path
from twitter import views

urlpatterns = [
    path("", views.demo, name="demo"),
    path("tweets", views.create_tweet, name="create-tweet"),  # POST: tests/test_gunicorn.py
    path("scalepub/", include("scalepub.django.urls")),
    path("admin/", admin.site.urls),  # the outbox backlog: /admin/scalepub/outboxentry/
]
