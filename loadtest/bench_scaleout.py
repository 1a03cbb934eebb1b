"""Benchmark (issue 14 §5): several supervisors sharing the shards, handovers, lease cost.

    .venv/bin/python loadtest/bench_scaleout.py [--entries 120000] [--tries 10]

Starts its own stack on free ports: Redis and two clustered ejabberd nodes
(``ops/stack up --ejabberd-nodes 2``, tests/stack.py), Redis background saves off.

1. Throughput with 1, 2 and 3 supervisors (``scalepub run --name sN``, 8 shards shared) against
   one ejabberd (all on node 1) and against the 2-node cluster (supervisor i on node i % 2 + 1).
   ``--entries`` ~300-byte entries over 200 nodes are appended first, behind consumer groups
   made at the streams' ends, so the supervisors start, spread the shards and find nothing to
   read; then the groups are moved back to the start of every stream at once: entries/s from
   10 % to 90 % acknowledged, the whole drain time, and the CPU seconds of ejabberd (all
   beam.smp of the stack), the supervisors (with their shard processes) and Redis meanwhile.
2. Handover time with the shipped lease settings (TTL 5 s, renew 1 s): two supervisors on
   node 1 under a light steady load; one is killed -9 (its whole process tree) or sent
   SIGTERM; time until every shard it held has a new owner in Redis (the lease log polls every
   20 ms). ``--tries`` each, p50 and max; the victim is restarted between tries.
3. Redis commands per second spent on leases at 100 shards: 1, 2 and 3 idle supervisors with
   ``--processes 4``; MONITOR for 10 s, each command classed by its keys (lease and fence
   keys, the supervisors' membership, the fenced XREADGROUP script and the blocking XREAD
   that follows an empty one, the rest), against the commands/s Redis served while the
   supervisors drained the backlog in part 1 (the ``redis cmd/s`` column, 10 % to 90 %).

The box has 2 cores shared with other work: more supervisors there add no CPU, they only
split the same shards over more processes; the figures show the cost of sharing (leases,
more sessions) and that nothing breaks, not the scaling one gets from more machines.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loadtest.bench_publish import prefill  # noqa: E402
from scalepub.backlog import stream_backlog  # noqa: E402
from scalepub.producer import PendingEntry, StreamProducer  # noqa: E402
from scalepub.settings import Settings, env_mapping  # noqa: E402
from scalepub.sharding import CONSUMER_GROUP, Keys, shard_for  # noqa: E402
from tests.stack import Stack, new_stack  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
SHARDS = 8
NODES = 200
WORDS = ["scale", "publish", "live", "stream", "shard", "batch", "node", "entry", "feed"]
SCALEPUB = str(Path(sys.executable).parent / "scalepub")
# Part 1's cap on entries per publish IQ: the size of batches under live traffic, so the
# run is bound by publish IQs. Uncapped, a pre-filled backlog goes out in a few IQs of
# thousands of entries per shard and the drain measures Redis reads and start-up instead.
BATCH_MAX_ENTRIES = 50


def payload(i: int) -> bytes:
    """A Django-XML-like row of about 300 bytes."""
    text = " ".join(random.choices(WORDS, k=12))
    return (f'<django-objects version="1.0"><object model="twitter.tweet" pk="{i}">'
            f'<field name="author" type="CharField">bench{i % NODES}</field>'
            f'<field name="text" type="CharField">{text}</field>'
            '</object></django-objects>').encode()


def tree(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True,
                         check=False).stdout
    return [pid] + [p for child in out.split() for p in tree(int(child))]


def cpu_ticks(pids: list[int]) -> int:
    """utime + stime of ``pids`` (those still alive)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total


