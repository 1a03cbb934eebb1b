"""Run a load-test scenario headless: ``python -m loadtest.run loadtest/scenarios/NAME.toml``.

For each variant (batch size) of the scenario, on loopback only: a private Redis + ejabberd on
free ports (``tests/stack.py`` → ``ops/stack``), the nodes created as the publisher, ``scalepub
run``, the Locust BOSH subscribers (a subprocess: gevent must not patch this one), then the
example project's ``manage.py tweet`` producers for the scenario's duration. It waits for the
last delivery (bounded), stops everything it started, also on Ctrl-C, SIGTERM or an error, and
writes the report folder (``loadtest/report.py``). Exit codes: 0 every entry reached every
subscriber, 1 some did not (or a subscriber never subscribed), 2 the run failed or was stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import redis

from loadtest import report
from loadtest.bench_latency import scrape
from loadtest.bench_storm import free_port
from loadtest.bosh import BoshClient, HTTPTransport
from loadtest.pinning import Placement, Quota, affinity, affinity_of, pin_tree
from loadtest.sampler import Sampler
from loadtest.scenario import Scenario, ScenarioError, Variant, from_mapping, load, nodes_for
from scalepub.connections import client_for_url
from scalepub.sharding import Keys
from tests.stack import Stack, new_stack

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KEY_PREFIX = "lt"
AUTHOR_PREFIX = "user"
HOT_AUTHOR_PREFIX = "hot"
EXIT_OK, EXIT_LOST, EXIT_FAILED = 0, 1, 2
GENERATOR_GROUPS = ("locust", "websocket")  # the subscriber processes: the load generator
STOP_GRACE_S = 30.0


class Stopped(Exception):
    """SIGTERM or SIGINT: stop everything and leave."""


def ejabberd_pids(stack: Stack) -> list[int]:
    """The beam.smp process(es) running this stack's ejabberd node."""
    node = stack.control["SCALEPUB_EJABBERD_NODE"]
    pids = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        if (proc.info["name"] or "").startswith("beam") and node in (proc.info["cmdline"] or []):
            pids.append(proc.pid)
    return pids


def redis_pids(stack: Stack) -> list[int]:
    """This stack's redis-server (from its pid file)."""
    with contextlib.suppress(OSError, ValueError):
        return [int((stack.state_dir / "redis.pid").read_text().strip())]
    return []


@dataclass
class Procs:
    """The processes of one variant, by group, for CPU sampling and cleanup."""

    stack: Stack | None = None
    pool: subprocess.Popen[bytes] | None = None
    locust: subprocess.Popen[bytes] | None = None
    websocket: subprocess.Popen[bytes] | None = None
    producers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _servers: dict[str, list[int]] = field(default_factory=dict)

    def roots(self) -> dict[str, list[int]]:
        """Root pids per group (children are added by the sampler)."""
        out: dict[str, list[int]] = {"runner": [os.getpid()]}
        if self.stack is not None:
            if not self._servers.get("ejabberd"):  # looked up once: a process scan is costly
                self._servers = {"ejabberd": ejabberd_pids(self.stack),
                                 "redis": redis_pids(self.stack)}
            out.update(self._servers)
        if self.pool is not None:
            out["pool"] = [self.pool.pid]
        if self.locust is not None:
            out["locust"] = [self.locust.pid]
        if self.websocket is not None:
            out["websocket"] = [self.websocket.pid]
        out["producers"] = [p.pid for p in self.producers]
        return out


def main(argv: list[str] | None = None) -> int:
    """Command line: run a scenario, print where the report is and the headline figures."""
    args = _parser().parse_args(argv)
    try:
        scenario = _with_overrides(load(Path(args.scenario)), args.set)
    except ScenarioError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return EXIT_FAILED
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out) if args.out else REPO / "loadtest" / "reports" / f"{stamp}-{scenario.name}"
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _raise_stopped)
    signal.signal(signal.SIGINT, _raise_stopped)
    results = []
    try:
        for variant in scenario.variants():
            at_rate = replace(scenario, rate=variant.rate) if variant.rate else scenario
            results.append(run_variant(at_rate, variant, out / variant.name))
    except (Stopped, KeyboardInterrupt):
        print("loadtest: stopped; everything started was stopped", file=sys.stderr)
        return EXIT_FAILED
    except Exception:  # a part failed to start or died: said, after everything was stopped
        traceback.print_exc()
        print("loadtest: failed; everything started was stopped (logs in the report folder)",
              file=sys.stderr)
        return EXIT_FAILED
    finally:
        if results:
            report.write(out, scenario, results)
    print(f"report: {out / 'summary.md'}")
    for r in results:
        print(report.headline(r))
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_LOST


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__)
    parser.add_argument("scenario", help="scenario file, e.g. loadtest/scenarios/smoke.toml")
    parser.add_argument("--out", help="report folder (default loadtest/reports/<time>-<name>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a scenario key (TOML value), e.g. --set duration_s=10")
    return parser


