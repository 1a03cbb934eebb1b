"""Benchmark: entries/s from Redis stream to ejabberd-acknowledged, one run, several modes.

    eval "$(ops/stack env)"; .venv/bin/python loadtest/bench_publish.py [--entries 200000]

Modes, all against the same Redis and ejabberd in the same run:
  (a)  seed-style: new connection + auth + one publish per entry (small sample)
  (b)  one long-lived connection, one entry per IQ, one IQ at a time
  (b+) one connection, one entry per IQ, a window of IQs in flight (pipelining alone)
  (c)  scalepub: `scalepub run` with 1, 2, 4, 8 shards (batching + pipelining)
Streams are pre-filled with ~300-byte entries over many nodes before each run. Two clocks:
from the first acknowledged entry to the last (start-up skew of the shard processes included),
and the steady state, from 10 % to 90 % of the entries acknowledged (the entries/s and CPU
columns). ``start skew`` is how long after the first shard's first acknowledgement the last
shard made its first. CPU shares come from /proc (ejabberd = every beam.smp process); peak RSS
is each shard process's VmHWM. ``--own-stack`` starts a private Redis + ejabberd on free ports
(``tests/stack.py``) with Redis's background saves off (``CONFIG SET save ""``), so no RDB
save lands in the measured window; otherwise the stack of ``ops/stack env`` is used as is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import random
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis
import slixmpp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scalepub.backlog import stream_backlog  # noqa: E402
from scalepub.connections import client_for_url  # noqa: E402
from scalepub.producer import PendingEntry, StreamProducer  # noqa: E402
from scalepub.settings import Settings  # noqa: E402
from scalepub.sharding import Keys  # noqa: E402
from scalepub.xmpp.link import Reply, XmppLink  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
# With --own-stack: that stack's processes only (other stacks on the box are not counted).
SERVER_PIDS: dict[str, list[int]] = {}
WORDS = ["scale", "publish", "live", "stream", "shard", "batch", "node", "entry", "feed"]


@dataclass
class Result:
    """One row of the table."""

    mode: str
    entries: int
    seconds: float
    ejabberd_cpu: float = 0.0  # share of one core
    shards_cpu: float = 0.0
    redis_cpu: float = 0.0
    peak_rss_mb: float = 0.0
    entries_per_iq: float = 0.0
    first_to_last_s: float = 0.0  # first acknowledgement to the last, start-up included
    start_skew_s: float = 0.0  # first shard's first ack to the last shard's first ack

    @property
    def rate(self) -> float:
        return self.entries / self.seconds if self.seconds else 0.0


def payload(pk: int, author: str) -> bytes:
    """A Django-XML-like tweet of about 300 bytes."""
    text = " ".join(random.choices(WORDS, k=12))
    return (f'<django-objects version="1.0"><object model="twitter.tweet" pk="{pk}">'
            f'<field name="author" type="CharField">{author}</field>'
            f'<field name="text" type="CharField">{text}</field>'
            f'<field name="created_at" type="DateTimeField">2026-11-26T07:00:00.000Z</field>'
            f'</object></django-objects>').encode()


def prefill(settings: Settings, entries: int, nodes: int, version: int = 0) -> None:
    """Append ``entries`` entries over ``nodes`` nodes to the shard streams, in envelope
    ``version`` (default: what this producer writes)."""
    producer = StreamProducer(settings)
    producer.envelope_version = version or producer.envelope_version
    chunk = []
    for i in range(entries):
        author = f"bench{i % nodes}"
        chunk.append(PendingEntry(f"/bench/Tweet/{author}", time.time_ns(), "twitter.tweet",
                                  str(i), os.environ.get("BENCH_FMT", "xml"), payload(i, author)))
        if len(chunk) == 2000:
            producer.enqueue(chunk)
            chunk = []
    if chunk:
        producer.enqueue(chunk)
    producer.close()


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except (FileNotFoundError, IndexError):
            pass
    return total


def pids_of(name: str, parent: int | None = None) -> list[int]:
    args = ["pgrep", "-P", str(parent)] if parent else ["pgrep", "-x", name]
    out = subprocess.run(args, capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


async def publish_window(settings: Settings, iq_for: Callable[[str, int], bytes], iqs: int,
                         window: int, name: str) -> tuple[float, float]:
    """Send ``iqs`` IQs ``iq_for(iq_id, n)`` over one XmppLink, ``window`` in flight.

    Returns (wall seconds, ejabberd CPU seconds: every beam.smp on the machine) from the first
    IQ to the last reply; a refused IQ raises.
    """
    pending: set[str] = set()
    done = asyncio.Event()
    sent = 0

    def pump() -> None:
        nonlocal sent
        while len(pending) < window and sent < iqs:
            iq_id = f"{name}{sent}"
            pending.add(iq_id)
            link.send(iq_for(iq_id, sent))
            sent += 1

    def on_reply(reply: Reply) -> None:
        if not reply.ok:
            raise RuntimeError(f"publish refused: {reply.reason}")
        pending.discard(reply.iq_id)
        pump()
        if not pending:
            done.set()

    link = XmppLink(settings, f"{name}{os.getpid()}", pending.__contains__, on_reply,
                    lambda: None)
    await link.connect()
    beams = server_pids("beam.smp")
    before, started = cpu_ticks(beams), time.perf_counter()
    pump()
    await done.wait()
    elapsed = time.perf_counter() - started
    cpu = (cpu_ticks(beams) - before) / CLK_TCK
    await link.close()
    return elapsed, cpu


def server_pids(name: str) -> list[int]:
    """ejabberd's or Redis's processes: the own stack's, else every one on the machine."""
    return SERVER_PIDS.get(name) or pids_of(name)