def beam_pids(nodes: list[str]) -> list[int]:
    """The beam.smp processes of the stack's ejabberd nodes."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if not (proc / "comm").read_text().startswith("beam"):
                continue
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if any(n.encode() in args for n in nodes):
                pids.append(int(proc.name))
    return pids


class Supervisor:
    """``scalepub run --name NAME`` with ``settings``, its output in a log file."""

    def __init__(self, settings: Settings, name: str, log_dir: Path, *args: str) -> None:
        env = {**os.environ, **{f"SCALEPUB_{k}": str(v) for k, v in settings_env(settings).items()},
               "SCALEPUB_METRICS_PORT": "0"}  # several supervisors on one host
        self.name = name
        self.log = (log_dir / f"{name}.log").open("ab")
        self.proc = subprocess.Popen([SCALEPUB, "run", "--name", name, *args], env=env,
                                     stdout=self.log, stderr=self.log, cwd=REPO)

    def signal_tree(self, signum: int) -> None:
        """``signum`` to the supervisor and every child (children first)."""
        for pid in reversed(tree(self.proc.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL of the tree if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.signal_tree(signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


def settings_env(settings: Settings) -> dict[str, object]:
    """SETTING_NAME -> value for every field of ``settings``."""
    return {k.upper(): v for k, v in dataclasses.asdict(settings).items()}


def owners(client: redis.Redis, keys: Keys, shards: int) -> list[str]:
    """Each shard's owner (supervisor name) in Redis; '' for none."""
    with client.pipeline(transaction=False) as pipe:
        for s in range(shards):
            pipe.hget(keys.lease(s), "fence")
        fences = pipe.execute()
    return [f.decode().partition(":")[2].rpartition("#")[0] if f else "" for f in fences]


def wait_even(client: redis.Redis, keys: Keys, shards: int, names: list[str],
              timeout: float = 120) -> None:
    """Until the live ``names`` own every shard, counts within one of each other."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = owners(client, keys, shards)
        counts = [held.count(n) for n in names]
        if sum(counts) == shards and max(counts) - min(counts) <= 1:
            return
        time.sleep(0.05)
    raise TimeoutError(f"shards not spread over {names} in {timeout} s: {held}")


def remaining(client: redis.Redis, keys: Keys, shards: int) -> int:
    """Entries not yet acknowledged over all shard streams."""
    return sum(sum(stream_backlog(client, keys.stream(s))) for s in range(shards))


@dataclass
class Drain:
    """One throughput row."""

    label: str
    supervisors: int
    entries: int
    steady_per_s: float
    total_s: float
    cpu_s: dict[str, float] = field(default_factory=dict)
    redis_cmds_per_s: float = 0.0


@dataclass
class Bench:
    """The stack, its settings, and where the supervisors log."""

    stack: Stack
    log_dir: Path
    redis: redis.Redis

    def settings(self, node: int, **overrides: object) -> Settings:
        """Settings for a supervisor on ejabberd node ``node`` under a fresh prefix."""
        return Settings.from_mapping(env_mapping(self.stack.node_env(node)), **overrides)

    def nodes(self) -> list[str]:
        """The stack's Erlang node names."""
        first = self.stack.control["SCALEPUB_EJABBERD_NODE"]
        return [first, first.replace("@", "2@")]

    def redis_pid(self) -> int:
        """Redis's pid."""
        return int(self.redis.info("server")["process_id"])


@contextlib.contextmanager
def supervisors(bench: Bench, prefix: str, count: int, cluster: bool, ttl: float,
                renew: float, *args: str, shards: int = SHARDS) -> Iterator[list[Supervisor]]:
    """``count`` supervisors s1..sN under ``prefix``, on node 1 or alternating over both."""
    sups: list[Supervisor] = []
    try:
        for i in range(count):
            node = i % 2 + 1 if cluster else 1
            settings = bench.settings(node, key_prefix=prefix, shards=shards, lease_ttl_s=ttl,
                                      lease_renew_s=renew)
            sups.append(Supervisor(settings, f"s{i + 1}", bench.log_dir, *args))
        yield sups
    finally:
        for sup in sups:
            sup.signal_tree(signal.SIGCONT)
            sup.stop()


