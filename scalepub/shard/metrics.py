"""Prometheus metrics of the shard pool (prometheus_client multiprocess mode).

``scalepub run`` sets ``PROMETHEUS_MULTIPROC_DIR`` before anything imports prometheus_client
(``scalepub.cli.multiprocess_metrics_dir``), every shard process writes its samples there,
and the supervisor alone serves them. The ``shard`` label is the shard (or comma-joined shards)
a process owns: bounded by the shard count. Never a node or a user.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client import start_http_server as _start_http_server

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Finer at the low end: the hops of a quiet site's few milliseconds.
_HOP_SECONDS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The hops of the end-to-end latency the pool can see, each once per batch for its oldest
# entry (docs/benchmarks.md, latency per hop). The append time is the stream id's
# millisecond, so the first two hops are true to about 1 ms. The last hop, the server's
# result → a subscriber's delivery, only a subscriber can measure (loadtest/bench_latency.py).
HOPS = ("commit_to_append", "append_to_read", "read_to_send", "send_to_result")

PUBLISHED = Counter("scalepub_entries_published", "Entries confirmed by the XMPP server.",
                    ["shard"])
IQS = Counter("scalepub_publish_iqs", "Publish IQs answered with a result.", ["shard"])
RTT = Histogram("scalepub_publish_rtt_seconds", "Publish IQ round-trip time.", ["shard"],
                buckets=_SECONDS)
BATCH_ENTRIES = Histogram("scalepub_batch_entries", "Entries per published batch.", ["shard"],
                          buckets=(1, 2, 5, 10, 25, 50, 100, 150, 200, 250, 500, 1000))
BATCH_BYTES = Histogram("scalepub_batch_bytes", "Bytes per published batch.", ["shard"],
                        buckets=(1e3, 4e3, 16e3, 32e3, 64e3, 96e3, 128e3, 256e3, 512e3))
E2E_LATENCY = Histogram(
    "scalepub_e2e_latency_seconds",
    "Commit of the row to the server's acknowledgement; once per batch, for its oldest entry.",
    ["shard"], buckets=_SECONDS)
HOP_LATENCY = Histogram(
    "scalepub_hop_latency_seconds",
    "End-to-end latency split into hops (hop: commit_to_append, append_to_read, read_to_send, "
    "send_to_result); once per batch, for its oldest entry.", ["shard", "hop"],
    buckets=_HOP_SECONDS)
LAG = Gauge("scalepub_stream_lag_entries", "Entries in the shard stream never read.", ["shard"],
            multiprocess_mode="livemax")
PENDING = Gauge("scalepub_stream_pending_entries", "Entries read but not yet acknowledged.",
                ["shard"], multiprocess_mode="livemax")
INFLIGHT = Gauge("scalepub_inflight_iqs", "Publish IQs in flight.", ["shard"],
                 multiprocess_mode="livesum")
LAST_PUBLISH = Gauge("scalepub_last_publish_timestamp_seconds",
                     "Unix time of the last confirmed publish.", ["shard"],
                     multiprocess_mode="max")
RECONNECTS = Counter("scalepub_reconnects", "XMPP reconnections after a lost connection.",
                     ["shard"])
RETRIES = Counter("scalepub_retries", "Batches retried after a transient refusal.", ["shard"])
DEAD_LETTERS = Counter("scalepub_dead_letters", "Entries moved to the dead-letter stream.",
                       ["shard"])
RESTARTS = Counter("scalepub_shard_restarts", "Shard processes restarted by the supervisor.",
                   ["shard"])
ERRORS = Counter("scalepub_errors", "Errors by kind: xmpp_refused, connection_lost, redis, "
                 "internal.", ["shard", "kind"])
# kind: scalepub.xmpp.link.Ignored (forged_reply, unknown_id, unexpected); all three are
# created at 0 with the shard's meters, so dashboards and alerts see the series before any.
IGNORED_STANZAS = Counter(
    "scalepub_ignored_stanzas",
    "Stanzas sent to a shard's XMPP session and dropped: forged_reply (an answer to an IQ in "
    "flight from someone other than the pubsub service), unknown_id (an answer to no IQ in "
    "flight), unexpected (messages, presence, IQ requests from others).", ["shard", "kind"])

# Shard leases (scalepub/shard/lease.py): a worker taking a shard's lease (a new owner), and
# a renewal that failed (Redis unreachable or slow, or the lease taken over).
OWNER_CHANGES = Counter("scalepub_shard_owner_changes", "Shard leases taken by a new owner.",
                        ["shard"])
LEASE_RENEW_FAILURES = Counter("scalepub_lease_renew_failures",
                               "Shard lease renewals that failed or found the lease gone.",
                               ["shard"])


def serve(host: str, port: int) -> None:
    """Serve every process's samples on http://host:port/metrics (a daemon thread)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    _start_http_server(port, addr=host, registry=registry)


def process_dead(pid: int) -> None:
    """Forget a dead shard process's live gauges."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