def own_stack() -> Callable[[], None]:
    """Start a private stack, point SCALEPUB_* at it, turn off RDB saves; returns its stop."""
    from loadtest.run import ejabberd_pids, redis_pids
    from tests.stack import new_stack

    stack = new_stack(SCALEPUB_POSTGRES="off")
    stack.up()
    os.environ.update(stack.env)
    client = client_for_url(stack.env["SCALEPUB_REDIS_URL"])
    client.config_set("save", "")  # no background save inside a measured window
    client.close()
    SERVER_PIDS.update({"beam.smp": ejabberd_pids(stack), "redis-server": redis_pids(stack)})

    def stop() -> None:
        stack.down()
        subprocess.run(["rm", "-rf", str(stack.state_dir)], check=False)
    return stop


def peak_rss_mb(pids: list[int]) -> float:
    peaks = []
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks, default=0.0)


def remaining(client: redis.Redis, keys: Keys, shards: int) -> int:
    """Entries not yet acknowledged (unread or pending) over all shard streams."""
    return sum(sum(stream_backlog(client, keys.stream(shard))) for shard in range(shards))


def run_pool(mode: str, settings: Settings, entries: int, args: list[str],
             pythonpath: str = "") -> Result:
    """Start `scalepub run` (from ``pythonpath`` if given), watch it drain, then stop it."""
    client = client_for_url(settings.redis_url)
    keys = Keys(settings.key_prefix)
    env = {**os.environ, **{f"SCALEPUB_{k.upper()}": str(v)
                            for k, v in dataclasses.asdict(settings).items()}}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    log_path = Path(f"/tmp/scalepub-bench-{settings.key_prefix}.log")
    with log_path.open("w") as log:
        # cwd: the forkserver of a pool runs ``python -c``, whose sys.path starts with the
        # working directory: in the checkout, an older pool's shards would import this one.
        pool = subprocess.Popen([str(Path(sys.executable).parent / "scalepub"), "run",
                                 "--log-level", "INFO", "--metrics-port", "0", *args],
                                env=env, stderr=log, cwd=pythonpath or None)
    try:
        clock = _clock(mode, pool, client, keys, settings.shards, entries)
    finally:
        pool.terminate()
        pool.wait(30)
        client.close()
    print(file=sys.stderr)
    iqs = sum(int(m) for m in re.findall(r" iqs=(\d+)", log_path.read_text()))
    ejabberd, shards, redis_cpu = (c / CLK_TCK / clock.steady_s for c in clock.cpu)
    return Result(mode, clock.steady_entries, clock.steady_s, ejabberd, shards, redis_cpu,
                  clock.rss, entries / iqs if iqs else 0.0, clock.first_to_last_s, clock.skew_s)


