"""Scenario files (``loadtest/scenarios/*.toml``): what one load-test run does.

A scenario names its subscribers, nodes, save rate, duration, shards and the batch sizes to
compare; each batch size is a *variant*, run one after the other on a fresh stack, into the
same report. A wrong value stops the run at once with a message naming the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from loadtest.pinning import PinningError, Placement

NODE_BASE = "/twitter/Tweet/"  # the example project's per-author nodes (example/twitter/models.py)


class ScenarioError(ValueError):
    """A scenario file has a wrong or unknown key; the message names it."""


@dataclass(frozen=True)
class Scenario:
    """One scenario file, validated."""

    name: str
    description: str = ""
    duration_s: float = 30.0  # how long the producers save rows (ramp included)
    rate: float = 100.0  # saves/s in total once ramped up
    rates: tuple[float, ...] = ()  # a sweep: one variant per rate (each batching), instead of rate
    ramp_s: float = 0.0  # producer processes start one by one over this time (0: all at once)
    producers: int = 1  # processes saving per-author tweets (`manage.py tweet`)
    authors: int = 10  # per-author nodes
    hot_share: float = 0.0  # share of the rate saved on the one hot node
    hot_producers: int = 1  # processes saving on the hot node (one manages ~400 saves/s here)
    bulk: int = 0  # rows per bulk_create + publish_many (0: one save per row)
    delivery: str = ""  # producers' SCALEPUB DELIVERY (outbox|direct; empty: the default)
    # nice(1) level of the producers: > 0 lets the pipeline under test (ejabberd, shards,
    # subscribers) have the CPU first on a box shared with the application's processes.
    producer_nice: int = 0
    subscribers: int = 5  # Locust users, each one BOSH session
    ws_subscribers: int = 0  # WebSocket users (RFC 7395, loadtest/websocket.py), beside BOSH
    hot_subscribe: bool = True  # every subscriber follows the hot node
    authors_per_subscriber: int = 1  # per-author nodes each subscriber follows
    spawn_rate: float = 50.0  # subscribers started per second
    shards: int = 2
    # One variant per (batch_max_entries, linger_ms) pair; batch_max_entries 1 = batching off.
    batch_max_entries: tuple[int, ...] = (250,)
    linger_ms: tuple[float, ...] = (0.0,)  # the pool's default (issue 16: no linger)
    window: int = 32
    bosh_wait_s: int = 20  # BOSH 'wait': longest a poll is held without data
    locust_processes: int = 1
    # Report every Nth entry to Locust's statistics (1: each; 0: none). A Locust request event
    # costs ~4 us of the subscriber process's CPU; the run's own histograms count every entry.
    locust_sample: int = 1
    drain_s: float = 30.0  # longest wait, after the last save, for every delivery
    # Targets the report checks (0: none).
    target_saves_per_s: float = 0.0
    target_p50_ms: float = 0.0
    target_p99_ms: float = 0.0
    target_deliveries_per_s: float = 0.0
    max_ready_s: float = 60.0  # longest wait for every subscriber to be subscribed
    # CPU placement (loadtest/pinning.py): "auto" (the system under test on CPUs apart from
    # the subscribers and producers), "off", or e.g. "sut=0 generator=1 app=1".
    pin: str = "auto"
    # A CPU cap on the subscriber processes during the production window, in cores (0: none);
    # a tiny one starves the generator, which the report must then mark NOT VALID.
    generator_cpu_quota: float = 0.0

    @property
    def hot_node(self) -> str:
        """The hot node's name (a single author) for a variant."""
        return f"{NODE_BASE}hot0"

    def variants(self) -> list[Variant]:
        """The (rate,) batch size, linger combinations to run, in file order."""
        # A batch of one entry is full at once: its linger changes nothing, one variant will do.
        batchings = [(b, linger) for b in self.batch_max_entries
                     for linger in (self.linger_ms if b > 1 else self.linger_ms[:1])]
        if not self.rates:
            return [Variant(b, linger) for b, linger in batchings]
        return [Variant(b, linger, rate) for rate in self.rates for b, linger in batchings]

    def author_nodes(self, prefix: str) -> list[str]:
        """Per-author nodes under an author-name prefix."""
        return [f"{NODE_BASE}{prefix}{i}" for i in range(self.authors)]

    @property
    def all_subscribers(self) -> int:
        """BOSH and WebSocket subscribers together."""
        return self.subscribers + self.ws_subscribers


