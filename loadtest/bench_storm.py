"""Benchmark: a reconnect storm of anonymous BOSH clients with catch-up, publisher at a steady rate.

    .venv/bin/python loadtest/bench_storm.py [--clients 500] [--rate 200] [--phase-s 20]
        [--leave] [--arrival js] [--rounds 1] [--pin auto]   # e.g. --arrival none,burst,js

Issue 13 part 5: "500 anonymous BOSH clients reconnecting at once with catch-up while the
publisher runs at a steady rate; publish throughput and latency stay within 20% of the quiet
figure". On loopback only, one run, everything it starts is stopped at the end:

- a private Redis + ejabberd on free ports (``tests/stack.py``), ``--nodes`` nodes created;
- ``scalepub run`` (``--shards``), and the example project's history view served by a threaded
  WSGI server in its own process (``--serve``; DEBUG off, no rate limit configured);
- in this process: a producer thread appending one entry at a time at ``--rate`` entries/s
  (round robin over the nodes, ``StreamProducer`` as a save does), and an independent anonymous
  BOSH subscriber following every node, which times commit (the entry's ``ts``) -> delivery;
- per round, phases of ``--phase-s`` each: quiet, storm (a ``--storm`` process starts
  ``--clients`` threads behind a barrier, the moment the server dropped them; each waits its
  ``--arrival`` delay, opens an anonymous BOSH session, subscribes to one node, asks
  ``/scalepub/history`` for what followed a seq 100 entries back, checks the answer, then
  keeps long-polling until the round ends), after (the storm's clients still connected and
  receiving, unless ``--leave``). Rounds take the ``--arrival`` policies in turn (A/B
  interleaved in one run, ``--rounds`` times each), each against its own quiet phase.

Arrival policies: ``burst`` (all at once), ``js`` (the JS client's first reconnect,
client/js/src/client.js), ``uniform:LO:HI`` (ms after the drop), ``full:MS`` (0..MS), ``none``
(no storm at all: the control round, whose storm/quiet ratios are the box's own noise).

CPU placement (``--pin``, loadtest/pinning.py): the system under test (ejabberd, Redis, the
pool) on some CPUs, this process (producer + probe), the storm clients and the web process on
the others; the generator's own CPU use is judged (loadtest/headroom.py): the round's latency
is NOT VALID when the generator was the bottleneck. Per phase: entries/s confirmed by ejabberd
(appended minus the shard streams' lag + pending, ``scalepub.backlog``), the probe's latency
p50/p99, CPU per process group (mean, and the busiest 0.5 s), and in the storm phase the
probe's late deliveries (over 1.2x the quiet p99) per second after the drop.
Exits 1 if a storm client failed or did not get the right entries; 0 otherwise, goal met or not.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loadtest.bosh import BoshClient, BoshError, HTTPTransport, TransportError  # noqa: E402
from loadtest.entries import entries_of_batch, scan_body  # noqa: E402
from loadtest.pinning import PinningError, Placement, affinity, pin_tree  # noqa: E402

PREFIX = "storm"
MODEL = "twitter.tweet"
CATCH_UP = 100  # entries each storm client missed while it was away
GOAL = 1.2  # storm/quiet bound of the issue
SAMPLE_S = 0.5  # CPU timeline resolution
# The JS client's first reconnect after a drop (client.js _scheduleReconnect), in ms; before
# 2026-12-03 it was 50-100 % of 500 ms (--arrival uniform:250:500).
JS_FIRST_RECONNECT_MS: tuple[float, float] = (0, 2000)
PAYLOAD = ('<django-objects version="1.0"><object model="twitter.tweet" pk="{pk}"><field '
           'name="text" type="TextField">a benchmark tweet of a realistic size, some words, '
           'a link https://example.com/x/y</field></object></django-objects>')


def log(message: str) -> None:
    print(message, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=500, help="storm clients")
    p.add_argument("--rate", type=float, default=200.0, help="entries/s appended")
    p.add_argument("--phase-s", type=float, default=20.0, help="seconds per phase")
    p.add_argument("--nodes", type=int, default=20, help="nodes the entries go to")
    p.add_argument("--shards", type=int, default=2, help="shards of the pool")
    p.add_argument("--leave", action="store_true",
                   help="storm clients close their session once caught up (default: they stay "
                        "and long-poll until the end, as reconnected browsers do)")
    p.add_argument("--arrival", default="js",  # as browsers running client/js come back
                   help="comma-separated arrival policies, one round each in turn: burst, js, "
                        "full:MS (uniform 0..MS after the drop), uniform:LO:HI (ms), none (no "
                        "clients: a control round, its storm/quiet ratios are the box's noise)")
    p.add_argument("--rounds", type=int, default=1, help="times each arrival policy is run")
    p.add_argument("--pin", default="auto",
                   help="CPU placement (loadtest/pinning.py): auto, off, or e.g. "
                        "'sut=0 generator=1 app=1'")
    p.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--storm", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("clients", "nodes", "shards", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rate <= 0 or args.phase_s <= 0:
        p.error("--rate and --phase-s must be positive")
    try:
        args.arrivals = [arrival_window(a) for a in args.arrival.split(",")]
        args.placement = Placement.parse(args.pin)
    except (ValueError, PinningError) as exc:
        p.error(str(exc))
    return args


def arrival_window(spec: str) -> tuple[str, float, float]:
    """``burst``, ``js``, ``full:MS`` or ``uniform:LO:HI`` -> (name, lo_s, hi_s)."""
    parts = spec.strip().split(":")
    try:
        if parts in (["burst"], ["none"]):
            return parts[0], 0.0, 0.0
        if parts == ["js"]:
            lo, hi = JS_FIRST_RECONNECT_MS
        elif parts[0] == "full" and len(parts) == 2:
            lo, hi = 0.0, float(parts[1])
        elif parts[0] == "uniform" and len(parts) == 3:
            lo, hi = float(parts[1]), float(parts[2])
        else:
            raise ValueError(spec)
    except ValueError:
        raise ValueError(f"--arrival: {spec!r} is not burst, js, full:MS, uniform:LO:HI "
                         "or none") from None
    if not 0 <= lo <= hi:
        raise ValueError(f"--arrival: {spec!r} needs 0 <= LO <= HI")
    return spec.strip(), lo / 1000, hi / 1000


# -- the web process: the example project's history view, threaded ---------------------------


def serve(port: int) -> None:
    """Serve the example project on 127.0.0.1:``port`` until killed (one thread a request)."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from django.core.wsgi import get_wsgi_application

    from loadtest.example_project import use_example_project

    use_example_project()  # its database and SCALEPUB_* come from the parent's environment

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        request_queue_size = 1024  # the storm's connections arrive at once

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    make_server("127.0.0.1", port, get_wsgi_application(), Server, Quiet).serve_forever()