def _with_overrides(scenario: Scenario, pairs: list[str]) -> Scenario:
    if not pairs:
        return scenario
    values: dict[str, Any] = {}
    for pair in pairs:
        try:
            values.update(tomllib.loads(pair))
        except tomllib.TOMLDecodeError as exc:
            raise ScenarioError(f"--set {pair}: {exc}") from None
    merged = {k: getattr(scenario, k) for k in scenario.__dataclass_fields__}
    merged["batch_max_entries"] = list(merged["batch_max_entries"])
    merged["linger_ms"] = list(merged["linger_ms"])
    merged["rates"] = list(merged["rates"])
    return from_mapping({**merged, **values}, "--set")


def _raise_stopped(_signum: int, _frame: Any) -> None:
    # Further signals are ignored: the cleanup that follows must run to its end.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Stopped


# ---------------------------------------------------------------------------- one variant


def run_variant(s: Scenario, variant: Variant, out: Path) -> dict[str, Any]:
    """Run the scenario with one batching; returns its results (see ``report``)."""
    out.mkdir(parents=True, exist_ok=True)
    procs, place = Procs(), Placement.parse(s.pin)
    with contextlib.ExitStack() as cleanup:
        dbdir = Path(tempfile.mkdtemp(prefix="loadtest-db-", dir=_fast_tmp()))
        cleanup.callback(shutil.rmtree, dbdir, True)
        procs.stack = new_stack()
        cleanup.callback(_stack_down, procs.stack, out)
        print(f"[{variant.label}] starting Redis + ejabberd; {place.describe()}", flush=True)
        with affinity(place.sut):  # Redis and ejabberd's node inherit the CPUs
            procs.stack.up()
        env = _env(s, procs.stack)
        hot = s.hot_node if s.hot_share else None
        authors = s.author_nodes(AUTHOR_PREFIX)
        _create_nodes(procs.stack.env, ([hot] if hot else []) + authors)
        dbs = _prepare_dbs(s, env, dbdir)
        metrics_port = free_port()
        with affinity(place.sut):
            procs.pool = _start([str(BIN / "scalepub"), "run", "--shards", str(s.shards),
                                 "--batch-max-entries", str(variant.batch_max_entries),
                                 "--linger-ms", str(variant.linger_ms), "--window",
                                 str(s.window), "--metrics-port", str(metrics_port)],
                                env, out / "pool.log")
        cleanup.callback(_stop, procs.pool, signal.SIGTERM)
        with affinity(place.generator):
            if s.subscribers:
                procs.locust = _start_locust(s, procs.stack, env, out, hot, authors)
            if s.ws_subscribers:
                procs.websocket = _start_websocket(s, procs.stack, env, out, hot, authors)
        cleanup.callback(_stop, procs.locust, signal.SIGTERM)
        cleanup.callback(_stop, procs.websocket, signal.SIGTERM)
        cleanup.callback(_stop_all, procs.producers)
        sampler = Sampler(procs.roots, env["SCALEPUB_REDIS_URL"], KEY_PREFIX, s.shards,
                          progress=lambda: _counts(out), detailed=GENERATOR_GROUPS)
        with affinity(place.generator):  # the sampler thread is part of the generator side
            sampler.start()
        cleanup.callback(sampler.stop)
        ready = _wait_ready(s, procs, out)
        _wait_pool(s, env, procs)
        pinned = _pin_servers(place, procs)
        measured = _measured_production(s, env, dbs, procs, out, place, metrics_port, cleanup)
        drained = _drain(s, env, procs, out)
        _stop(procs.locust, signal.SIGTERM)
        _stop(procs.websocket, signal.SIGTERM)
        sampler.stop()
        _stop(procs.pool, signal.SIGTERM)
        truth = _truth(dbs, env, s.shards)
    return report.variant_results(
        scenario=s, variant=variant, out=out, ready=ready, drained=drained,
        truth=truth, timeline=sampler.rows, usage=sampler.usage,
        placement={"plan": place.describe(), **pinned,
                   **{role: sorted(place.cpus(role)) for role in ("sut", "generator", "app")}},
        subscription=lambda user: nodes_for(user, hot, authors, s.authors_per_subscriber),
        **measured,
    )


