"""URLs of the example project: the demo page and scalepub's history endpoint."""

from django.urls import include, path
from twitter import views

urlpatterns = [
    path("", views.demo, name="demo"),
    path("scalepub/", include("scalepub.django.urls")),
]