@dataclass
class Clock:
    """What one pool run measured."""

    steady_entries: int  # acknowledged between the 10 % and 90 % marks
    steady_s: float
    cpu: tuple[int, int, int]  # ticks in the steady window: ejabberd, shards, Redis
    rss: float
    first_to_last_s: float
    skew_s: float


def _clock(mode: str, pool: subprocess.Popen[bytes], client: redis.Redis, keys: Keys,
           shards: int, entries: int) -> Clock:
    """Watch the pool drain ``entries``: the steady window, start-up skew, CPU, peak RSS."""
    while remaining(client, keys, shards) >= entries:
        time.sleep(0.005)
        if pool.poll() is not None:
            raise RuntimeError(f"{mode}: pool exited with {pool.returncode}")
    started = time.monotonic()
    servers = (server_pids("beam.smp"), server_pids("redis-server"))
    groups: tuple[list[int], ...] = ()
    full = [sum(stream_backlog(client, keys.stream(s))) for s in range(shards)]
    first_ack: dict[int, float] = {}
    marks: list[tuple[float, int, list[int]]] = []  # (time, done, cpu ticks) at 10 % and 90 %
    profiler = None
    left = entries
    while left:
        time.sleep(0.05)
        per_shard = [sum(stream_backlog(client, keys.stream(s))) for s in range(shards)]
        now, left = time.monotonic(), sum(per_shard)
        first_ack.update({s: now for s in range(shards)
                          if s not in first_ack and per_shard[s] < full[s]})
        done = entries - left
        if len(marks) < 2 and done >= entries * (0.1 if not marks else 0.9):
            if not marks:  # every shard process has started by now (see start skew)
                groups = (shard_pids(pool.pid), *servers)
                profiler = start_profile(mode, pool.pid)
            marks.append((now, done, [cpu_ticks(g) for g in groups]))
            if len(marks) == 2:
                stop_profile(profiler)
        progress(mode, done, entries, now - started)
    (t0, d0, c0), (t1, d1, c1) = marks
    sh, ej, rd = (b - a for a, b in zip(c0, c1, strict=True))
    skew = max(first_ack.values()) - min(first_ack.values()) if first_ack else 0.0
    return Clock(d1 - d0, t1 - t0, (ej, sh, rd), peak_rss_mb(groups[0]),
                 time.monotonic() - started, skew)


PROFILE_DIR = ""  # --profile: py-spy samples of the pools' steady windows go there


def start_profile(mode: str, pid: int) -> subprocess.Popen[bytes] | None:
    """py-spy sampling every process of the pool (100 Hz, not pausing them), if asked for."""
    if not PROFILE_DIR:
        return None
    out = Path(PROFILE_DIR) / (re.sub(r"[^\w]+", "_", mode).strip("_") + ".txt")
    return subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                             str(pid), "--subprocesses", "--nonblocking", "-r", "100", "-f",
                             "raw", "-o", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def stop_profile(profiler: subprocess.Popen[bytes] | None) -> None:
    """Stop sampling (py-spy writes its file on SIGINT)."""
    if profiler is not None:
        profiler.send_signal(2)
        profiler.wait(60)