def _pin_servers(place: Placement, procs: Procs) -> dict[str, Any]:
    """Make sure every thread of the stack's servers is on the sut CPUs (ejabberdctl may start
    the node through processes of its own), and record where each group may run."""
    roots = procs.roots()
    for group in ("ejabberd", "redis"):
        for pid in roots.get(group, []):
            pin_tree(pid, place.sut)
    return {"affinity": {group: sorted({c for pid in pids for c in affinity_of(pid)})
                         for group, pids in roots.items() if pids}}


def _measured_production(s: Scenario, env: dict[str, str], dbs: list[Path], procs: Procs,
                         out: Path, place: Placement, metrics_port: int,
                         cleanup: contextlib.ExitStack) -> dict[str, Any]:
    """The production window with what is measured around it: the pool's per-hop histograms
    (the generator's CPU is sampled all along); a generator quota is on only meanwhile."""
    generator = {g: pids for g, pids in procs.roots().items() if g in GENERATOR_GROUPS}
    quota = None
    if s.generator_cpu_quota:
        quota = Quota(s.generator_cpu_quota)
        cleanup.callback(quota.remove)
        quota.apply([pid for pids in generator.values() for pid in pids])
        print(f"generator capped at {s.generator_cpu_quota:g} cores ({quota.how})", flush=True)
    hops_before = _scrape(metrics_port)
    window = _produce(s, env, dbs, procs, out, place)
    hops_after = _scrape(metrics_port)
    if quota is not None:
        quota.lift()  # the drain that follows is not measured: let it finish at full speed
    # One generator process uses one core at most (Python); together they have their CPUs,
    # or the quota they share.
    capacity = min(1.0, s.generator_cpu_quota or 1.0)
    total = s.generator_cpu_quota or float(len(place.generator) or os.cpu_count() or 1)
    return {"window": window, "hops": (hops_before, hops_after), "capacity": capacity,
            "total_capacity": total,
            "quota": quota.how if quota else ""}


def _scrape(port: int) -> dict[str, list[tuple[float, float]]]:
    try:
        return scrape(port)
    except OSError as exc:  # the figures are lost, not the run
        print(f"pool metrics on port {port}: {exc}", flush=True)
        return {}


def _fast_tmp() -> str | None:
    # The example project's SQLite files: on tmpfs when there is one, so that fsync does not
    # decide the save rate (the database is the example's, not what is under test).
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _env(s: Scenario, stack: Stack) -> dict[str, str]:
    return {
        **os.environ, **stack.env,
        "SCALEPUB_SHARDS": str(s.shards), "SCALEPUB_KEY_PREFIX": KEY_PREFIX,
        "SCALEPUB_METRICS_PORT": "0", "DJANGO_DEBUG": "0", "PYTHONPATH": str(REPO),
    }


def _stack_down(stack: Stack, out: Path) -> None:
    stack.down()
    for log in (stack.state_dir / "ejabberd" / "log").glob("*.log"):
        with contextlib.suppress(OSError):
            shutil.copyfile(log, out / f"ejabberd-{log.name}")
    shutil.rmtree(stack.state_dir, ignore_errors=True)


def _create_nodes(env: dict[str, str], nodes: list[str]) -> None:
    """Create every node as the publisher, so subscribers can subscribe before the first save."""
    user, _, domain = env["SCALEPUB_XMPP_JID"].partition("@")
    transport = HTTPTransport(env["SCALEPUB_BOSH_URL"])
    client = BoshClient(transport, domain, wait=10)
    client.connect(user, env["SCALEPUB_XMPP_PASSWORD"], resource="nodes")
    client.create_node(env["SCALEPUB_PUBSUB_SERVICE"], nodes)
    client.close()
    transport.close()


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        # Its own session: a Ctrl-C in the terminal reaches only the runner, which stops the
        # children in order (producers, subscribers, pool, stack).
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)