# -- the storm process: clients reconnect at once, catch up, keep polling --------------------


def storm(config_path: str) -> None:
    """Run the storm described by the JSON file; write per-client results next to it."""
    config = json.loads(Path(config_path).read_text())
    threading.stack_size(512 * 1024)
    barrier = threading.Barrier(max(1, len(config["clients"])))
    stop = threading.Event()
    results: list[dict[str, Any]] = []
    threads = [threading.Thread(target=_storm_client, args=(config, c, barrier, stop, results))
               for c in config["clients"]]
    for t in threads:
        t.start()
    time.sleep(config["stay_s"])
    stop.set()
    for t in threads:
        t.join(config["wait_s"] + 10)
    Path(config_path + ".out").write_text(json.dumps(results))


def _storm_client(config: dict[str, Any], client: dict[str, Any], barrier: threading.Barrier,
                  stop: threading.Event, results: list[dict[str, Any]]) -> None:
    out: dict[str, Any] = {"node": client["node"]}
    barrier.wait()
    started = time.monotonic()  # the server dropped every client now
    time.sleep(random.uniform(config["arrival_lo_s"], config["arrival_hi_s"]))
    attempt = time.monotonic()
    transport = HTTPTransport(config["bosh_url"])
    step = "BOSH session + subscribe"
    try:
        bosh = BoshClient(transport, config["anon_domain"], wait=config["wait_s"])
        bosh.connect()
        bosh.subscribe(config["service"], [client["node"]])
        out["connect_s"] = time.monotonic() - attempt
        step = "history request"
        out["history"] = _catch_up(config["web_port"], client["node"], client["after"])
        out["done_s"] = time.monotonic() - started
        step = "long poll"
        while config["stay"] and not stop.is_set():
            bosh.poll_raw()
        bosh.close()
    except (BoshError, TransportError, OSError) as exc:
        out["error"] = f"{step}: {type(exc).__name__}: {exc}"
    finally:
        transport.close()
        results.append(out)