@dataclass(frozen=True)
class Variant:
    """The batching under test in one part of a run."""

    batch_max_entries: int
    linger_ms: float
    rate: float | None = None  # set in a sweep (the scenario's ``rates``)

    @property
    def name(self) -> str:
        """Folder name, e.g. ``batch-250-linger-5`` (``rate-500-batch-...`` in a sweep)."""
        head = f"rate-{self.rate:g}-" if self.rate is not None else ""
        return f"{head}batch-{self.batch_max_entries}-linger-{self.linger_ms:g}"

    @property
    def label(self) -> str:
        """Human label, e.g. ``batch 250, linger 5 ms`` (``500 saves/s, batch ...``)."""
        head = f"{self.rate:g} saves/s, " if self.rate is not None else ""
        return f"{head}batch {self.batch_max_entries}, linger {self.linger_ms:g} ms"


def nodes_for(user: int, hot_node: str | None, author_nodes: list[str], per_user: int) -> list[str]:
    """The nodes subscriber ``user`` follows: the hot one, then a rotating slice of authors."""
    nodes = [hot_node] if hot_node else []
    if author_nodes and per_user:
        count = min(per_user, len(author_nodes))
        nodes += [author_nodes[(user * count + j) % len(author_nodes)] for j in range(count)]
    return nodes


def load(path: Path) -> Scenario:
    """Read and validate a scenario file."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"{path}: {exc}") from None
    return from_mapping(data, str(path))


def from_mapping(data: dict[str, Any], where: str = "scenario") -> Scenario:
    """A scenario from a parsed TOML table."""
    known = {f.name: f for f in fields(Scenario)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ScenarioError(f"{where}: unknown key(s) {', '.join(unknown)}")
    if "name" not in data:
        raise ScenarioError(f"{where}: 'name' is required")
    values = {key: _coerce(where, key, value, known[key].type) for key, value in data.items()}
    scenario = Scenario(**values)
    _check(scenario, where)
    return scenario


def _coerce(where: str, key: str, value: Any, kind: Any) -> Any:
    kind = str(kind)
    if kind.startswith("tuple["):
        item, what = (int, "integer") if kind == "tuple[int, ...]" else ((int, float), "number")
        value = value if isinstance(value, list) else [value]
        if not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            raise ScenarioError(f"{where}: '{key}' must be a {what} or a list of them")
        return tuple(value if item is int else [float(v) for v in value])
    types: dict[str, type | tuple[type, ...]] = {
        "str": str, "float": (int, float), "int": int, "bool": bool}
    expected = types[kind]
    if not isinstance(value, expected) or (kind != "bool" and isinstance(value, bool)):
        raise ScenarioError(f"{where}: '{key}' must be {kind}, got {value!r}")
    return float(value) if kind == "float" else value  # type: ignore[arg-type]


def _check(s: Scenario, where: str) -> None:
    problems = {
        "duration_s": s.duration_s > 0, "ramp_s": 0 <= s.ramp_s < s.duration_s,
        "rate": s.rate > 0, "rates": min(s.rates, default=1) > 0,
        "producers": s.producers >= (1 if s.hot_share < 1 else 0), "authors": s.authors >= 1,
        "hot_share": 0 <= s.hot_share <= 1,
        "hot_producers": s.hot_producers >= (1 if s.hot_share > 0 else 0), "bulk": s.bulk >= 0,
        "subscribers": s.subscribers >= 0, "ws_subscribers": s.ws_subscribers >= 0,
        "generator_cpu_quota": 0 <= s.generator_cpu_quota <= 1,
        "authors_per_subscriber": s.authors_per_subscriber >= 0, "spawn_rate": s.spawn_rate > 0,
        "shards": s.shards >= 1, "batch_max_entries": min(s.batch_max_entries, default=0) >= 1,
        "window": s.window >= 1, "bosh_wait_s": 1 <= s.bosh_wait_s <= 120,
        "locust_processes": s.locust_processes >= 1, "drain_s": s.drain_s > 0,
        "linger_ms": min(s.linger_ms, default=-1) >= 0, "producer_nice": 0 <= s.producer_nice <= 19,
        "max_ready_s": s.max_ready_s > 0,
        "locust_sample": s.locust_sample >= 0, "delivery": s.delivery in ("", "outbox", "direct"),
    }
    for key, ok in problems.items():
        if not ok:
            raise ScenarioError(f"{where}: '{key}' is out of range (got {getattr(s, key)!r})")
    try:
        Placement.parse(s.pin)
    except PinningError as exc:
        raise ScenarioError(f"{where}: {exc}") from None
    if s.subscribers + s.ws_subscribers < 1:
        raise ScenarioError(f"{where}: 'subscribers' + 'ws_subscribers' must be at least 1")
    if not s.hot_share and not s.authors_per_subscriber:
        raise ScenarioError(f"{where}: subscribers follow nothing (hot_share 0 and "
                            "authors_per_subscriber 0)")