def _stop(proc: subprocess.Popen[bytes] | None, sig: int) -> None:
    """Signal a child, wait for it (bounded), then kill whatever is left of its process group
    (each child leads its own group: shards, Locust workers, tweet processes go with it)."""
    if proc is None:
        return
    name = Path(str(proc.args[0] if isinstance(proc.args, list) else proc.args)).name
    if proc.poll() is None:
        proc.send_signal(sig)
        started = time.monotonic()
        try:
            proc.wait(STOP_GRACE_S)
            print(f"pid {proc.pid} ({name}) exited {proc.returncode} after "
                  f"{time.monotonic() - started:.1f} s", flush=True)
        except subprocess.TimeoutExpired:
            print(f"pid {proc.pid} ({name}) still running {STOP_GRACE_S:g} s after signal "
                  f"{sig}: killed", flush=True)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        _stop(proc, signal.SIGTERM)


def _start_locust(s: Scenario, stack: Stack, env: dict[str, str], out: Path,
                  hot: str | None, authors: list[str]) -> subprocess.Popen[bytes]:
    bosh = stack.env["SCALEPUB_BOSH_URL"]
    base, _, path = bosh.partition("://")[2].partition("/")
    config = {
        "bosh_base": f"http://{base}", "bosh_path": f"/{path}",
        "anon_domain": stack.env["SCALEPUB_ANON_DOMAIN"],
        "pubsub_service": stack.env["SCALEPUB_PUBSUB_SERVICE"],
        "wait_s": s.bosh_wait_s, "out_dir": str(out), "hot_node": hot, "author_nodes": authors,
        "authors_per_user": s.authors_per_subscriber, "locust_sample": s.locust_sample,
    }
    (out / "locust-config.json").write_text(json.dumps(config, indent=1))
    bound = s.max_ready_s + s.duration_s + s.drain_s + 120
    cmd = [str(BIN / "locust"), "-f", str(REPO / "loadtest" / "locustfile.py"), "--headless",
           "-u", str(s.subscribers), "-r", str(s.spawn_rate), "--run-time", f"{int(bound)}s",
           "--stop-timeout", "5", "--csv", str(out / "locust"), "--csv-full-history",
           "--only-summary", "--loglevel", "INFO", "--exit-code-on-error", "0"]
    if s.locust_processes > 1:
        cmd += ["--processes", str(s.locust_processes)]
    return _start(cmd, {**env, "LOADTEST_CONFIG": str(out / "locust-config.json")},
                  out / "locust.log")


def _start_websocket(s: Scenario, stack: Stack, env: dict[str, str], out: Path,
                     hot: str | None, authors: list[str]) -> subprocess.Popen[bytes]:
    config = {
        "ws_url": stack.env["SCALEPUB_WS_URL"], "anon_domain": stack.env["SCALEPUB_ANON_DOMAIN"],
        "pubsub_service": stack.env["SCALEPUB_PUBSUB_SERVICE"], "out_dir": str(out),
        "hot_node": hot, "author_nodes": authors, "authors_per_user": s.authors_per_subscriber,
        # After the BOSH users' numbers: the same rotation over the author nodes.
        "users": s.ws_subscribers, "first_user": s.subscribers, "spawn_rate": s.spawn_rate,
    }
    (out / "websocket-config.json").write_text(json.dumps(config, indent=1))
    return _start([str(BIN / "python"), "-m", "loadtest.websocket",
                   str(out / "websocket-config.json")], env, out / "websocket.log")


def _progress(out: Path) -> dict[str, Any]:
    total: dict[str, Any] = {"ready": 0, "entries": 0, "duplicates": 0, "reconnects": 0}
    subscriptions: dict[str, int] = {}
    for path in out.glob("progress-*.json"):
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(path.read_text())
            for key in total:
                total[key] += int(data.get(key, 0))
            for node, n in data.get("subscriptions", {}).items():
                subscriptions[node] = subscriptions.get(node, 0) + n
    return {**total, "subscriptions": subscriptions}


def _counts(out: Path) -> dict[str, int]:
    return {k: v for k, v in _progress(out).items() if isinstance(v, int)}


