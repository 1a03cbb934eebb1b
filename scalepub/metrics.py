"""Producer-side (Django) Prometheus metrics, in the default registry.

A site that already exposes ``prometheus_client.REGISTRY`` (django-prometheus, or its own
``/metrics`` view) shows these without further work.
"""

from __future__ import annotations

from prometheus_client import Counter

ENTRIES_ENQUEUED = Counter(
    "scalepub_entries_enqueued_total",
    "Entries appended to a shard stream by this process.",
)
ENQUEUE_FAILURES = Counter(
    "scalepub_enqueue_failures_total",
    "Entries that could not be appended (handed to the spill), by reason.",
    ["reason"],
)