def shard_pids(parent: int) -> list[int]:
    """The shard processes of a pool, spawned or forked by a forkserver (not the resource
    tracker, not the forkserver itself)."""
    import psutil

    out = []
    for child in psutil.Process(parent).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(child.cmdline())
            if "spawn_main" in cmdline or ("forkserver" in cmdline and child.ppid() != parent):
                out.append(child.pid)
    return out


def progress(mode: str, done: int, total: int, elapsed: float) -> None:
    rate = done / elapsed if elapsed else 0.0
    eta = (total - done) / rate if rate else float("inf")
    print(f"\r  {mode}: {done}/{total} entries, {rate:,.0f}/s, ETA {eta:.1f} s   ",
          end="", file=sys.stderr, flush=True)


async def seed_style(settings: Settings, count: int) -> Result:
    """django-pubsub's way: connect, authenticate, publish one item, disconnect."""
    started = time.monotonic()
    for i in range(count):
        client = slixmpp.ClientXMPP(settings.xmpp_jid + "/seed", settings.xmpp_password)
        client.enable_starttls = client.enable_direct_tls = False
        client.enable_plaintext = True
        client.plugin["feature_mechanisms"].unencrypted_plain = True
        client.register_plugin("xep_0060")
        ready = asyncio.get_running_loop().create_future()
        client.add_event_handler("session_start", lambda _e, f=ready: f.set_result(None))
        client.connect(settings.xmpp_host, settings.xmpp_port)
        await asyncio.wait_for(ready, 10)
        item = slixmpp.xmlstream.ET.fromstring(
            f'<entry xmlns="urn:scalepub:1">{payload(i, "seed").decode()}</entry>')
        await client.plugin["xep_0060"].publish(  # type: ignore[no-untyped-call]
            settings.pubsub_service, "/bench/Tweet/seed", payload=item)  # slixmpp: untyped
        await client.disconnect()
    return Result("(a) seed-style: connect+auth+publish per entry", count,
                  time.monotonic() - started, entries_per_iq=1.0)


def fresh(settings: Settings, shards: int) -> Settings:
    return settings.replace(key_prefix=f"bench{uuid.uuid4().hex[:8]}", shards=shards)


def cleanup(settings: Settings) -> None:
    client = client_for_url(settings.redis_url)
    for key in client.scan_iter(match=f"{settings.key_prefix}:*", count=1000):
        client.delete(key)
    client.close()


def measure(base: Settings, mode: str, shards: int, entries: int, nodes: int,
            args: list[str], pythonpath: str = "") -> Result:
    # MAXLEN must not trim the pre-filled backlog, or the count would be wrong.
    settings = fresh(base, shards).replace(stream_maxlen=entries + 100_000)
    print(f"{mode}: pre-filling {entries} entries over {nodes} nodes", file=sys.stderr)
    # An older pool (``pythonpath``) gets version 1 envelopes: every pool reads those.
    prefill(settings, entries, nodes, 1 if pythonpath else 0)
    client = client_for_url(settings.redis_url)
    stored = sum(client.xlen(Keys(settings.key_prefix).stream(s)) for s in range(shards))
    client.close()
    if stored != entries:
        raise RuntimeError(f"pre-filled {stored} entries, expected {entries}")
    try:
        return run_pool(mode, settings, entries, ["--shards", str(shards), *args], pythonpath)
    finally:
        cleanup(settings)


