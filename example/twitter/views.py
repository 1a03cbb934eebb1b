"""The demo page: tweets appearing live, through the scalepub browser client; a view that
creates tweets (load tests)."""

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_POST

from scalepub.django.producer import get_settings
from twitter.models import Tweet


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


@require_POST
def create_tweet(request: HttpRequest) -> JsonResponse:
    """``POST /tweets`` with form fields ``author`` and ``text``: saves a Tweet (published by
    scalepub on commit) and answers its pk. An example for load tests: no authentication."""
    author, text = request.POST.get("author", ""), request.POST.get("text", "")
    if not 0 < len(author) <= 64 or len(text) > 280:
        return JsonResponse({"error": "author: 1-64 characters, text: at most 280"}, status=400)
    tweet = Tweet.objects.create(author=author, text=text)
    return JsonResponse({"pk": tweet.pk}, status=201)