def drain(bench: Bench, count: int, cluster: bool, entries: int, batch: int) -> Drain:
    """Part 1, one row: ``count`` supervisors, spread, drain ``entries`` let in at once,
    at most ``batch`` entries per publish IQ."""
    prefix = f"so{uuid.uuid4().hex[:8]}"
    keys = Keys(prefix)
    label = "2-node cluster" if cluster else "one ejabberd"
    settings = bench.settings(1, key_prefix=prefix, shards=SHARDS)
    prefill(settings, entries, NODES)  # bench_publish's backlog, over the same node names
    close_gate(bench.redis, keys)
    with supervisors(bench, prefix, count, cluster, 5.0, 1.0,
                     "--batch-max-entries", str(batch)) as sups:
        wait_even(bench.redis, keys, SHARDS, [s.name for s in sups])
        pids = {"ejabberd": beam_pids(bench.nodes()), "redis": [bench.redis_pid()],
                "supervisors": [p for s in sups for p in tree(s.proc.pid)]}
        before = {k: cpu_ticks(v) for k, v in pids.items()}
        t0 = time.monotonic()
        open_gate(bench.redis, keys, settings)
        marks = watch_drain(bench.redis, keys, entries + SHARDS)
        total = time.monotonic() - t0
        cpu = {k: (cpu_ticks(v) - before[k]) / CLK_TCK for k, v in pids.items()}
    cleanup(bench.redis, prefix)
    window = marks[1][0] - marks[0][0]
    if window <= 0:  # the 10 % and 90 % marks in one sample: no steady rate to report
        raise SystemExit(f"bench_scaleout: {label}, {count} supervisor(s) drained {entries:,} "
                         "entries within one sample; give more --entries")
    return Drain(label, count, entries, 0.8 * entries / window, total, cpu,
                 (marks[1][1] - marks[0][1]) / window)


def close_gate(client: redis.Redis, keys: Keys) -> None:
    """The consumer groups made at the streams' ends: the supervisors see nothing to read."""
    for s in range(SHARDS):
        client.xgroup_create(keys.stream(s), CONSUMER_GROUP, id="$", mkstream=True)


def open_gate(client: redis.Redis, keys: Keys, settings: Settings) -> None:
    """Every shard's backlog readable at once: the groups moved back to the start, and one
    more entry per shard wakes the readers blocked in XREADGROUP."""
    for s in range(SHARDS):
        client.xgroup_setid(keys.stream(s), CONSUMER_GROUP, id="0")
    first: dict[int, str] = {}
    for i in range(NODES):  # 200 nodes cover every shard
        first.setdefault(shard_for(f"/bench/Tweet/bench{i}", SHARDS), f"/bench/Tweet/bench{i}")
    wake = [PendingEntry(node, time.time_ns(), "twitter.tweet", "w", "xml", payload(0))
            for node in first.values()]
    producer = StreamProducer(settings)
    producer.append(wake)
    producer.close()


def watch_drain(client: redis.Redis, keys: Keys, entries: int,
                ) -> tuple[tuple[float, int], tuple[float, int]]:
    """Until all is acknowledged; (monotonic time, Redis commands so far) at 10 % and 90 %."""
    marks: list[tuple[float, int]] = []
    while True:
        left = remaining(client, keys, SHARDS)
        done = entries - left
        if (not marks and done >= 0.1 * entries) or (len(marks) == 1 and done >= 0.9 * entries):
            marks.append((time.monotonic(),
                          int(client.info("stats")["total_commands_processed"])))
        if left == 0:
            return marks[0], marks[-1]
        time.sleep(0.05)


def cleanup(client: redis.Redis, prefix: str) -> None:
    """Delete every key under ``prefix``."""
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)


