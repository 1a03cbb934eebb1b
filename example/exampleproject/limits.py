"""A ``HISTORY_RATE_LIMIT`` for the example project, on Django's cache framework.

``SCALEPUB = {..., "HISTORY_RATE_LIMIT": "exampleproject.limits.history"}``: each client
address may ask for at most ``MAX_REQUESTS`` history pages per ``WINDOW_S`` seconds (a fixed
window, counted in the default cache). A page that reconnects asks once per node it follows,
so leave room for that. Use a cache all web processes share (Redis, Memcached) in
production: the default local-memory cache counts per process.
"""

from __future__ import annotations

import time

from django.core.cache import cache
from django.http import HttpRequest

from scalepub.django.views import HistoryRateLimited

WINDOW_S = 10
MAX_REQUESTS = 100


def history(request: HttpRequest, node: str) -> bool:
    """Allow the request, or raise HistoryRateLimited until the window ends."""
    now = time.time()
    window = int(now // WINDOW_S)
    # REMOTE_ADDR is the peer: behind a reverse proxy, use the address it forwards instead.
    key = f"scalepub-history:{request.META.get('REMOTE_ADDR', '')}:{window}"
    cache.add(key, 0, timeout=WINDOW_S + 1)
    try:
        count = cache.incr(key)
    except ValueError:  # evicted or expired between add and incr: this is its first request
        cache.set(key, 1, timeout=WINDOW_S + 1)
        count = 1
    if count > MAX_REQUESTS:
        raise HistoryRateLimited(retry_after_s=(window + 1) * WINDOW_S - now)
    return True
