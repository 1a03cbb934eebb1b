"""The history endpoint subscribers catch up from: ``GET …/history?node=…&after=…``."""

from __future__ import annotations

from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    HttpResponseNotAllowed,
    JsonResponse,
)

from scalepub.django.producer import get_producer, get_settings
from scalepub.history import read_history
from scalepub.nodes import InvalidNodeName, validate_node
from scalepub.sharding import Keys

MAX_LIMIT = 5000


def history(request: HttpRequest) -> HttpResponse:
    """Entries of ``node`` with seq > ``after`` (JSON, docs/protocol.md section 5)."""
    if request.method != "GET":
        return HttpResponseNotAllowed(["GET"])
    try:
        node = validate_node(request.GET.get("node", ""))
        after = int(request.GET.get("after", "0"))
        limit = min(int(request.GET.get("limit", "1000")), MAX_LIMIT)
    except (InvalidNodeName, ValueError) as exc:
        return HttpResponseBadRequest(str(exc))
    if after < 0 or limit < 1:
        return HttpResponseBadRequest("after must be >= 0 and limit >= 1")
    settings = get_settings()
    found = read_history(get_producer().client, Keys(settings.key_prefix), settings.shards,
                         node, after, limit)
    return JsonResponse(found.as_json())