def _wait_ready(s: Scenario, procs: Procs, out: Path) -> int:
    deadline = time.monotonic() + s.max_ready_s
    ready = 0
    while time.monotonic() < deadline:
        ready = _progress(out)["ready"]
        if ready >= s.all_subscribers:
            break
        for name, proc in (("locust", procs.locust), ("websocket", procs.websocket)):
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}): see {out}/{name}.log")
        time.sleep(0.2)
    print(f"subscribers ready: {ready}/{s.all_subscribers}", flush=True)
    return ready


def _wait_pool(s: Scenario, env: dict[str, str], procs: Procs, timeout: float = 60.0) -> None:
    """Until every shard process is connected (its heartbeat key exists)."""
    client = client_for_url(env["SCALEPUB_REDIS_URL"])
    keys = Keys(KEY_PREFIX)
    deadline = time.monotonic() + timeout
    try:
        while client.exists(*(keys.heartbeat(i) for i in range(s.shards))) < s.shards:
            if procs.pool is not None and procs.pool.poll() is not None:
                raise RuntimeError(f"the pool exited ({procs.pool.returncode}): see pool.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the pool's shards are not all up after {timeout:g} s")
            time.sleep(0.2)
    finally:
        client.close()


# ---------------------------------------------------------------------------- producers


def _prepare_dbs(s: Scenario, env: dict[str, str], dbdir: Path) -> list[Path]:
    """One migrated SQLite file per producer process (no write lock shared between them)."""
    base = dbdir / "base.sqlite3"
    subprocess.run([str(BIN / "python"), "example/manage.py", "migrate", "-v", "0"],
                   env={**env, "EXAMPLE_DB": str(base)}, cwd=REPO, check=True, timeout=120)
    count = (s.producers if s.hot_share < 1 else 0) + (s.hot_producers if s.hot_share else 0)
    dbs = [dbdir / f"producer-{i}.sqlite3" for i in range(count)]
    for db in dbs:
        shutil.copyfile(base, db)
    return dbs


@dataclass(frozen=True)
class Producer:
    """One ``manage.py tweet`` process of the plan."""

    db: Path
    prefix: str
    authors: int
    rate: float
    start_s: float
    count: int


def producer_plan(s: Scenario, dbs: list[Path]) -> list[Producer]:
    """Who saves what: hot-node processes first, then per-author ones; the ramp staggers them."""
    kinds = []
    if s.hot_share:
        kinds += [(HOT_AUTHOR_PREFIX, 1, s.rate * s.hot_share / s.hot_producers)] * s.hot_producers
    if s.hot_share < 1:
        each = s.rate * (1 - s.hot_share) / s.producers
        kinds += [(AUTHOR_PREFIX, s.authors, each)] * s.producers
    plan = []
    for i, (prefix, authors, rate) in enumerate(kinds):
        start = s.ramp_s * i / len(kinds)
        plan.append(Producer(dbs[i], prefix, authors, rate, start,
                             round(rate * (s.duration_s - start))))
    return plan


def _record_pids(procs: Procs, out: Path) -> None:
    """pids.json: every process this variant started (for debugging, and for the test that
    checks nothing outlives an interrupted run)."""
    pids: dict[str, list[int]] = {}
    for group, roots in procs.roots().items():
        if group == "runner":
            continue
        pids[group] = list(roots)
        for root in roots:
            with contextlib.suppress(psutil.Error):
                pids[group] += [c.pid for c in psutil.Process(root).children(recursive=True)]
    (out / "pids.json").write_text(json.dumps(pids))


