"""The ``scalepub`` command: ``run`` the shard pool, ``tail`` nodes live."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from scalepub import __version__, exitcodes
from scalepub.logsetup import configure_logging
from scalepub.settings import Settings, SettingsError


def _settings(**overrides: Any) -> Settings:
    """SCALEPUB_* variables, then the command-line options."""
    try:
        return Settings.from_env(**overrides)
    except SettingsError as exc:
        click.echo(f"scalepub: bad setting: {exc}", err=True)
        sys.exit(exitcodes.for_exception(exc))


@contextlib.contextmanager
def _exit_codes(settings: Settings) -> Iterator[None]:
    """An error the user can fix ends the command with one line and its exit code."""
    try:
        yield
    except Exception as exc:
        sys.exit(exitcodes.report(exc, settings,
                                  lambda line: click.echo(f"scalepub: {line}", err=True)))


def _common(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--redis-url", help="Redis URL [env SCALEPUB_REDIS_URL]"),
        click.option("--key-prefix", help="Redis key prefix [env SCALEPUB_KEY_PREFIX]"),
        click.option("--xmpp-host", help="XMPP server host [env SCALEPUB_XMPP_HOST]"),
        click.option("--xmpp-port", type=int, help="XMPP c2s port [env SCALEPUB_XMPP_PORT]"),
        click.option("--pubsub-service", help="pubsub JID, e.g. pubsub.example.com "
                     "[env SCALEPUB_PUBSUB_SERVICE]"),
        click.option("--log-level", default="INFO", show_default=True,
                     type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"])),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="scalepub")
def main() -> None:
    """scalepub: new Django rows, live to many XMPP pubsub subscribers.

    Settings come from SCALEPUB_* environment variables (`eval "$(ops/stack env)"` sets
    them for the local stack); options override them. See README.md.
    """


@main.command()
@click.option("--shards", type=int, help="stream shards; must match the producers' SCALEPUB "
              "SHARDS [env SCALEPUB_SHARDS, default 8]")
@click.option("--processes", type=int, help="shard processes (default: one per shard)")
@click.option("--xmpp-jid", help="publisher account [env SCALEPUB_XMPP_JID]")
@click.option("--xmpp-password", help="prefer env SCALEPUB_XMPP_PASSWORD (not in ps output)")
@click.option("--batch-max-entries", type=int, help="entries per pubsub item [default 250]")
@click.option("--batch-max-bytes", type=int, help="bytes per pubsub item [default 128000]")
@click.option("--linger-ms", type=float, help="least age of a batch before it goes [default 0]")
@click.option("--window", type=int, help="publish IQs in flight per connection [default 32]")
@click.option("--buffer-max-bytes", type=int, help="memory per shard process for entries read "
              "and not yet confirmed [default 8000000]")
@click.option("--metrics-port", type=int, help="Prometheus endpoint port, 0 = none "
              "[env SCALEPUB_METRICS_PORT, default 9464]")
@click.option("--metrics-host", help="Prometheus endpoint address [default 127.0.0.1]")
@click.option("--name", help="this supervisor's id in logs and `scalepub status` "
              "(default: hostname-pid-random)")
@click.option("--lease-ttl-s", type=float, help="seconds a shard's lease lasts without a "
              "renewal [env SCALEPUB_LEASE_TTL_S, default 5]")
@click.option("--lease-renew-s", type=float, help="seconds between lease renewals, at most "
              "half the TTL [env SCALEPUB_LEASE_RENEW_S, default 1]")
@_common
def run(log_level: str, processes: int | None, name: str | None, **options: Any) -> None:
    """Run the shard pool: publish the streams to XMPP until SIGTERM or Ctrl-C.

    One Ctrl-C (or SIGTERM) stops gracefully: no new reads, the in-flight IQs are awaited
    and acknowledged, counts are logged. A second one stops at once (nothing unconfirmed
    is acknowledged, so nothing is lost: it is re-published by the next run).

    Several supervisors (on one host or many) with the same settings share the shards: each
    owns its share by lease, and takes over the shards of one that stops or dies.
    """
    if processes is not None and processes < 1:
        click.echo("scalepub: bad setting: --processes: must be greater than 0", err=True)
        sys.exit(exitcodes.USAGE)
    settings = _settings(**options)
    metrics_dir, created = multiprocess_metrics_dir()
    from scalepub.shard.membership import supervisor_id
    from scalepub.shard.pool import Pool  # imports prometheus_client: after the line above

    me = supervisor_id(name)
    configure_logging(log_level, me)
    try:
        code = Pool(settings, processes=processes, log_level=log_level, name=me).run()
    finally:
        if created:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    sys.exit(code)


def multiprocess_metrics_dir() -> tuple[Path, bool]:
    """Set up PROMETHEUS_MULTIPROC_DIR (emptied if given, else a new temp dir).

    prometheus_client picks its storage when first imported, so this runs before any import
    of it in the supervisor; the spawned shard processes inherit the variable.
    """
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        return path, False
    path = Path(tempfile.mkdtemp(prefix="scalepub-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path, True


@main.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_common
def status(as_json: bool, log_level: str, **options: Any) -> None:
    """Show each shard's backlog, liveness and owner, each outbox's backlog, live supervisors.

    Exit code 0 when every shard process is alive (its heartbeat key is fresh), none is
    stuck (work waiting, nothing confirmed for 30 s) and no outbox relay reports entries
    older than 30 s; 7 otherwise: usable as a health probe.
    """
    from scalepub.connections import sync_client
    from scalepub.status import as_json as rows
    from scalepub.status import (
        collect,
        collect_relays,
        collect_supervisors,
        healthy,
        relay_lines,
        supervisor_lines,
        table,
    )

    configure_logging(log_level)
    settings = _settings(**options)
    client = sync_client(settings)
    try:
        with _exit_codes(settings):
            statuses = collect(settings, client)
            relays = collect_relays(settings, client)
            supervisors = collect_supervisors(settings, client)
    finally:
        client.close()
    if as_json:
        click.echo(json.dumps(rows(statuses, relays, supervisors), indent=2))
    else:
        click.echo("\n".join(filter(None, [table(statuses), relay_lines(relays),
                                            supervisor_lines(supervisors)])))
    sys.exit(exitcodes.OK if healthy(statuses, relays) else exitcodes.UNHEALTHY)


@main.command()
@click.argument("nodes", nargs=-1)
@click.option("--all", "follow_all", is_flag=True, help="follow every node of the service, "
              "including nodes created later")
@click.option("--jid", help="log in as this account instead of anonymously")
@click.option("--password", envvar="SCALEPUB_TAIL_PASSWORD", help="password for --jid "
              "[env SCALEPUB_TAIL_PASSWORD]")
@click.option("--count", type=int, default=0, help="exit after this many entries")
@click.option("--connect-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="seconds to get an XMPP session before giving up")
@_common
def tail(nodes: tuple[str, ...], follow_all: bool, jid: str | None, password: str | None,
         count: int, connect_timeout: float, log_level: str, **options: Any) -> None:
    """Print entries of NODES as they arrive, with their end-to-end latency.

    Example: scalepub tail "/twitter/Tweet/mary jane" /twitter/Tweet/user2, or scalepub tail
    --all. Logs in anonymously on SCALEPUB_ANON_DOMAIN unless --jid is given. A node that
    does not exist yet is subscribed to as soon as it is created (said once on stderr).
    Exit codes: 2 invalid node name or setting, 3 XMPP server unreachable (within
    --connect-timeout) or session lost, 4 login refused.
    """
    if not nodes and not follow_all:
        raise click.UsageError("give one or more NODES, or --all")
    from scalepub.nodes import InvalidNodeName, validate_node

    try:
        for node in nodes:
            validate_node(node)
    except InvalidNodeName as exc:  # before the settings: a typo is said even without a stack
        click.echo(f"scalepub: {exc}", err=True)
        sys.exit(exitcodes.for_exception(exc))
    configure_logging(log_level)
    settings = _settings(**options)
    with _exit_codes(settings), contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_tail(settings, nodes, follow_all, jid, password or "", count,
                          connect_timeout))


async def _tail(settings: Settings, nodes: tuple[str, ...], follow_all: bool,
                jid: str | None, password: str, count: int, connect_timeout: float) -> None:
    from scalepub.xmpp.subscriber import ReceivedEntry, Subscriber

    done = asyncio.Event()
    seen = 0

    def show(entry: ReceivedEntry) -> None:
        nonlocal seen
        seen += 1
        click.echo(f"{entry.node} #{entry.seq} {entry.latency_s * 1000:7.1f} ms  "
                   f"{entry.summary()}")
        if count and seen >= count:
            done.set()

    sub = Subscriber(settings, nodes, show, follow_all=follow_all, jid=jid, password=password,
                     notice=lambda line: click.echo(f"scalepub: {line}", err=True))
    task = asyncio.create_task(sub.run(connect_timeout))
    if count:
        finished = asyncio.create_task(done.wait())
        await asyncio.wait({task, finished}, return_when=asyncio.FIRST_COMPLETED)
        finished.cancel()
        if task.done():
            task.result()  # raises what ended the subscriber (e.g. server unreachable)
    else:
        await task
    task.cancel()


@main.command()
@click.argument("node")
@click.argument("jids", nargs=-1, required=True)
@click.option("--affiliation", type=click.Choice(["member", "none", "outcast"]),
              default="member", show_default=True, help="none revokes, outcast bans")
@click.option("--xmpp-jid", help="publisher account (owner of the node) [env SCALEPUB_XMPP_JID]")
@_common
def authorize(node: str, jids: tuple[str, ...], affiliation: str, log_level: str,
              **options: Any) -> None:
    """Let JIDS subscribe to NODE when nodes are whitelist (NODE_ACCESS_MODEL=whitelist).

    Logs in as the publisher account, which owns the nodes it created, and sets each JID's
    affiliation (XEP-0060 owner use case). Exit code 0 when the server accepted it.
    """
    from scalepub.xmpp.affiliations import set_affiliations

    configure_logging(log_level)
    settings = _settings(**options)
    with _exit_codes(settings):
        reply = asyncio.run(set_affiliations(settings, node, dict.fromkeys(jids, affiliation)))
    if not reply.ok:
        click.echo(f"scalepub: the server refused: {reply.reason}", err=True)
        sys.exit(exitcodes.FAILURE)
    click.echo(f"{node}: {affiliation} for {', '.join(jids)}")


@main.command("configure-nodes")
@click.argument("nodes", nargs=-1)
@click.option("--xmpp-jid", help="publisher account (owner of the nodes) [env SCALEPUB_XMPP_JID]")
@_common
def configure_nodes(nodes: tuple[str, ...], log_level: str, **options: Any) -> None:
    """Give existing nodes the options scalepub needs (no replay of the last item on subscribe).

    ejabberd applies its force_node_config only when a node is created or configured: run
    this once after upgrading ops/ejabberd. NODES default to every node the publisher
    account owns. Exit code 0 when the server accepted every node.
    """
    from scalepub.xmpp.nodeconfig import NODE_OPTIONS
    from scalepub.xmpp.nodeconfig import configure_nodes as configure

    configure_logging(log_level)
    settings = _settings(**options)
    with _exit_codes(settings):
        result = asyncio.run(configure(settings, nodes or None))
    for node, condition in sorted(result.refused.items()):
        click.echo(f"scalepub: {node}: the server refused: {condition}", err=True)
    wanted = ", ".join(f"{k}={v}" for k, v in NODE_OPTIONS.items())
    click.echo(f"{len(result.configured)} node(s) configured ({wanted}), "
               f"{len(result.refused)} refused")
    if result.refused:
        sys.exit(exitcodes.FAILURE)


if __name__ == "__main__":
    main()
