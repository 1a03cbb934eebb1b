"""Producer-side (Django) Prometheus metrics, in the default registry.

A site that already exposes ``prometheus_client.REGISTRY`` (django-prometheus, or its own
``/metrics`` view) shows these without further work.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

ENTRIES_ENQUEUED = Counter(
    "scalepub_entries_enqueued_total",
    "Entries appended to a shard stream by this process.",
)
ENQUEUE_FAILURES = Counter(
    "scalepub_enqueue_failures_total",
    "Entries that could not be appended (handed to the spill), by reason.",
    ["reason"],
)
OUTBOX_WRITTEN = Counter(
    "scalepub_outbox_written_total",
    "Entries written to the outbox table: in the save's transaction, or spilled after commit.",
    ["path"],
)
OUTBOX_RELAYED = Counter(
    "scalepub_outbox_relayed_total",
    "Outbox entries the relay appended to a shard stream and deleted from the table.",
)
RELAY_ERRORS = Counter(
    "scalepub_outbox_relay_errors_total",
    "Relay rounds that could not move every row, by reason (rows stay and are retried).",
    ["reason"],
)
OUTBOX_OLDEST_AGE = Gauge(
    "scalepub_outbox_oldest_age_seconds",
    "Age of the oldest outbox entry at the relay's last round (0 when the outbox was empty).",
)
RELAY_LEADER = Gauge(
    "scalepub_outbox_relay_leader",
    "1 while this process's relay holds the lease and moves rows, else 0.",
)
PAYLOADS_ALTERED = Counter(
    "scalepub_payloads_altered_total",
    "Payloads sent transformed (docs/reliability.md §4): characters XML cannot carry "
    "replaced (xml_chars), or text fields cut to fit a batch (truncated).",
    ["reason"],
)