def table(results: list[Result]) -> str:
    a, b = results[0].rate, results[1].rate
    lines = [
        "| mode | entries (steady) | s | entries/s | x (a) | x (b) | entries/IQ | CPU ejabberd "
        "| CPU shards | CPU Redis | CPU us/entry (ej+sh+redis) | peak RSS/shard "
        "| first→last ack s | start skew s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        per_entry = [c / r.rate * 1e6 if r.rate else 0.0
                     for c in (r.ejabberd_cpu, r.shards_cpu, r.redis_cpu)]
        lines.append(
            f"| {r.mode} | {r.entries:,} | {r.seconds:.2f} | {r.rate:,.0f} | {r.rate / a:,.0f}x "
            f"| {r.rate / b:,.1f}x | {r.entries_per_iq:.0f} | {r.ejabberd_cpu:.0%} "
            f"| {r.shards_cpu:.0%} | {r.redis_cpu:.0%} "
            f"| {'+'.join(f'{x:.1f}' for x in per_entry)} | {r.peak_rss_mb:.0f} MB "
            f"| {r.first_to_last_s:.2f} | {r.start_skew_s:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=300_000, help="entries per (c) run")
    parser.add_argument("--nodes", type=int, default=200,
                        help="distinct nodes (batches can only be as big as a node's backlog)")
    parser.add_argument("--seed-sample", type=int, default=30, help="entries for (a)")
    parser.add_argument("--single", type=int, default=3000, help="entries for (b) and (b+)")
    parser.add_argument("--shards", default="1,2,4,8", help="shard counts for (c)")
    parser.add_argument("--batch-sizes", default="",
                        help="also (d): 8 shards with these BATCH_MAX_ENTRIES (the CPU curve)")
    parser.add_argument("--pool-args", default="", help="more `scalepub run` options for (c)")
    parser.add_argument("--baseline-rev", default="",
                        help="before each (c), the same drain by the pool of this git revision")
    parser.add_argument("--own-stack", action="store_true",
                        help="a private Redis + ejabberd on free ports, RDB saves off")
    parser.add_argument("--profile", default="", metavar="DIR",
                        help="py-spy samples of each pool's steady window into DIR "
                             "(loadtest/profile_summary.py reads them)")
    opts = parser.parse_args()
    global PROFILE_DIR
    PROFILE_DIR = opts.profile
    if PROFILE_DIR:
        if not (Path(sys.executable).parent / "py-spy").exists():
            sys.exit("--profile needs py-spy in the venv: .venv/bin/pip install -e '.[profile]'")
        Path(PROFILE_DIR).mkdir(parents=True, exist_ok=True)
    stop = own_stack() if opts.own_stack else None
    try:
        run_all(opts)
    finally:
        if stop:
            stop()


def baseline_tree(rev: str) -> str:
    """The ``scalepub`` package of ``rev`` in a temporary directory (git archive; the
    checkout is left alone), for PYTHONPATH."""
    from loadtest.revisions import package_tree

    return str(package_tree(rev))


def run_all(opts: argparse.Namespace) -> None:
    """Every mode, then the table."""
    base = Settings.from_env()
    results = [asyncio.run(seed_style(base, opts.seed_sample))]
    results.append(measure(base, "(b) 1 connection, 1 entry/IQ, 1 IQ at a time", 1,
                           opts.single, opts.nodes,
                           ["--batch-max-entries", "1", "--window", "1", "--linger-ms", "0"]))
    results.append(measure(base, "(b+) 1 connection, 1 entry/IQ, window 32", 1,
                           opts.single * 3, opts.nodes,
                           ["--batch-max-entries", "1", "--window", "32", "--linger-ms", "0"]))
    for shards in (int(s) for s in opts.shards.split(",")):
        if opts.baseline_rev:  # the same drain by an older pool, just before: a before/after
            results.append(measure(base, f"(c) pool of {opts.baseline_rev}, {shards} shard(s)",
                                   shards, opts.entries, opts.nodes, [],
                                   baseline_tree(opts.baseline_rev)))
        results.append(measure(base, f"(c) scalepub, {shards} shard(s)", shards, opts.entries,
                               opts.nodes, opts.pool_args.split()))
    for size in (int(b) for b in opts.batch_sizes.split(",") if b):
        results.append(measure(base, f"(d) 8 shards, batch ≤ {size}", 8, opts.entries,
                               opts.nodes, ["--batch-max-entries", str(size)]))
    print(table(results))


if __name__ == "__main__":
    main()
