"""The history endpoint subscribers catch up from: ``GET …/history?node=…&after=…&limit=…``.

Every answer is JSON sent with ``X-Content-Type-Options: nosniff``, errors included
(``{"error": reason, "param": name}``, docs/protocol.md section 5): a crafted link's
parameters are never served as HTML in the site's origin. ``limit`` bounds what one request
costs; ``HISTORY_ACCESS`` decides who may read a node and ``HISTORY_RATE_LIMIT`` how often.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Callable
from typing import NamedTuple

import redis
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, JsonResponse, QueryDict
from django.utils.module_loading import import_string

from scalepub.django.producer import get_producer, get_settings
from scalepub.history import read_history
from scalepub.nodes import InvalidNodeName, validate_node
from scalepub.settings import DJANGO_SETTING
from scalepub.sharding import Keys

logger = logging.getLogger(__name__)

# The most entries one request may ask for (and the default): the view's cost bound, one
# XRANGE of at most this many entries of one node's history (HISTORY_MAXLEN's default).
MAX_LIMIT = 1000
# ``after`` is a seq (< 2**64, 20 digits); more digits are accepted (nothing is after them)
# up to this many, so parsing stays cheap whatever the URL holds.
MAX_DIGITS = 40
DEFAULT_RETRY_AFTER_S = 1
ALLOWED_METHODS = ("GET", "HEAD")
# ASCII digits only: int() would also take "+1", " 1", "1_0" and U+0661 (Arabic-Indic one).
_DIGITS = re.compile(f"[0-9]{{1,{MAX_DIGITS}}}")
# On every answer: never sniffed as HTML, and no script or frame even if it were rendered.
_HARDENING = {"X-Content-Type-Options": "nosniff",
              "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'"}

AccessCheck = Callable[[HttpRequest, str], bool]


class HistoryRateLimited(Exception):
    """Raised by a ``HISTORY_RATE_LIMIT`` callable: answered 429 with ``Retry-After``."""

    def __init__(self, retry_after_s: float = DEFAULT_RETRY_AFTER_S) -> None:
        super().__init__(f"rate limited: retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class BadParameter(ValueError):
    """A query parameter the view refuses (answered 400 naming it)."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}")
        self.param = param
        self.reason = reason


class Query(NamedTuple):
    """The validated parameters."""

    node: str
    after: int
    limit: int


def history(request: HttpRequest) -> HttpResponse:
    """Entries of ``node`` with seq > ``after`` (JSON, docs/protocol.md section 5)."""
    if request.method not in ALLOWED_METHODS:
        not_allowed = error(405, "method not allowed: use GET")
        not_allowed["Allow"] = ", ".join(ALLOWED_METHODS)
        return not_allowed
    try:
        query = parse_query(request.GET)
    except BadParameter as exc:
        return error(400, exc.reason, exc.param)
    settings = get_settings()
    refused = _rate_limited(settings.history_rate_limit, request, query.node)
    if refused is not None:
        return refused
    if not history_access(settings.history_access)(request, query.node):
        return error(403, "not allowed to read this node's history", "node")
    try:
        found = read_history(get_producer().client, Keys(settings.key_prefix), settings.shards,
                             query.node, query.after, query.limit)
    except redis.RedisError as exc:
        logger.warning("history unavailable: Redis: %s", exc)
        unavailable = error(503, "history unavailable, retry later")
        unavailable["Retry-After"] = str(DEFAULT_RETRY_AFTER_S)
        return unavailable
    return _hardened(JsonResponse(found.as_json()))


def _rate_limited(path: str, request: HttpRequest, node: str) -> HttpResponse | None:
    """429 when the ``HISTORY_RATE_LIMIT`` callable refuses, else None."""
    try:
        allowed = rate_limit(path)(request, node)
    except HistoryRateLimited as exc:
        return too_many(exc.retry_after_s)
    return None if allowed else too_many(DEFAULT_RETRY_AFTER_S)


def parse_query(params: QueryDict) -> Query:
    """``node``, ``after`` (default 0) and ``limit`` (default and at most MAX_LIMIT)."""
    node = _single(params, "node")
    if node is None:
        raise BadParameter("node", "missing: the node to read, e.g. /twitter/Tweet/alice")
    try:
        validate_node(node)
    except InvalidNodeName as exc:
        raise BadParameter("node", str(exc)) from None
    after = _digits(params, "after", 0)
    limit = _digits(params, "limit", MAX_LIMIT)
    if not 1 <= limit <= MAX_LIMIT:
        raise BadParameter("limit", f"must be from 1 to {MAX_LIMIT}")
    return Query(node, after, limit)


def _single(params: QueryDict, name: str) -> str | None:
    # Given twice, a proxy and Django could each act on another value: refuse the ambiguity.
    values = params.getlist(name)
    if len(values) > 1:
        raise BadParameter(name, "given more than once")
    return values[0] if values else None


def _digits(params: QueryDict, name: str, default: int) -> int:
    value = _single(params, name)
    if value is None:
        return default
    if not _DIGITS.fullmatch(value):
        raise BadParameter(name, f"must be 1 to {MAX_DIGITS} ASCII digits 0-9")
    return int(value)


def error(status: int, reason: str, param: str | None = None) -> HttpResponse:
    """A JSON error: ``{"error": reason, "param": param}`` (``param`` only when one is at fault).

    ``<``, ``>`` and ``&`` are sent as JSON escapes, so the body holds no markup even when
    ``reason`` quotes a crafted node name and a client ignores the content type.
    """
    body: dict[str, str] = {"error": reason}
    if param is not None:
        body["param"] = param
    text = (json.dumps(body, ensure_ascii=True)
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))
    return _hardened(HttpResponse(text, status=status, content_type="application/json"))


def too_many(retry_after_s: float) -> HttpResponse:
    """429 with ``Retry-After`` in whole seconds (at least 1, rounded up)."""
    seconds = max(1, math.ceil(retry_after_s)) if math.isfinite(retry_after_s) else 60
    refused = error(429, f"too many history requests: retry after {seconds} s")
    refused["Retry-After"] = str(seconds)
    return refused


def _hardened(response: HttpResponse) -> HttpResponse:
    for header, value in _HARDENING.items():
        response[header] = value
    return response


def _open(_request: HttpRequest, _node: str) -> bool:
    return True


@functools.cache
def history_access(path: str) -> AccessCheck:
    """The ``HISTORY_ACCESS`` callable: ``(request, node) -> bool``; open when empty."""
    return load_hook("HISTORY_ACCESS", path)


@functools.cache
def rate_limit(path: str) -> AccessCheck:
    """The ``HISTORY_RATE_LIMIT`` callable: ``(request, node) -> bool`` (False or
    HistoryRateLimited: 429); no limit when empty."""
    return load_hook("HISTORY_RATE_LIMIT", path)


def load_hook(setting: str, path: str) -> AccessCheck:
    """The callable at dotted ``path`` (open when empty); ImproperlyConfigured naming
    ``setting`` when it does not import or is not callable."""
    if not path:
        return _open
    try:
        check: AccessCheck = import_string(path)
    except ImportError as exc:
        raise ImproperlyConfigured(
            f"{DJANGO_SETTING}['{setting}']: cannot import {path!r}: {exc}") from None
    if not callable(check):
        raise ImproperlyConfigured(f"{DJANGO_SETTING}['{setting}']: {path!r} is not callable")
    return check
