"""Every Redis client scalepub makes: the URL, the timeouts, retries and health checks, once.

The producer, the outbox relay, ``scalepub status`` and the history endpoint use the
synchronous client; the shard pool's processes use the asyncio one. A ``redis+cluster://``
(or ``rediss+cluster://``) URL makes both a Redis Cluster client (redis-py's RedisCluster),
which follows MOVED/ASK and failovers; every key of a shard shares the hash tag ``{N}``
(scalepub.sharding), so each script and pipeline of one shard goes to one master.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import threading
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import urlsplit

import hiredis
import redis
import redis.asyncio as aredis
import redis.asyncio.cluster as acluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import ClusterPipeline, RedisCluster
from redis.commands.core import Script
from redis.connection import parse_url
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    RedisClusterException,
    TryAgainError,
)
from redis.retry import Retry

from scalepub.settings import Settings, SettingsError

# A shard's blocking XREADGROUP waits up to this long: its socket timeout must be longer.
SHARD_SOCKET_TIMEOUT_S = 5.0
SHARD_CONNECT_TIMEOUT_S = 2.0
HEALTH_CHECK_INTERVAL_S = 30
# URL schemes that mean a Redis Cluster, and the plain scheme redis-py is given instead.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
# How often a cluster client retries a command through a failover before giving up (it
# re-reads the slot map in between); a shard's Retrier and the relay go on after that.
CLUSTER_RETRIES = 3

# Errors that pass by themselves (a master failing over, a slot being migrated, the cluster
# momentarily without a master for some slots): callers wait and retry, as for a Redis outage.
# RedisClusterException covers "no reachable node" and SlotNotCoveredError.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    redis.ConnectionError, redis.TimeoutError, ClusterDownError, TryAgainError,
    RedisClusterException,
)


class RedisModeError(SettingsError):
    """REDIS_URL says single Redis but the server is a cluster node, or the reverse."""


def is_cluster(settings: Settings) -> bool:
    """Whether ``redis_url`` names a Redis Cluster (``redis+cluster://``)."""
    return urlsplit(settings.redis_url).scheme in CLUSTER_SCHEMES


def wait_replicas(settings: Settings) -> int:
    """REDIS_WAIT_REPLICAS, its default resolved: 1 on a cluster, 0 on a single Redis."""
    if settings.redis_wait_replicas >= 0:
        return settings.redis_wait_replicas
    return 1 if is_cluster(settings) else 0


def plain_url(url: str) -> str:
    """``url`` with a cluster scheme replaced by the scheme redis-py parses."""
    scheme, sep, rest = url.partition("://")
    return CLUSTER_SCHEMES.get(scheme, scheme) + sep + rest


def sync_client(settings: Settings, *, timeout: float | None = None) -> redis.Redis:
    """A client whose every call is bounded by ``redis_timeout`` (one quick retry, no backoff).

    ``timeout`` overrides ``redis_timeout`` (e.g. the pool's start-up check, which may wait
    longer than a Django save should). On a cluster URL it is a RedisCluster, typed as
    ``redis.Redis``: it answers the same commands, SCAN goes to every master.
    """
    seconds = settings.redis_timeout if timeout is None else timeout
    options: dict[str, Any] = {"socket_timeout": seconds, "socket_connect_timeout": seconds}
    if is_cluster(settings):
        return cast(redis.Redis, LazyCluster(settings, options))
    return redis.Redis.from_url(
        settings.redis_url, **options,
        # Once more on a broken connection (e.g. a pooled one Redis closed), never on a
        # timeout: the command may have run, and appending twice would duplicate entries.
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
    )


def client_for_url(url: str, **options: Any) -> redis.Redis:
    """A plain client of ``url``, a cluster one for ``redis+cluster://`` (typed as
    ``redis.Redis``), for tools that only have the URL (the loadtest, benchmarks)."""
    if urlsplit(url).scheme in CLUSTER_SCHEMES:
        return cast(redis.Redis, RedisCluster.from_url(plain_url(url), **options))
    return redis.Redis.from_url(url, **options)


def shard_client(settings: Settings) -> aredis.Redis:
    """The asyncio client of one shard process: hiredis packing, raw stream replies.

    On a cluster URL an asyncio RedisCluster (typed as ``aredis.Redis``); it connects at its
    first command (``await client.initialize()``).
    """
    timeouts: dict[str, Any] = {
        "socket_timeout": max(SHARD_SOCKET_TIMEOUT_S, settings.redis_timeout),
        "socket_connect_timeout": max(SHARD_CONNECT_TIMEOUT_S, settings.redis_timeout)}
    if is_cluster(settings):
        return raw_replies(cast(aredis.Redis, _async_cluster(settings, timeouts)))
    return raw_replies(aredis.Redis.from_url(
        settings.redis_url, **timeouts, connection_class=HiredisPackedConnection))


class LazyCluster:
    """A RedisCluster made at its first use, and made again at the next use if that failed.

    redis-py's RedisCluster reads the slot map when it is made: made eagerly, a Django process
    or relay that starts while the cluster is unreachable would fail instead of waiting with
    its rows kept. Not reachable at first use: ``redis.ConnectionError`` with the URL.
    """

    def __init__(self, settings: Settings, options: dict[str, Any]) -> None:
        self._settings = settings
        self._options = options
        self._client: RedisCluster | None = None
        self._making = threading.Lock()  # request threads may share one producer

    @property
    def cluster(self) -> RedisCluster:
        """The RedisCluster, made now if needed."""
        if self._client is not None:
            return self._client
        with self._making:
            if self._client is not None:
                return self._client
            try:
                # A node that fails is retried after re-reading the slot map: that is how a
                # failover or a moved slot is followed. Connection errors only: a timeout may
                # mean the command ran, and appending twice would duplicate entries.
                self._client = _NoTimeoutRetryCluster.from_url(
                    plain_url(self._settings.redis_url), **self._options,
                    retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), CLUSTER_RETRIES,
                                supported_errors=(redis.ConnectionError,)),
                    require_full_coverage=False)
            except RedisClusterException as exc:
                raise _cluster_error(self._settings, exc) from exc
            return self._client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cluster, name)

    def register_script(self, script: str) -> Script:
        """A Script bound to this client, made without connecting (bytes: no encoder asked)."""
        return Script(cast(redis.Redis, self), script.encode())

    def close(self) -> None:
        """Close the cluster's connections, if it was ever made."""
        if self._client is not None:
            self._client.close()