def _produce(s: Scenario, env: dict[str, str], dbs: list[Path], procs: Procs,
             out: Path, place: Placement) -> tuple[float, float]:
    """Run the producers to completion (bounded); returns the production window (epoch s)."""
    items = []
    plan = sorted(producer_plan(s, dbs), key=lambda p: p.start_s)
    for i, p in enumerate(plan):
        cmd = [str(BIN / "python"), "example/manage.py", "tweet", "--rate", f"{p.rate:.3f}",
               "--authors", str(p.authors), "--count", str(p.count), "--prefix", p.prefix]
        if s.bulk:
            cmd += ["--bulk", str(s.bulk)]
        penv = {"EXAMPLE_DB": str(p.db)}
        if s.delivery:
            penv["SCALEPUB_DELIVERY"] = s.delivery
        items.append({"cmd": cmd, "env": penv, "start_s": p.start_s,
                      "log": str(out / f"producer-{i}.log")})
    plan_file = out / "producer-plan.json"
    plan_file.write_text(json.dumps({"nice": s.producer_nice, "producers": items}, indent=1))
    t0 = time.time()
    print(f"producing {s.rate:g} saves/s for {s.duration_s:g} s", flush=True)
    with affinity(place.app):
        procs.producers.append(_start([str(BIN / "python"), "-m", "loadtest.producers",
                                       str(plan_file)], env, out / "producers.log"))
    _record_pids(procs, out)
    deadline = t0 + s.duration_s * 3 + 30  # producers far behind their rate are cut off
    all_started, recorded = max(p.start_s for p in plan) + 1.0, False
    while procs.producers[0].poll() is None and time.time() < deadline:
        time.sleep(0.1)
        if not recorded and time.time() - t0 > all_started:
            _record_pids(procs, out)  # now with every tweet process
            recorded = True
    _stop_all(procs.producers)
    return t0, time.time()


# ---------------------------------------------------------------------------- drain, truth


def _drain(s: Scenario, env: dict[str, str], procs: Procs, out: Path) -> bool:
    """Wait until every appended entry reached every subscriber of its node (bounded)."""
    client = client_for_url(env["SCALEPUB_REDIS_URL"], decode_responses=True)
    keys = Keys(KEY_PREFIX)
    deadline = time.monotonic() + s.drain_s
    try:
        while time.monotonic() < deadline:
            progress = _progress(out)
            appended: dict[str, str] = {}
            for shard in range(s.shards):
                appended.update(client.hgetall(keys.seqs(shard)))  # type: ignore[arg-type]
            expected = sum(n * int(appended.get(node, 0))
                           for node, n in progress["subscriptions"].items())
            if progress["entries"] - progress["duplicates"] >= expected:
                return _backlog(client, keys, s.shards) == 0
            time.sleep(0.25)
        print(f"drain: not every delivery arrived within {s.drain_s:g} s", flush=True)
        return False
    finally:
        client.close()


def _backlog(client: redis.Redis, keys: Keys, shards: int) -> int:
    total = 0
    for shard in range(shards):
        with contextlib.suppress(redis.ResponseError):
            for group in client.xinfo_groups(keys.stream(shard)):
                total += int(group.get("lag") or 0) + int(group.get("pending") or 0)
    return total


def _truth(dbs: list[Path], env: dict[str, str], shards: int) -> dict[str, Any]:
    """Rows committed per node (the producers' databases) and entries appended per node (Redis)."""
    saved: dict[str, int] = {}
    first, last = float("inf"), 0.0
    outbox_left = 0
    for db in dbs:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            with contextlib.suppress(sqlite3.OperationalError):  # no outbox table: 0 left
                outbox_left += conn.execute("SELECT COUNT(*) FROM scalepub_outbox").fetchone()[0]
            for author, count, oldest, newest in conn.execute(
                    "SELECT author, COUNT(*), MIN(created_at), MAX(created_at) FROM twitter_tweet"
                    " GROUP BY author"):
                node = f"/twitter/Tweet/{author}"
                saved[node] = saved.get(node, 0) + int(count)
                first = min(first, _epoch(oldest))
                last = max(last, _epoch(newest))
    client = client_for_url(env["SCALEPUB_REDIS_URL"], decode_responses=True)
    appended: dict[str, int] = {}
    try:
        for shard in range(shards):
            seqs: dict[str, str] = client.hgetall(Keys(KEY_PREFIX).seqs(shard))  # type: ignore[assignment]
            for node, seq in seqs.items():
                appended[node] = int(seq)
    finally:
        client.close()
    return {"saved": saved, "appended": appended, "outbox_left": outbox_left,
            "first_commit": first if saved else 0.0,
            "last_commit": last, "saving_s": max(last - first, 1e-3) if saved else 0.0}


def _epoch(stamp: str) -> float:
    # Django stores aware datetimes in SQLite as 'YYYY-MM-DD HH:MM:SS.ffffff' in UTC.
    return datetime.fromisoformat(stamp).replace(tzinfo=UTC).timestamp()


if __name__ == "__main__":
    sys.exit(main())
