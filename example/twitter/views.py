"""The demo page: tweets appearing live, through the scalepub browser client."""

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse

from scalepub.django.producer import get_settings


def demo(request: HttpRequest) -> HttpResponse:
    """``/?transport=websocket&authors=10`` (BOSH by default)."""
    sp = get_settings()
    transport = "websocket" if request.GET.get("transport") == "websocket" else "bosh"
    authors = min(int(request.GET.get("authors", "20")), 1000)
    prefix = request.GET.get("prefix", "user")
    config = {
        "transport": transport,
        "service": sp.ws_url if transport == "websocket" else sp.bosh_url,
        "domain": sp.anon_domain,
        "pubsub": sp.pubsub_service,
        "nodes": [f"/twitter/Tweet/{prefix}{i}" for i in range(authors)],
        "historyUrl": reverse("scalepub:history"),
    }
    return render(request, "twitter/demo.html", {"config": config, "debug": settings.DEBUG})
