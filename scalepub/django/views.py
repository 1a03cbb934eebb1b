"""The history endpoint subscribers catch up from: ``GET …/history?node=…&after=…``."""

from __future__ import annotations

import functools
from collections.abc import Callable

from django.core.exceptions import ImproperlyConfigured
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    HttpResponseForbidden,
    HttpResponseNotAllowed,
    JsonResponse,
)
from django.utils.module_loading import import_string

from scalepub.django.producer import get_producer, get_settings
from scalepub.history import read_history
from scalepub.nodes import InvalidNodeName, validate_node
from scalepub.settings import DJANGO_SETTING
from scalepub.sharding import Keys

MAX_LIMIT = 5000

AccessCheck = Callable[[HttpRequest, str], bool]


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
    if not history_access(settings.history_access)(request, node):
        return HttpResponseForbidden("not allowed to read this node's history")
    found = read_history(get_producer().client, Keys(settings.key_prefix), settings.shards,
                         node, after, limit)
    return JsonResponse(found.as_json())


def _open(_request: HttpRequest, _node: str) -> bool:
    return True


@functools.cache
def history_access(path: str) -> AccessCheck:
    """The ``HISTORY_ACCESS`` callable: ``(request, node) -> bool``; open when empty."""
    if not path:
        return _open
    try:
        check: AccessCheck = import_string(path)
    except ImportError as exc:
        raise ImproperlyConfigured(
            f"{DJANGO_SETTING}['HISTORY_ACCESS']: cannot import {path!r}: {exc}") from None
    if not callable(check):
        raise ImproperlyConfigured(f"{DJANGO_SETTING}['HISTORY_ACCESS']: {path!r} is not callable")
    return check