def _catch_up(port: int, node: str, after: int) -> dict[str, Any]:
    """One history request; its status, seqs returned and whether they follow ``after``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", "/scalepub/history?" + urlencode({"node": node, "after": after}))
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200:
        return {"status": response.status, "ok": False}
    seqs = [e["seq"] for e in json.loads(body)["entries"]]
    ok = bool(seqs) and seqs == list(range(after + 1, after + 1 + len(seqs)))
    return {"status": 200, "ok": ok, "entries": len(seqs)}


# -- this process: producer and subscriber ---------------------------------------------------


@dataclass
class Probe:
    """What the producer appended and what the independent subscriber received."""

    appended: int = 0
    per_node: dict[str, int] = field(default_factory=dict)
    deliveries: list[tuple[float, float]] = field(default_factory=list)  # (monotonic, ms)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)


def append_paced(settings: Any, nodes: list[str], rate: float, stop: threading.Event,
                 appended: Callable[[str], None], version: int = 0) -> None:
    """One entry per append call at ``rate``/s, round robin over ``nodes`` (catching up late),
    ``appended(node)`` after each; until ``stop``. Also bench_latency's producer. ``version``:
    the envelope version written (default: this producer's)."""
    from scalepub.producer import PendingEntry, StreamProducer

    producer = StreamProducer(settings)
    producer.envelope_version = version or producer.envelope_version
    started, i = time.monotonic(), 0
    try:
        while not stop.is_set():
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            node = nodes[i % len(nodes)]
            entry = PendingEntry(node, time.time_ns(), MODEL, str(i), "xml",
                                 PAYLOAD.format(pk=i).encode())
            result = producer.append([entry])
            if result.failures:
                raise SystemExit(f"append refused: {result.failures[0].message}")
            appended(node)
            i += 1
    finally:
        producer.close()


def produce(settings: Any, nodes: list[str], rate: float, probe: Probe) -> None:
    """``append_paced`` counting per node."""
    def count(node: str) -> None:
        with probe.lock:
            probe.appended += 1
            probe.per_node[node] = probe.per_node.get(node, 0) + 1

    append_paced(settings, nodes, rate, probe.stop, count)


def subscribe(env: dict[str, str], nodes: list[str], probe: Probe,
              ready: threading.Event) -> None:
    """An anonymous BOSH subscriber of every node; records each entry's commit -> delivery."""
    transport = HTTPTransport(env["SCALEPUB_BOSH_URL"])
    bosh = BoshClient(transport, env["SCALEPUB_ANON_DOMAIN"], wait=5)
    bosh.connect(resource="probe")
    bosh.subscribe(env["SCALEPUB_PUBSUB_SERVICE"], nodes)
    ready.set()
    try:
        while not probe.stop.is_set():
            raw = bosh.poll_raw()
            now_ns, now = time.time_ns(), time.monotonic()
            found = scan_body(raw)
            if found is None:
                found = [e for s in bosh.parse(raw) for b in s.iter() for e in entries_of_batch(b)]
            with probe.lock:
                probe.deliveries.extend((now, (now_ns - int(ts)) / 1e6) for _n, _s, ts in found)
    finally:
        with contextlib.suppress(BoshError, TransportError, OSError):
            bosh.close()
        transport.close()


# -- measuring -------------------------------------------------------------------------------


def confirmed(client: Any, shards: int, probe: Probe) -> int:
    """Entries appended so far minus those the pool has not had acknowledged yet."""
    from scalepub.backlog import stream_backlog
    from scalepub.sharding import Keys

    keys = Keys(PREFIX)
    with probe.lock:
        appended = probe.appended
    return appended - sum(sum(stream_backlog(client, keys.stream(s))) for s in range(shards))


def cpu_seconds(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds (user + system) so far of each group's processes and their children."""
    import psutil

    out: dict[str, float] = {}
    for name, pids in groups.items():
        total = 0.0
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                # This process's children are the other groups: count it alone.
                kids = [] if pid == os.getpid() else proc.children(recursive=True)
                for p in [proc, *kids]:
                    with contextlib.suppress(psutil.Error):
                        t = p.cpu_times()
                        total += t.user + t.system
        out[name] = total
    t = psutil.cpu_times()
    # Every process of the machine (other test suites too), to show what else took the cores;
    # guest time is already in user, steal is the hypervisor's.
    out["machine"] = t.user + t.nice + t.system + t.irq + t.softirq
    return out


def listen_overflows() -> dict[str, int]:
    """The kernel's counters of connections a full accept queue refused (all listeners)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            table = dict(zip(head.split()[1:], values.split()[1:], strict=True))
            return {k: int(table.get(k, 0)) for k in ("ListenOverflows", "ListenDrops")}
    return {}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@dataclass
class Mark:
    """The state at a phase boundary."""

    at: float
    confirmed: int
    cpu: dict[str, float]
    wait: dict[str, float] = field(default_factory=dict)


def mark(client: Any, shards: int, probe: Probe, groups: dict[str, list[int]]) -> Mark:
    return Mark(time.monotonic(), confirmed(client, shards, probe), cpu_seconds(groups),
                wait_seconds(groups))


def wait_seconds(groups: dict[str, list[int]]) -> dict[str, float]:
    """Seconds each group's threads spent runnable but waiting for a CPU (schedstat): a
    process that is slow while its CPU figure is low was starved, not busy."""
    import psutil

    out: dict[str, float] = {}
    for name, pids in groups.items():
        procs = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                kids = [] if pid == os.getpid() else root.children(recursive=True)
                procs += [root.pid, *(k.pid for k in kids)]
        total = 0
        for pid in procs:
            for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    total += int(stat.read_text().split()[1])
        out[name] = total / 1e9
    return out


def phase(name: str, start: Mark, end: Mark, probe: Probe) -> dict[str, Any]:
    """Figures of one phase: confirmed entries/s, latency of entries delivered in it, CPU."""
    with probe.lock:
        ms = [lat for at, lat in probe.deliveries if start.at <= at < end.at]
    span = end.at - start.at
    cpu = {k: (end.cpu[k] - start.cpu[k]) / span for k in end.cpu}
    cpu["other processes"] = cpu.pop("machine") - sum(cpu.values())
    # An exited thread takes its counters along (the storm's clients): not below 0.
    wait = {k: max(0.0, end.wait[k] - start.wait.get(k, end.wait[k])) / span for k in end.wait}
    return {"phase": name, "seconds": span, "rate": (end.confirmed - start.confirmed) / span,
            "delivered": len(ms), "p50": pct(ms, 0.5), "p99": pct(ms, 0.99), "cpu": cpu,
            "wait": wait}


# -- orchestration ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(cmd: list[str], env: dict[str, str], log_path: Path,
          cwd: str | Path = REPO) -> subprocess.Popen[bytes]:
    """``cmd`` in its own session, output to ``log_path``. ``cwd``: a pool's forkserver runs
    ``python -c``, whose sys.path starts with the working directory, so a pool of another
    revision must start in its own tree or its shards import the checkout's code."""
    with log_path.open("ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL of the process group after 20 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_until(check: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} not ready after {timeout:g} s")
        time.sleep(0.2)


def wait_web(port: int) -> bool:
    with contextlib.suppress(OSError):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/scalepub/history?node=/x&after=0")
        conn.getresponse().read()
        conn.close()
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    if args.storm:
        storm(args.storm)
        return 0
    with contextlib.ExitStack() as cleanup:
        work = Path(tempfile.mkdtemp(prefix="bench-storm-"))
        cleanup.callback(shutil.rmtree, work, True)
        return run(args, work, cleanup)


def run(args: argparse.Namespace, work: Path, cleanup: contextlib.ExitStack) -> int:
    from loadtest.run import _create_nodes, ejabberd_pids, redis_pids
    from tests.stack import new_stack

    place: Placement = args.placement
    stack = new_stack()
    cleanup.callback(shutil.rmtree, stack.state_dir, True)
    cleanup.callback(stack.down)
    log(f"starting a private Redis + ejabberd; {place.describe()}; web process with the app")
    with affinity(place.sut):  # Redis and ejabberd's node inherit the CPUs
        stack.up()
    env = {**os.environ, **stack.env, "SCALEPUB_SHARDS": str(args.shards),
           "SCALEPUB_KEY_PREFIX": PREFIX, "SCALEPUB_METRICS_PORT": "0", "DJANGO_DEBUG": "0",
           "SCALEPUB_OUTBOX_RELAY": "external", "EXAMPLE_DB": str(work / "example.sqlite3"),
           "PYTHONPATH": str(REPO)}
    nodes = [f"/bench/Tweet/storm{i}" for i in range(args.nodes)]
    _create_nodes(stack.env, nodes)
    web_port = free_port()
    me = [sys.executable, str(Path(__file__).resolve())]
    with affinity(place.sut):
        pool = start([str(Path(sys.executable).parent / "scalepub"), "run", "--shards",
                      str(args.shards), "--metrics-port", "0"], env, work / "pool.log")
    cleanup.callback(stop, pool)
    with affinity(place.app):
        web = start([*me, "--serve", str(web_port)], env, work / "web.log")
    cleanup.callback(stop, web)
    wait_until(lambda: wait_web(web_port), "the web process")
    groups = {"ejabberd": ejabberd_pids(stack), "redis": redis_pids(stack), "pool": [pool.pid],
              "web": [web.pid], "bench (producer+probe)": [os.getpid()], "storm clients": []}
    for pid in groups["ejabberd"] + groups["redis"]:  # ejabberdctl may have started it apart
        pin_tree(pid, place.sut)
    if place.generator:  # this thread's later threads and processes: probe, producer, storms
        os.sched_setaffinity(0, place.generator)
    return measure(args, env, nodes, groups, me, web_port, work, cleanup,
                   lambda: pubsub_states(stack.state_dir, stack.control))


def pubsub_states(state_dir: Path, control: dict[str, str]) -> int:
    """Rows of ejabberd's pubsub_state table (a subscription or an affiliation each), -1 if
    unknown: ejabberd 23.01 keeps a full-JID subscription after its session ends."""
    etc = state_dir / "ejabberd" / "etc"
    done = subprocess.run(
        ["timeout", "30", "ejabberdctl", "--ctl-config", str(etc / "ejabberdctl.cfg"),
         "--config-dir", str(etc), "--config", str(etc / "ejabberd.yml"), "--spool",
         str(state_dir / "ejabberd" / "spool"), "--logs", str(state_dir / "ejabberd" / "log"),
         "--node", control["SCALEPUB_EJABBERD_NODE"], "mnesia_table_info", "pubsub_state"],
        env={**os.environ, "SCALEPUB_STACK_EPMD": "1"}, capture_output=True, text=True,
        check=False)
    for line in done.stdout.splitlines():
        if line.strip().startswith("{size,"):
            return int(line.strip()[len("{size,"):].rstrip("},"))
    return -1


def measure(args: argparse.Namespace, env: dict[str, str], nodes: list[str],
            groups: dict[str, list[int]], me: list[str], web_port: int, work: Path,
            cleanup: contextlib.ExitStack, states: Callable[[], int]) -> int:
    from scalepub.connections import sync_client
    from scalepub.settings import Settings

    settings = Settings.from_env(env)
    client = sync_client(settings)
    probe = Probe()
    ready = threading.Event()
    threads = [threading.Thread(target=subscribe, args=(env, nodes, probe, ready), daemon=True),
               threading.Thread(target=produce, args=(settings, nodes, args.rate, probe),
                                daemon=True)]
    threads[0].start()
    ready.wait(30)
    threads[1].start()
    cleanup.callback(probe.stop.set)
    timeline = Timeline(groups)
    timeline.start()
    cleanup.callback(timeline.stop.set)
    warm_s = max(10.0, args.phase_s / 2)
    log(f"warming up {warm_s:g} s at {args.rate:g} entries/s over {len(nodes)} nodes")
    time.sleep(warm_s)
    ctx = Round(args, env, nodes, groups, me, web_port, work, client, probe, timeline, states)
    rounds = []
    for n, arrival in enumerate(args.arrivals * args.rounds):
        rounds.append(ctx.run(n, arrival, cleanup))
    probe.stop.set()
    return report(args, rounds)


# -- one round: quiet, storm, after -------------------------------------------------------------


class Timeline(threading.Thread):
    """CPU seconds of each group every ``SAMPLE_S``: the busiest moment of a phase, per group."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        super().__init__(name="cpu-timeline", daemon=True)
        self.groups = groups
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_S):
            self.samples.append((time.monotonic(), cpu_seconds(self.groups)))

    def peaks(self, start: float, end: float) -> dict[str, float]:
        """Per group, the most cores it used in one sample interval inside [start, end)."""
        inside = [x for x in self.samples if start <= x[0] < end]
        out: dict[str, float] = {}
        for (t0, c0), (t1, c1) in itertools.pairwise(inside):
            used = {k: (c1[k] - c0.get(k, c1[k])) / (t1 - t0) for k in c1}
            used["other processes"] = used.pop("machine") - sum(used.values())
            for k, v in used.items():
                out[k] = max(out.get(k, 0.0), v)
        return out


@dataclass
class Round:
    """What every round shares; ``run`` measures one."""

    args: argparse.Namespace
    env: dict[str, str]
    nodes: list[str]
    groups: dict[str, list[int]]
    me: list[str]
    web_port: int
    work: Path
    client: Any
    probe: Probe
    timeline: Timeline
    states: Callable[[], int]

    def mark(self) -> Mark:
        return mark(self.client, self.args.shards, self.probe, self.groups)

    def run(self, n: int, arrival: tuple[str, float, float],
            cleanup: contextlib.ExitStack) -> dict[str, Any]:
        """Quiet, storm, after; then the storm's clients close and the box settles."""
        phase_s, load, states = self.args.phase_s, os.getloadavg()[0], self.states()
        marks = [self.mark()]
        time.sleep(phase_s)
        marks.append(self.mark())
        config = storm_config(self.args, self.env, self.nodes, self.probe, self.web_port,
                              self.work / f"storm{n}.json", arrival)
        overflows = listen_overflows()
        stormer = start([*self.me, "--storm", str(config)], self.env, self.work / "storm.log")
        cleanup.callback(stop, stormer)
        self.groups["storm clients"] = [stormer.pid]
        log(f"round {n + 1}, arrival {arrival[0]}: " + (
            "no clients (control)" if arrival[0] == "none" else
            f"{self.args.clients} anonymous BOSH clients dropped at once, each reconnecting "
            "and catching up"))
        gen_before = generator_usage(self.groups)
        time.sleep(phase_s)
        marks.append(self.mark())
        verdict = generator_verdict(gen_before, generator_usage(self.groups), marks[2].at -
                                    marks[1].at, self.args.placement)
        time.sleep(phase_s)
        marks.append(self.mark())
        stormer.wait(phase_s * 3 + 60)
        after = listen_overflows()
        phases = [phase(name, a, b, self.probe) for name, a, b in
                  zip(("quiet", "storm", "after"), marks, marks[1:], strict=False)]
        for p, a, b in zip(phases, marks, marks[1:], strict=False):
            p["peak"] = self.timeline.peaks(a.at, b.at)
        time.sleep(phase_s / 4)  # the clients' sessions end; the next quiet phase starts clean
        return {"arrival": arrival[0], "load": load, "states": states, "phases": phases,
                "generator": verdict,
                "late": late_by_second(self.probe, marks[1].at, GOAL * phases[0]["p99"]),
                "overflows": {k: after[k] - overflows.get(k, 0) for k in after},
                "clients": json.loads(Path(str(config) + ".out").read_text())}


def generator_usage(groups: dict[str, list[int]]) -> dict[str, dict[int, Any]]:
    """The load generator's CPU and run-queue wait so far: storm clients and this process."""
    import psutil

    from loadtest.headroom import Usage, snapshot

    out = snapshot({"storm clients": groups["storm clients"]})
    times = psutil.Process().cpu_times()  # this process alone (its children are the others)
    out["bench (producer+probe)"] = {os.getpid(): Usage(times.user + times.system, 0.0)}
    return out


def generator_verdict(before: dict[str, dict[int, Any]], after: dict[str, dict[int, Any]],
                      wall_s: float, place: Placement) -> dict[str, Any]:
    """headroom.judge over the storm phase: was the generator the bottleneck?"""
    from loadtest.headroom import judge

    cpus = len(place.generator) or os.cpu_count() or 1
    return judge(before, after, wall_s, 1.0, {}, total_capacity=float(cpus))


def late_by_second(probe: Probe, start: float, bound_ms: float, seconds: int = 10) -> list[int]:
    """The probe's deliveries over ``bound_ms`` in each of the first seconds after ``start``."""
    counts = [0] * seconds
    with probe.lock:
        for at, ms in probe.deliveries:
            k = int(at - start)
            if 0 <= k < seconds and ms > bound_ms:
                counts[k] += 1
    return counts


def storm_config(args: argparse.Namespace, env: dict[str, str], nodes: list[str], probe: Probe,
                 web_port: int, path: Path, arrival: tuple[str, float, float]) -> Path:
    """The storm's clients: node i % nodes, each catching up from CATCH_UP entries back."""
    with probe.lock:
        seqs = dict(probe.per_node)
    wanted = 0 if arrival[0] == "none" else args.clients  # none: the control, nothing happens
    clients = [{"node": n, "after": max(0, seqs.get(n, 0) - CATCH_UP)}
               for n in (nodes[i % len(nodes)] for i in range(wanted))]
    path.write_text(json.dumps({
        "bosh_url": env["SCALEPUB_BOSH_URL"], "anon_domain": env["SCALEPUB_ANON_DOMAIN"],
        "service": env["SCALEPUB_PUBSUB_SERVICE"], "web_port": web_port, "wait_s": 5,
        "stay_s": args.phase_s * 2, "stay": not args.leave, "clients": clients,
        "arrival_lo_s": arrival[1], "arrival_hi_s": arrival[2]}))
    return path


# -- report ------------------------------------------------------------------------------------


def report(args: argparse.Namespace, rounds: list[dict[str, Any]]) -> int:
    log(f"\n{args.rate:g} entries/s offered, {args.nodes} nodes, {args.shards} shards, "
        f"{args.clients} storm clients ({'leave' if args.leave else 'stay'} after catch-up), "
        f"phases of {args.phase_s:g} s, {os.cpu_count()} CPUs; "
        f"{args.placement.describe()}")
    failed = 0
    for n, r in enumerate(rounds):
        log(f"\n### round {n + 1}: arrival {r['arrival']} (load average {r['load']:.1f})")
        report_phases(r["phases"])
        g = r["generator"]
        log(f"generator in the storm phase: {g['max_cpu_share']:.0%} of its CPU, busy "
            f"{g['max_busy_share']:.0%}: "
            + ("valid" if g["valid"] else f"NOT VALID ({g['why_not_valid']})"))
        log(f"probe deliveries over {GOAL:g}x the quiet p99, per second after the drop: "
            f"{r['late']}")
        log("kernel accept-queue overflows (whole machine): "
            + ", ".join(f"{k} {v}" for k, v in r["overflows"].items()))
        failed += report_clients(r["clients"], 0 if r["arrival"] == "none" else args.clients)
    report_summary(rounds)
    return 1 if failed else 0


def report_phases(phases: list[dict[str, Any]]) -> None:
    names = list(phases[-1]["cpu"])
    log("CPU in cores: mean (busiest 0.5 s) / mean threads waiting for a CPU")
    log("| phase | confirmed entries/s | delivered | p50 ms | p99 ms | "
        + " | ".join(f"{n}" for n in names) + " |")
    log("|---|---:|---:|---:|---:|" + "---:|" * len(names))
    for p in phases:
        log(f"| {p['phase']} | {p['rate']:.1f} | {p['delivered']} | {p['p50']:.1f} | "
            f"{p['p99']:.1f} | " + " | ".join(_cpu_cell(p, n) for n in names) + " |")
    quiet = phases[0]
    for p in phases[1:]:
        log(f"{p['phase']}/quiet: throughput {p['rate'] / quiet['rate']:.2f}, "
            f"p50 {p['p50'] / quiet['p50']:.2f}, p99 {p['p99'] / quiet['p99']:.2f}")


def _cpu_cell(p: dict[str, Any], name: str) -> str:
    cell = f"{p['cpu'].get(name, 0.0):.2f} ({p['peak'].get(name, 0.0):.2f})"
    return cell + (f" / {p['wait'][name]:.2f}" if name in p["wait"] else "")


def report_summary(rounds: list[dict[str, Any]]) -> None:
    log("\n| round | arrival | load | throughput storm/quiet | p50 storm/quiet | "
        "p99 storm/quiet | p99 after/quiet | generator | session+subscribe p99 | caught up | "
        "storm: ejabberd CPU / waiting, other processes | pubsub_state rows at start | "
        "quiet: ejabberd CPU per entry |")
    log("|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---:|")
    for n, r in enumerate(rounds):
        q, s, a = r["phases"]
        connect = [c["connect_s"] * 1000 for c in r["clients"] if "connect_s" in c]
        caught = sum(1 for c in r["clients"] if c.get("history", {}).get("ok"))
        log(f"| {n + 1} | {r['arrival']} | {r['load']:.1f} | {s['rate'] / q['rate']:.2f} | "
            f"{s['p50'] / q['p50']:.2f} ({q['p50']:.1f} -> {s['p50']:.1f} ms) | "
            f"{s['p99'] / q['p99']:.2f} ({q['p99']:.1f} -> {s['p99']:.1f} ms) | "
            f"{a['p99'] / q['p99']:.2f} | {'valid' if r['generator']['valid'] else 'NOT VALID'}"
            f" | {pct(connect, 0.99):.0f} ms | {caught}/{len(r['clients'])} | "
            f"{s['cpu']['ejabberd']:.2f} / {s['wait'].get('ejabberd', 0.0):.2f}, "
            f"{s['cpu']['other processes']:.2f} | {r['states']} | "
            f"{q['cpu']['ejabberd'] / q['rate'] * 1e6:.0f} µs |")


def report_clients(clients: list[dict[str, Any]], wanted: int) -> int:
    """The storm clients' outcome; 1 when one of them failed or got wrong entries."""
    errors = [c["error"] for c in clients if "error" in c]
    caught = [c for c in clients if c.get("history", {}).get("ok")]
    statuses = sorted({c["history"]["status"] for c in clients if "history" in c})
    connect = [c["connect_s"] * 1000 for c in clients if "connect_s" in c]
    done = [c["done_s"] * 1000 for c in clients if "done_s" in c]
    log(f"storm clients: {len(clients)}/{wanted} reported, {len(caught)} caught up with the "
        f"right entries (HTTP statuses {statuses}), {len(errors)} errors"
        + (f" (e.g. {errors[0]})" if errors else ""))
    log(f"  session + subscribe: p50 {pct(connect, 0.5):.0f} ms, p99 {pct(connect, 0.99):.0f} ms;"
        f" caught up (from the drop): p50 {pct(done, 0.5):.0f} ms, p99 "
        f"{pct(done, 0.99):.0f} ms, last {max(done, default=float('nan')):.0f} ms")
    return 0 if len(caught) == wanted else 1


if __name__ == "__main__":
    sys.exit(main())