def run_script(script: Script, keys: Sequence[Any], args: Sequence[Any], client: Any) -> Any:
    """``script(keys, args, client)``, also queued in a cluster pipeline.

    redis-py's ClusterPipeline refuses ``evalsha`` by name (it cannot load a missing script
    there); EVALSHA as a plain command goes to the keys' slot. A plain Pipeline would first
    ask SCRIPT EXISTS, one more round trip per call (the relay's rounds of several shards).
    A node without the script answers NoScriptError for that command: ``script_missing``
    tells, the caller runs it again outside the pipeline (Script loads it then).
    """
    if isinstance(client, (ClusterPipeline, redis.client.Pipeline)):
        return client.execute_command(  # type: ignore[no-untyped-call]
            "EVALSHA", script.sha, len(keys), *keys, *args)
    return script(keys=keys, args=args, client=client)


def script_missing(reply: object) -> bool:
    """Whether a pipeline's reply says the node lacked the script (it did not run)."""
    return isinstance(reply, NoScriptError)


class Lua:
    """A hot Lua script of the shards, sent by its SHA1 (EVALSHA) in asyncio pipelines.

    Not redis-py's Script: in a pipeline that asks SCRIPT EXISTS first, one more round trip.
    A server that lacks the script (restarted, failed over, SCRIPT FLUSH) answers NOSCRIPT
    to that command alone (``script_missing``); the caller sends it again with ``by_sha``
    false, which also puts it in the server's cache for the next EVALSHA.
    """

    def __init__(self, body: str) -> None:
        self.body = body
        self.sha = hashlib.sha1(body.encode()).hexdigest()

    def queue(self, pipe: Any, keys: Sequence[Any], args: Sequence[Any], *,
              by_sha: bool = True) -> None:
        """Add one run of the script to ``pipe`` (any asyncio pipeline, cluster ones too)."""
        name, script = ("EVALSHA", self.sha) if by_sha else ("EVAL", self.body)
        pipe.execute_command(name, script, len(keys), *keys, *args)


def raise_transport_error(reply: object) -> None:
    """Raise a pipeline reply that says a node could not be reached (not a refusal).

    RedisClusterException (no node answers, a slot without a master) is raised as
    ``redis.ConnectionError``, which callers already treat as an outage."""
    if isinstance(reply, RedisClusterException):
        raise redis.ConnectionError(str(reply)) from reply
    if isinstance(reply, Exception) and not isinstance(reply, redis.ResponseError):
        raise reply


