"""The one settings object, built from ``SCALEPUB_*`` variables, a Django dict or CLI flags."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis

ENV_PREFIX = "SCALEPUB_"
DJANGO_SETTING = "SCALEPUB"

PAYLOAD_FORMATS = ("xml", "json")  # the payload formats an entry can carry (envelope "fmt")
DELIVERY_MODES = ("outbox", "direct")
RELAY_MODES = ("thread", "external")
TLS_MODES = ("auto", "required", "off")
ACCESS_MODELS = ("open", "whitelist")
# redis+cluster / rediss+cluster: a Redis Cluster, the host one of its nodes (connections.py).
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
_DOTTED_RE = re.compile(r"^$|^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_KEY_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_JID_RE = re.compile(r"^[^@/\s]+@[^@/\s]+$")


class SettingsError(ValueError):
    """A setting has a wrong value; the message names the setting."""


Check = Callable[[Any], str | None]


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _at_least_zero(value: Any) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def _port(value: Any) -> str | None:
    return None if 0 < value < 65536 else "must be a TCP port (1-65535)"


def _one_of(choices: tuple[str, ...]) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _url(*schemes: str) -> Check:
    def check(value: Any) -> str | None:
        parts = urlsplit(value)
        if parts.scheme in schemes and parts.hostname:
            return None
        return f"must be a {' or '.join(s + '://' for s in schemes)} URL with a host"

    return check


def _redis_url(value: Any) -> str | None:
    """What redis-py's ``from_url`` would reject only at the first connection (a ValueError
    from deep inside a save or a shard) or silently replace (a db or port it ignores)."""
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return "the port must be a number 1-65535"
    if parts.scheme not in REDIS_SCHEMES:
        return f"must be a {', '.join(s + '://' for s in REDIS_SCHEMES)} URL"
    if parts.scheme == "unix":
        if not parts.path:
            return "must name the socket, e.g. unix:///run/redis.sock?db=0"
    elif not parts.hostname:
        return "must name the host, e.g. redis://127.0.0.1:6379/0"
    elif port == 0:  # redis-py would quietly use 6379
        return "the port must be a number 1-65535"
    path = "" if parts.scheme == "unix" else parts.path  # a socket's path is no database
    db_check = _redis_cluster_db if parts.scheme.endswith("+cluster") else _redis_db
    # the options as redis-py reads them: a cluster URL's with its plain scheme
    return db_check(path, parse_qs(parts.query)) or _redis_options(
        value.replace("+cluster://", "://", 1))


def _redis_cluster_db(path: str, query: dict[str, list[str]]) -> str | None:
    db = query["db"][0] if "db" in query else unquote(path).strip("/")
    if db in ("", "0"):
        return None
    return "a Redis Cluster has database 0 only, as in redis+cluster://host:7000/"


def _redis_db(path: str, query: dict[str, list[str]]) -> str | None:
    db = query["db"][0] if "db" in query else unquote(path).strip("/")
    if db == "" or db.isdigit():
        return None
    return f"the database {db!r} must be a whole number 0 or more, as in redis://host:6379/0"


def _redis_options(value: str) -> str | None:
    try:  # the query options (socket_timeout=...), read as redis-py reads them; no connection
        redis.ConnectionPool.from_url(value)
    except ValueError as exc:
        return str(exc)
    return None


def _matches(pattern: re.Pattern[str], what: str) -> Check:
    def check(value: Any) -> str | None:
        return None if pattern.match(value) else f"must be {what}"

    return check


def _nonempty(value: Any) -> str | None:
    return None if value.strip() else "must not be empty"


def _ca_file(value: Any) -> str | None:
    if not value:
        return None
    try:
        ssl.create_default_context(cafile=value)
    except (OSError, ssl.SSLError) as exc:
        return f"cannot load CA certificates from it: {exc}"
    return None


def _setting(default: Any, check: Check | None = None, secret: bool = False) -> Any:
    return field(default=default, repr=not secret, metadata={"check": check})


@dataclass(frozen=True)
class Settings:
    """Everything scalepub can be told; one instance per process, immutable."""

    # Redis: where producers append and shards read.
    redis_url: str = _setting("redis://127.0.0.1:6379/0", _redis_url)
    # Bounds how long a Django save can wait on Redis (connect and command), in seconds.
    redis_timeout: float = _setting(1.0, _positive)
    # Outbox rows are deleted only once this many replicas have their entries (WAIT);
    # -1 (default): 1 on a Redis Cluster, 0 on a single Redis (connections.wait_replicas).
    redis_wait_replicas: int = _setting(
        -1, lambda v: None if v >= -1 else "must be 0 or more (-1: 1 on a cluster, 0 otherwise)")
    key_prefix: str = _setting("scalepub", _matches(_KEY_PREFIX_RE, "1-64 of [A-Za-z0-9_.:-]"))
    shards: int = _setting(8, _positive)
    # Per shard stream: at most this many entries wait for the pool (beyond it appends are
    # refused: backpressure), and XADD MAXLEN ~ trims published ones past it: the memory cap.
    stream_maxlen: int = _setting(250_000, _positive)
    payload_format: str = _setting("xml", _one_of(PAYLOAD_FORMATS))
    # outbox: a row in the save's own transaction, moved to Redis by the relay (nothing lost
    # while Redis is down); direct: appended on commit (lower latency, spills to the outbox).
    delivery: str = _setting("outbox", _one_of(DELIVERY_MODES))
    # thread: every Django process runs a relay thread, one of them (a Redis lease) works;
    # external: only `manage.py scalepub_relay` moves outbox rows.
    outbox_relay: str = _setting("thread", _one_of(RELAY_MODES))
    outbox_batch: int = _setting(500, _positive)
    # How often an idle relay looks for rows other processes committed.
    outbox_poll_ms: float = _setting(10.0, _positive)
    # Per-node history for subscribers' catch-up (docs/protocol.md section 5): the newest
    # HISTORY_MAXLEN entries of each node (0: no history), dropped HISTORY_TTL_S seconds after
    # the node's newest entry (0: kept while the count allows).
    history_maxlen: int = _setting(1000, _at_least_zero)
    history_ttl_s: int = _setting(86_400, _at_least_zero)

    xmpp_host: str = _setting("127.0.0.1", _nonempty)
    xmpp_port: int = _setting(5222, _port)
    xmpp_domain: str = _setting("localhost", _nonempty)
    pubsub_service: str = _setting("pubsub.localhost", _nonempty)
    xmpp_jid: str = _setting("pub@localhost", _matches(_JID_RE, "a bare JID like pub@example.com"))
    xmpp_password: str = _setting("", secret=True)
    # auto: plain TCP only to a loopback host, STARTTLS with certificate check elsewhere;
    # required: STARTTLS everywhere; off: plain TCP everywhere (development only).
    xmpp_tls: str = _setting("auto", _one_of(TLS_MODES))
    # PEM file of the CA(s) that signed the XMPP server's certificate (a private CA);
    # empty: the system's CA store.
    xmpp_ca_file: str = _setting("", _ca_file)
    # pubsub#access_model of the nodes scalepub creates: open, or whitelist (subscribers
    # need a member affiliation; docs/security.md).
    node_access_model: str = _setting("open", _one_of(ACCESS_MODELS))
    # Whether a disco#items on the pubsub service lists the nodes (to anyone, anonymous
    # included): off (default) or on. ops/stack renders it into ejabberd's
    # max_nodes_discoitems (docs/security.md, node enumeration).
    node_listing: str = _setting("off", _one_of(("off", "on")))
    # Dotted path of a callable (request, node) -> bool guarding the history endpoint;
    # empty: open to all, like open nodes.
    history_access: str = _setting("", _matches(_DOTTED_RE, "empty or a dotted path"))
    # Dotted path of a callable (request, node) -> bool asked before each history read: False
    # (or raising scalepub.django.views.HistoryRateLimited) answers 429; empty: no limit.
    history_rate_limit: str = _setting("", _matches(_DOTTED_RE, "empty or a dotted path"))
    anon_domain: str = _setting("anon.localhost", _nonempty)
    bosh_url: str = _setting("http://127.0.0.1:5280/bosh", _url("http", "https"))
    ws_url: str = _setting("ws://127.0.0.1:5280/ws", _url("ws", "wss"))

    # Shard batching and pipelining.
    batch_max_entries: int = _setting(250, _positive)
    # The batch is one text node, so ejabberd's max_payload_size (256 KiB in ops/, checked on
    # its in-memory form) and max_stanza_size (1 MiB) are both far above this.
    batch_max_bytes: int = _setting(128_000, _positive)
    # 0: an open batch goes at once when nothing is in flight, else with the next reply
    # (scalepub/shard/batcher.py); more: also at least this old.
    linger_ms: float = _setting(0.0, lambda v: None if v >= 0 else "must be 0 or more")
    window: int = _setting(32, _positive)
    # Per shard process: entries read and not yet confirmed, counted as their XML plus 250 B
    # (~730 B for a 300 B row). The deeper it reads, the bigger each node's batch under a
    # backlog; 8 MB kept a shard's peak RSS at ~57 MB (docs/benchmarks.md).
    buffer_max_bytes: int = _setting(8_000_000, _positive)

    # Shard leases (scalepub/shard/lease.py): a shard's owner renews its lease every
    # LEASE_RENEW_S and stops publishing before LEASE_TTL_S ran out without a renewal; a dead
    # supervisor's shards move within about LEASE_TTL_S + LEASE_RENEW_S.
    lease_ttl_s: float = _setting(5.0, _positive)
    lease_renew_s: float = _setting(1.0, _positive)

    metrics_host: str = _setting("127.0.0.1", _nonempty)
    metrics_port: int = _setting(9464, lambda v: None if 0 <= v < 65536 else "must be 0-65535")

    def __post_init__(self) -> None:
        _validate(self, lambda name: f"{ENV_PREFIX}{name.upper()}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build from ``SCALEPUB_*`` variables; keyword overrides (CLI flags) win."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw, ENV_PREFIX + f.name.upper())
        base = _build(cls, values, lambda name: f"{ENV_PREFIX}{name.upper()}")
        return base.replace(**overrides)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], **overrides: Any) -> Settings:
        """Build from Django's ``SCALEPUB = {"REDIS_URL": ...}`` dict."""
        names = {f.name.upper(): f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in mapping.items():
            label = f"{DJANGO_SETTING}[{key!r}]"
            if key not in names:
                raise SettingsError(f"{label}: unknown setting (known: {', '.join(sorted(names))})")
            f = names[key]
            values[f.name] = _parse(f, raw, label) if isinstance(raw, str) else raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        return _build(cls, values, lambda name: f"{DJANGO_SETTING}[{name.upper()!r}]")

    def replace(self, **overrides: Any) -> Settings:
        """A copy with some values changed (``None`` means keep)."""
        values = {k: v for k, v in overrides.items() if v is not None}
        if not values:
            return self
        return _build(type(self), {**dataclasses.asdict(self), **values},
                      lambda n: f"--{n.replace('_', '-')}")

    @property
    def redis_url_redacted(self) -> str:
        """``redis_url`` without its password, for log lines and error messages."""
        return redact_url(self.redis_url)

    @property
    def xmpp_host_is_loopback(self) -> bool:
        """True when the XMPP server is on this machine (plain TCP is then acceptable)."""
        if self.xmpp_host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.xmpp_host).is_loopback
        except ValueError:
            return False


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # unparsable: show nothing of what could be a secret
        return "***"
    if password is None:
        return url
    user = f"{parts.username}:***" if parts.username else ":***"
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}@{host}").geturl()