class Trickle:
    """One entry to each of 16 nodes every 0.1 s in a thread: a light steady load."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Trickle:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        producer = StreamProducer(self.settings)
        i = 0
        while not self._stop.is_set():
            producer.append([PendingEntry(f"/bench/trickle/{n}", time.time_ns(), "t.row",
                                          str(i), "xml", payload(i)) for n in range(16)])
            i += 1
            time.sleep(0.1)
        producer.close()


def handovers(bench: Bench, how: str, tries: int) -> list[float]:
    """Part 2: seconds until the victim's shards have a new owner, ``tries`` times."""
    prefix = f"ho{uuid.uuid4().hex[:8]}"
    keys = Keys(prefix)
    settings = bench.settings(1, key_prefix=prefix, shards=SHARDS)  # shipped TTL and renew
    times: list[float] = []
    with supervisors(bench, prefix, 2, False, settings.lease_ttl_s,
                     settings.lease_renew_s) as sups, Trickle(settings):
        for attempt in range(tries):
            wait_even(bench.redis, keys, SHARDS, ["s1", "s2"])
            victim = sups[attempt % 2]
            held = [s for s, o in enumerate(owners(bench.redis, keys, SHARDS))
                    if o == victim.name]
            t0 = time.monotonic()
            if how == "kill -9":
                victim.signal_tree(signal.SIGKILL)
            else:
                victim.proc.send_signal(signal.SIGTERM)
            times.append(wait_moved(bench.redis, keys, held, victim.name) - t0)
            victim.proc.wait(60)
            victim.log.close()
            sups[attempt % 2] = Supervisor(settings, victim.name, bench.log_dir)
            print(f"  {how} #{attempt + 1}: {times[-1]:.2f} s", flush=True)
    cleanup(bench.redis, prefix)
    return times


def wait_moved(client: redis.Redis, keys: Keys, shards: list[int], old: str) -> float:
    """Poll every 20 ms until each of ``shards`` has an owner other than ``old``."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        held = owners(client, keys, SHARDS)
        if all(held[s] not in ("", old) for s in shards):
            return time.monotonic()
        time.sleep(0.02)
    raise TimeoutError(f"shards {shards} never left {old}")


def lease_cost(bench: Bench, count: int, seconds: float = 10.0) -> dict[str, float]:
    """Part 3: commands/s by class, ``count`` idle supervisors sharing 100 shards."""
    prefix = f"lc{uuid.uuid4().hex[:8]}"
    keys = Keys(prefix)
    with supervisors(bench, prefix, count, False, 5.0, 1.0, "--processes", "4",
                     shards=100) as sups:
        wait_even(bench.redis, keys, 100, [s.name for s in sups], timeout=300)
        time.sleep(2)
        pid = bench.redis_pid()
        before, t0 = cpu_ticks([pid]), time.monotonic()
        time.sleep(seconds)  # Redis's CPU without MONITOR, which costs some itself
        cpu = (cpu_ticks([pid]) - before) / CLK_TCK / (time.monotonic() - t0)
        counts = monitor(bench, prefix, seconds)
    cleanup(bench.redis, prefix)
    return {**{k: v / seconds for k, v in counts.items()}, "redis CPU %": 100 * cpu}


CLASSES = ("lease upkeep", "membership", "fenced reads", "blocking reads", "other")


def command_class(command: str) -> str:
    """What a command seen by MONITOR is for, from its script text or keys."""
    if "XREADGROUP" in command:  # the fenced read script carries the lease key too
        return "fenced reads"
    if command.startswith("XREAD"):  # after an empty fenced read, waits for a new entry
        return "blocking reads"
    if ":lease" in command or ":fence" in command:  # acquire, renew, release scripts
        return "lease upkeep"
    if "{supervisors}" in command:
        return "membership"
    return "other"


def monitor(bench: Bench, prefix: str, seconds: float) -> dict[str, int]:
    """MONITOR for ``seconds``: commands under ``prefix`` counted by class."""
    counts = dict.fromkeys(CLASSES, 0)
    conn = redis.Redis.from_url(bench.stack.env["SCALEPUB_REDIS_URL"])
    end = time.monotonic() + seconds
    with conn.monitor() as m:  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        for event in m.listen():
            if time.monotonic() > end:
                break
            command = str(event.get("command", ""))
            # Commands a script runs show too (client "lua"): only what clients sent counts.
            if prefix in command and event.get("client_type") != "lua":
                counts[command_class(command)] += 1
    conn.close()
    return counts


def start_stack() -> Stack:
    """Redis + two clustered ejabberd nodes on free ports, background saves off."""
    stack = new_stack(2, SCALEPUB_POSTGRES="off")
    stack.up()
    client = redis.Redis.from_url(stack.env["SCALEPUB_REDIS_URL"])
    client.config_set("save", "")
    client.close()
    return stack


def median_row(rows: list[Drain]) -> Drain:
    """The round with the median entries/s."""
    return sorted(rows, key=lambda r: r.steady_per_s)[len(rows) // 2]


def report_drains(rows: list[Drain]) -> None:
    """Part 1's table (median rounds), with the ratio to one supervisor on one ejabberd."""
    base = rows[0].steady_per_s
    print(f"\n{'target':<16}{'sups':>5}{'entries/s':>11}{'x 1 sup':>9}{'drain s':>9}"
          f"{'ejabberd s':>12}{'sups s':>8}{'redis s':>9}{'redis cmd/s':>13}")
    for r in rows:
        print(f"{r.label:<16}{r.supervisors:>5}{r.steady_per_s:>11,.0f}"
              f"{r.steady_per_s / base:>9.2f}{r.total_s:>9.1f}{r.cpu_s['ejabberd']:>12.1f}"
              f"{r.cpu_s['supervisors']:>8.1f}{r.cpu_s['redis']:>9.1f}"
              f"{r.redis_cmds_per_s:>13,.0f}")