class _NoTimeoutRetryCluster(RedisCluster):
    """RedisCluster retries a timed-out command by itself whatever its ``retry`` says; an
    append that timed out after Redis ran it would then be appended twice (in ``direct``
    mode, which has no record to recognise it). Connection errors and CLUSTERDOWN still are
    retried after re-reading the slot map."""

    ERRORS_ALLOW_RETRY = tuple(  # type: ignore[assignment]
        e for e in RedisCluster.ERRORS_ALLOW_RETRY if e is not redis.TimeoutError)


def cluster_of(client: object) -> RedisCluster | None:
    """The RedisCluster behind a client of ``sync_client``, or None for a single Redis."""
    if isinstance(client, LazyCluster):
        return client.cluster
    return client if isinstance(client, RedisCluster) else None


def _async_cluster(settings: Settings, options: dict[str, Any]) -> acluster.RedisCluster:
    kwargs: dict[str, Any] = parse_url(  # type: ignore[no-untyped-call]
        plain_url(settings.redis_url))
    tls = kwargs.pop("connection_class", None) is not None  # rediss://
    client = acluster.RedisCluster(
        **kwargs, **options, ssl=tls, require_full_coverage=False,
        retry=AsyncRetry(ExponentialBackoff(cap=0.5, base=0.05), CLUSTER_RETRIES))
    if not tls:
        # The asyncio RedisCluster takes no connection_class: its nodes (made when it reads
        # the slot map) get theirs from these connection kwargs.
        client.nodes_manager.connection_kwargs["connection_class"] = HiredisPackedConnection
        for node in client.nodes_manager.startup_nodes.values():
            node.connection_class = HiredisPackedConnection
    return client


def master_of(client: redis.Redis, key: str) -> str | None:
    """``host:port`` of the master serving ``key``'s slot on a cluster; None on one Redis."""
    cluster: Any = cluster_of(client)  # redis-py's cluster methods are untyped
    return str(cluster.get_node_from_key(key).name) if cluster else None


def check_mode(settings: Settings, client: redis.Redis) -> None:
    """Raise RedisModeError when the server's cluster mode and REDIS_URL's scheme disagree.

    A single-node URL pointed at a cluster node would fail at the first key of another
    node's slot (MOVED); the reverse fails to start. Both name the setting here instead.
    """
    if is_cluster(settings):
        return  # RedisCluster refused a non-cluster node already (sync_client)
    try:
        enabled = client.info("cluster").get("cluster_enabled")
    except redis.ResponseError:  # INFO refused (ACL): nothing to tell
        return
    if enabled in (1, "1"):
        url = settings.redis_url_redacted
        raise RedisModeError(
            f"SCALEPUB_REDIS_URL / SCALEPUB['REDIS_URL']: {url} is a node of a Redis Cluster; "
            f"use {url.replace('://', '+cluster://', 1)} (scheme redis+cluster://)")


def _cluster_error(settings: Settings, exc: RedisClusterException) -> Exception:
    """What a refused cluster start means for the user."""
    url = settings.redis_url_redacted
    if "cluster mode is not enabled" in str(exc).lower():
        single = url.replace("+cluster://", "://", 1)
        return RedisModeError(
            f"SCALEPUB_REDIS_URL / SCALEPUB['REDIS_URL']: {url} is not a Redis Cluster node "
            f"(cluster mode is not enabled); for a single Redis use {single}")
    return redis.ConnectionError(f"no node of the Redis Cluster answered: {exc}")


def unreplicated(client: redis.Redis, probes: dict[int, str], replicas: int,
                 timeout_ms: int) -> set[int]:
    """The shards (``probes``: shard → a key in its slot) whose master could not confirm,
    within ``timeout_ms``, that ``replicas`` replicas have every write made to it so far.

    WAIT counts the replicas that acknowledged the writes *of its own connection*; a pooled
    connection may not be the one that appended. So each master gets a probe write and then
    WAIT, in one pipeline (one connection per node, in order): a master replicates in order,
    so a replica that has the probe has every earlier append. One round trip per master.
    """
    cluster: Any = cluster_of(client)  # redis-py's cluster methods are untyped
    nodes: dict[str, tuple[Any, list[int]]] = {}
    for shard, key in probes.items():
        node = cluster.get_node_from_key(key) if cluster else None
        nodes.setdefault(node.name if node else "", (node, []))[1].append(shard)
    pipe = (cluster or client).pipeline(transaction=False)
    for node, shards in nodes.values():
        for shard in shards:
            pipe.set(probes[shard], 1, px=60_000)
        options = {"target_nodes": node} if cluster else {}
        pipe.execute_command("WAIT", replicas, timeout_ms, **options)
    replies = list(pipe.execute(raise_on_error=False))
    failed: set[int] = set()
    for node, shards in nodes.values():
        acked = replies[len(shards)]
        replies = replies[len(shards) + 1:]
        moved = cluster and any(cluster.get_node_from_key(probes[s]).name != node.name
                                for s in shards)
        if moved or not isinstance(acked, int) or acked < replicas:
            failed.update(shards)  # a slot moved meanwhile: not known, so not confirmed
    return failed