def _type_of(f: dataclasses.Field[Any]) -> type:
    return {"int": int, "float": float, "str": str, "bool": bool}[str(f.type)]


def _parse(f: dataclasses.Field[Any], raw: str, label: str) -> Any:
    kind = _type_of(f)
    if kind is str:
        return raw
    try:
        return kind(raw.strip())
    except ValueError:
        raise SettingsError(f"{label}: expected {kind.__name__}, got {raw!r}") from None


def _build(cls: type[Settings], values: dict[str, Any], label: Callable[[str], str]) -> Settings:
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise SettingsError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    for f in dataclasses.fields(cls):
        if f.name in values:
            values[f.name] = _coerce(f, values[f.name], label(f.name))
    obj = object.__new__(cls)
    for name, value in {**{f.name: f.default for f in dataclasses.fields(cls)}, **values}.items():
        object.__setattr__(obj, name, value)
    _validate(obj, label)
    return obj


def _coerce(f: dataclasses.Field[Any], value: Any, label: str) -> Any:
    kind = _type_of(f)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SettingsError(f"{label}: expected {kind.__name__}, got {value!r}")
    return value


def _validate(obj: Settings, label: Callable[[str], str]) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        _coerce(f, value, label(f.name))
        check: Check | None = f.metadata.get("check")
        problem = check(value) if check else None
        if problem:
            shown = "***" if not f.repr else repr(redact_url(value) if "url" in f.name else value)
            raise SettingsError(f"{label(f.name)}: {problem} (got {shown})")
    if obj.lease_renew_s * 2 > obj.lease_ttl_s:  # a renewal must be able to fail once
        raise SettingsError(
            f"{label('lease_renew_s')}: must be at most half of {label('lease_ttl_s')} "
            f"({obj.lease_ttl_s:g}), so one failed renewal does not lose the lease "
            f"(got {obj.lease_renew_s:g})")


def env_mapping(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{"REDIS_URL": ...}`` from the ``SCALEPUB_*`` variables of known settings.

    For a Django project that takes its ``SCALEPUB`` dict from the environment.
    """
    environ = os.environ if environ is None else environ
    names = (f.name.upper() for f in dataclasses.fields(Settings))
    return {n: environ[ENV_PREFIX + n] for n in names if environ.get(ENV_PREFIX + n)}