def report_handovers(results: dict[str, list[float]]) -> None:
    """Part 2's lines."""
    print("\nhandover (TTL 5 s, renew 1 s): seconds until every shard of the victim has a "
          "new owner")
    for how, times in results.items():
        print(f"  {how:<8} p50 {statistics.median(times):.2f} s, max {max(times):.2f} s, "
              f"min {min(times):.2f} s over {len(times)} tries")


def main() -> None:
    """Run the three parts on a private stack and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=120_000)
    parser.add_argument("--tries", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="part 1 rounds (median shown)")
    parser.add_argument("--batch-max-entries", type=int, default=BATCH_MAX_ENTRIES,
                        help="part 1: entries per publish IQ at most")
    parser.add_argument("--skip", choices=["throughput", "handover", "leases"], action="append",
                        default=[])
    opts = parser.parse_args()
    stack = start_stack()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    bench = Bench(stack, log_dir, redis.Redis.from_url(stack.env["SCALEPUB_REDIS_URL"]))
    print(f"stack: {stack.state_dir}; supervisor logs: {log_dir}; cores: {os.cpu_count()}; "
          f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    try:
        run_parts(bench, opts)
    finally:
        bench.redis.close()
        stack.down()


def run_parts(bench: Bench, opts: argparse.Namespace) -> None:
    """Parts 1-3 unless skipped."""
    if "throughput" not in opts.skip:
        # Creates the 200 pubsub nodes (auto-created on first publish, with retries when
        # creations collide): not measured.
        drain(bench, 1, False, 4 * NODES, opts.batch_max_entries)
        rounds: dict[tuple[bool, int], list[Drain]] = {}
        for r in range(opts.rounds):  # interleaved, so drift in the box's load hits all alike
            for cluster in (False, True):
                for count in (1, 2, 3):
                    row = drain(bench, count, cluster, opts.entries, opts.batch_max_entries)
                    rounds.setdefault((cluster, count), []).append(row)
                    print(f"  round {r + 1}: {row.label}, {count} supervisor(s): "
                          f"{row.steady_per_s:,.0f} entries/s", flush=True)
        report_drains([median_row(rows) for rows in rounds.values()])
    if "handover" not in opts.skip:
        report_handovers({how: handovers(bench, how, opts.tries)
                          for how in ("kill -9", "SIGTERM")})
    if "leases" not in opts.skip:
        print("\nRedis commands/s at 100 shards, idle supervisors (--processes 4), by purpose:")
        for count in (1, 2, 3):
            rates = lease_cost(bench, count)
            print(f"  {count} supervisor(s): " + ", ".join(
                f"{k} {v:.1f}" if k.endswith("%") else f"{k} {v:.1f}/s"
                for k, v in rates.items()), flush=True)


if __name__ == "__main__":
    main()