class Commands:
    """Commands gathered for one round trip (``OwnConnection.execute``); takes what an asyncio
    pipeline's ``execute_command`` takes, so ``Lua.queue`` fills either."""

    def __init__(self) -> None:
        self.stack: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any) -> None:
        """Add one command (its name first)."""
        self.stack.append(args)


class OwnConnection:
    """A connection of its own for a hot loop's round trips (a shard's reads): the commands
    written at once, their replies read back in order, under one deadline.

    Not redis-py's Pipeline, whose bookkeeping (a pool checkout under a lock, the retry
    wrapper, the command stack, a reset) was ~300 us of a ~450 us round trip's CPU here
    (docs/benchmarks.md, the shard's CPU per IQ); nor its per-call socket timeouts (a task
    for each write, a timer for each reply): the client's socket timeout bounds the whole
    round trip instead, plus the longest wait it asks for. No retry of its own: a read that
    ran must not run twice (the caller decides). A plain client only (``of``): a cluster
    client's pipelines route by slot.
    """

    def __init__(self, client: aredis.Redis) -> None:
        pool = client.connection_pool
        self._timeout_s = pool.connection_kwargs.get("socket_timeout") or SHARD_SOCKET_TIMEOUT_S
        self._make = functools.partial(pool.connection_class,
                                       **{**pool.connection_kwargs, "socket_timeout": None})
        self._conn: aredis.Connection | None = None

    @classmethod
    def of(cls, client: object) -> OwnConnection | None:
        """One for ``client``, or None where it must use its pipelines (a cluster)."""
        return cls(client) if isinstance(client, aredis.Redis) else None

    async def execute(self, commands: Sequence[tuple[Any, ...]], wait_s: float = 0.0
                      ) -> list[object]:
        """Each command's reply; an error reply as its exception (as a pipeline's
        ``execute(raise_on_error=False)``). ``wait_s``: how long a blocking command among
        them may wait. A connection error, a timeout or a cancellation drops the connection
        (its replies may be half read) and is raised (``redis.TimeoutError`` for a timeout)."""
        conn = self._conn
        if conn is None:
            conn = self._conn = cast(aredis.Connection, self._make())
        try:
            async with asyncio.timeout(self._timeout_s + wait_s):
                return await _round_trip(conn, commands)
        except TimeoutError as exc:
            self._conn = None
            await _drop(conn)
            raise redis.TimeoutError(f"no reply from Redis within {self._timeout_s + wait_s:g} s"
                                     ) from exc
        except BaseException:
            self._conn = None
            await _drop(conn)
            raise

    async def aclose(self) -> None:
        """Close the connection (a later ``execute`` opens a new one)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect()


async def _round_trip(conn: aredis.Connection, commands: Sequence[tuple[Any, ...]]
                      ) -> list[object]:
    await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
    replies: list[object] = []
    for _ in commands:
        try:
            replies.append(await conn.read_response())
        except redis.ResponseError as exc:
            replies.append(exc)
    return replies


async def _drop(conn: aredis.Connection) -> None:
    try:
        await conn.disconnect(nowait=True)
    except Exception:  # the connection is abandoned either way
        return


class HiredisPackedConnection(aredis.Connection):
    """Packs commands with hiredis (C). redis-py's asyncio connection packs each argument in
    Python, ~4 us an id measured; XACK of every published entry then costs a shard more than
    all its other work."""

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        if isinstance(name, str) and " " in name:  # e.g. "XGROUP CREATE"
            args = (*name.split(), *args[1:])
        return [hiredis.pack_command(args)]


def raw_replies(r: aredis.Redis) -> aredis.Redis:
    """Skip redis-py's per-entry reply parsing (dicts) for the reads; ~3 us an entry. XREAD
    only wakes a shard's read up (lease.ShardLease.read_new): its reply is not looked into."""
    for command in ("XREADGROUP", "XAUTOCLAIM", "XREAD"):
        r.set_response_callback(command, lambda response, **_kw: response)
    return r
