"""Benchmark: what ``scalepub.register`` adds to a Django save, plain vs registered, one run.

    eval "$(ops/stack env)"; .venv/bin/python loadtest/bench_ingest.py [--saves N] [--rounds R]

What: the median wall time of one created row's ``save()`` in Django's default autocommit mode
(every save is its own committed INSERT), for two models of the example project: ``tweet``
(``twitter.Tweet``, 3 columns, node per author) and ``wide`` (``fieldzoo.Wide``, 20 columns of
every common type, a foreign key, a custom field). Each is saved unregistered ("plain") and
registered in both delivery modes: "outbox" (the default: post_save -> serializer -> one more
INSERT in the same transaction; the relay thread of this same process moves rows to Redis
concurrently unless ``--relay external``, so its cost shows up here too) and "direct"
(on_commit -> serializer -> one EVALSHA to Redis). The ratio of each median to plain's is the
number to watch; the goal is <= 1.5 (stretch 1.3). "outbox-tx" is "outbox" with the
one-statement create (scalepub/django/onestatement.py) switched off for its rounds: the
transaction path every create took before (BEGIN, INSERT, outbox INSERT, COMMIT), the A/B
baseline measured in the same run (``--modes`` picks the modes; plain always runs first).
"outbox-1s" forces the one-statement path on every database, SQLite's TEMP trigger included
(off there by default: ``onestatement.VENDORS``); on PostgreSQL it is "outbox". "outbox-cb" is
"outbox" with the create's statement sent as Django binds it, on the client and unprepared
(scalepub/django/prepared.py off): the A/B baseline of the prepared statement (PostgreSQL).
"outbox-bw" is "outbox" with the relay's gather window blind to how busy the process is
(``relay.BUSY_WINDOW`` off: the window before it). "outbox-ext" is "outbox" with
``OUTBOX_RELAY = "external"`` for its rounds (no relay thread; the rows it leaves are moved
before the next mode's timer starts): the floor the relay thread adds to, in the same run.
"outbox-rc" is "outbox" with the relay's appends through redis-py's client instead of a
connection of its own (``producer.OWN_CONNECTION`` off; the relay thread restarts).
"outbox-pre" turns both off: the relay thread as it was before them.

The database: ``DATABASE_URL`` (PostgreSQL, as ``ops/stack env`` exports it) or else the
example's SQLite (WAL, synchronous=NORMAL); either way a fresh test database (Django's
``create_test_db``, migrated), dropped at the end.

How: DEBUG off (query logging would pad both sides), a unique ``SCALEPUB_KEY_PREFIX``. After a
warm-up in every mode (connections, Lua script load, imports, prepared serializers), R rounds
of N saves cycle plain, outbox, direct, plain, ... per model, so drift on a noisy machine hits
all modes alike; each save is timed alone with ``time.perf_counter_ns`` (the instance is built
outside the timer). Median and p90 are over all saves of a mode. Afterwards the stream entries
under the prefix are counted (once the relay emptied the outbox): they must equal the
registered saves, else a registered path is broken and the script exits 1; otherwise it exits
0 whether the goal was met or not. Beside wall time, the table shows this process's CPU time
per timed save (all threads, so the relay thread's work counts against the registered modes;
the database server's does not): on a loaded box it moves less than wall time, which also
waits for a core. Per mode, the CPU time of this process's scalepub threads (the relay, its
LISTEN session or nudge subscription) per row the relay moved meanwhile, and rows per round.
``--profile MODE`` instead runs pyinstrument (if installed)
over N saves of one mode of ``--models``' first model and prints where the time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import io
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GOAL, STRETCH = 1.5, 1.3
AUTHORS = [f"bench{i}" for i in range(64)]
TEXT = "a benchmark tweet of a realistic size, some words, a link https://example.com/x/y"
MODELS = ("tweet", "wide")
MODES = ("plain", "outbox", "outbox-tx", "outbox-1s", "outbox-cb", "outbox-nq", "outbox-bw",
         "outbox-rc", "outbox-pre", "outbox-ext", "direct")


@dataclass
class Mode:
    """One side of the comparison for one model and the per-save times it collected (ns)."""

    model: str
    name: str
    activate: Callable[[], None]
    make: Callable[[int], Any]
    times: list[int] = field(default_factory=list)
    round_medians: list[float] = field(default_factory=list)
    saves: int = 0  # every save in this mode, warm-up included
    cpu_ns: int = 0  # this process's CPU (all threads: the relay's too) over the timed saves
    relay_cpu_ns: int = 0  # the CPU of scalepub's threads (relay, LISTEN, nudges) meanwhile
    relay_rounds: int = 0  # relay rounds that moved rows meanwhile
    relay_rows: int = 0  # rows they moved


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--saves", type=int, default=2000, help="timed saves per round")
    p.add_argument("--rounds", type=int, default=8,
                   help="rounds per model, cycling the modes (a multiple of their number)")
    p.add_argument("--modes", default="plain,outbox,outbox-tx,direct",
                   help=f"comma-separated, of {', '.join(MODES)} (plain is always first)")
    p.add_argument("--warmup", type=int, default=200, help="untimed saves per mode first")
    p.add_argument("--models", default="tweet,wide",
                   help=f"comma-separated, of {', '.join(MODELS)} (default both)")
    p.add_argument("--relay", choices=("thread", "external"), default="thread",
                   help="outbox relay thread in this process (default) or none while timing")
    p.add_argument("--profile", choices=MODES,
                   help="profile N saves of one mode with pyinstrument instead of comparing")
    args = p.parse_args()
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    chosen = {m.strip() for m in args.modes.split(",")} | {"plain"}
    if chosen - set(MODES):
        p.error(f"--modes: a comma-separated list of {', '.join(MODES)}")
    args.modes = [m for m in MODES if m in chosen]
    n = len(args.modes)
    if args.saves < 1 or args.rounds < n or args.rounds % n or args.warmup < 0:
        p.error(f"need --saves >= 1, --rounds a multiple of {n} (the modes), --warmup >= 0")
    if not args.models or set(args.models) - set(MODELS):
        p.error(f"--models: a comma-separated list of {', '.join(MODELS)}")
    return args


def log(msg: str) -> None:
    """Progress goes to stderr, results to stdout."""
    print(msg, file=sys.stderr, flush=True)


def setup_django(prefix: str, relay: str) -> str:
    """Configure the example project (DATABASE_URL or SQLite), create and migrate a fresh test
    database; returns a description of the database."""
    sys.path.insert(0, str(REPO))
    from loadtest.example_project import use_example_project

    os.environ["SCALEPUB_OUTBOX_RELAY"] = relay
    use_example_project(SCALEPUB_KEY_PREFIX=prefix)
    from django.db import connection

    connection.creation.create_test_db(verbosity=0, autoclobber=True, serialize=False)
    with connection.cursor():
        version = connection.Database.sqlite_version if connection.vendor == "sqlite" else \
            f"{connection.pg_version // 10000}.{connection.pg_version % 10000}"
    setup = "WAL, synchronous=NORMAL, file" if connection.vendor == "sqlite" else \
        f"{connection.settings_dict['HOST']}:{connection.settings_dict['PORT']}"
    return f"{connection.vendor} {version} ({setup})"


def drop_database() -> None:
    """Drop the test database ``setup_django`` created."""
    from django.conf import settings
    from django.db import connection

    name = settings.DATABASES["default"]["NAME"]
    connection.close()
    connection.creation.destroy_test_db(name, verbosity=0)


def redis_client() -> Any:
    """The producer's own Redis client; exits 1 if Redis does not answer."""
    import redis

    from scalepub.django.producer import get_producer, get_settings

    settings = get_settings()
    try:
        get_producer().client.ping()
    except redis.RedisError as exc:
        log(f"Redis at {settings.redis_url} does not answer ({exc}); "
            'run `eval "$(ops/stack env)"` with the stack up')
        sys.exit(1)
    return get_producer().client


def tweet_maker() -> tuple[type[Any], Callable[[int], Any]]:
    """The example model and a new unsaved row for save number ``i``."""
    from twitter.models import Tweet

    return Tweet, lambda i: Tweet(author=AUTHORS[i % len(AUTHORS)], text=TEXT)


def wide_maker() -> tuple[type[Any], Callable[[int], Any]]:
    """The 20-column model and a new unsaved row with every column set."""
    from django.utils import timezone
    from fieldzoo.models import Point, Tag, Wide

    tag = Tag.objects.create(name="bench")
    body = "a longer body of text, " * 12

    def make(i: int) -> Any:
        return Wide(title=f"{TEXT} {i}", body=body, slug=f"slug-{i}", email=f"u{i}@example.com",
                    count=i, big=i * 1_000_003, small=i % 30_000, ratio=i / 7,
                    amount=Decimal(i) / 100, flag=bool(i % 2), maybe=None,
                    day=dt.date(2026, 12, 3), at=timezone.now(), clock=dt.time(9, 30, i % 60),
                    span=dt.timedelta(seconds=i), token=uuid.uuid4(), blob=b"\x00bench",
                    data={"i": i, "tags": ["a", "b"], "ok": True}, where=Point(i, -i), tag=tag)
    return Wide, make


def make_modes(model_name: str, names: list[str]) -> list[Mode]:
    """Plain (unregistered), then registered with the model's node rule in each delivery."""
    from django.conf import settings

    import scalepub
    from scalepub import producer as stream_producer
    from scalepub.django import onestatement, producer, relay
    from scalepub.django.registry import registry

    model, make = (tweet_maker if model_name == "tweet" else wide_maker)()
    original = registry.get(model)
    if original is None:
        log(f"{model._meta.label} is not registered by the example project; nothing to compare")
        sys.exit(1)
    # the relay of --relay: the last model's last mode may have left another in the setting
    base = {**settings.SCALEPUB, "OUTBOX_RELAY": os.environ["SCALEPUB_OUTBOX_RELAY"]}

    vendors = onestatement.VENDORS

    def registered(delivery: str, one_statement: bool = True,
                   everywhere: bool = False, prepare: bool = True,
                   quiet: bool = True, busy_window: bool = True,
                   relay_mode: str = "", own_connection: bool = True) -> Callable[[], None]:
        wanted = {**base, "DELIVERY": delivery}
        if relay_mode:
            wanted["OUTBOX_RELAY"] = relay_mode

        def activate() -> None:
            if wanted != settings.SCALEPUB or own_connection != stream_producer.OWN_CONNECTION:
                settings.SCALEPUB = wanted
                stream_producer.OWN_CONNECTION = own_connection  # read by the next relay
                producer.reset()  # stops (and drains) the relay thread of the other mode
                drain_outbox()  # what a mode without a relay thread left, before the timer
            scalepub.register(model, node=original.node)
            onestatement.ENABLED = one_statement
            set_prepared(prepare)
            onestatement.QUIET = quiet
            relay.BUSY_WINDOW = busy_window
            onestatement.VENDORS = vendors | {"sqlite", "postgresql"} if everywhere else vendors
        return activate

    def plain() -> None:
        scalepub.unregister(model)
        onestatement.ENABLED, onestatement.VENDORS, onestatement.QUIET = True, vendors, True
        relay.BUSY_WINDOW = True
        set_prepared(True)

    activate = {"plain": plain, "outbox": registered("outbox"),
                "outbox-tx": registered("outbox", one_statement=False),
                "outbox-1s": registered("outbox", everywhere=True),
                "outbox-cb": registered("outbox", prepare=False),
                "outbox-nq": registered("outbox", quiet=False),
                "outbox-bw": registered("outbox", busy_window=False),
                "outbox-rc": registered("outbox", own_connection=False),
                "outbox-pre": registered("outbox", busy_window=False, own_connection=False),
                "outbox-ext": registered("outbox", relay_mode="external"),
                "direct": registered("direct")}
    return [Mode(model_name, name, activate[name], make) for name in names]


def set_prepared(on: bool) -> None:
    """Turn the prepared create statement (PostgreSQL) on or off; without psycopg there is
    none."""
    try:
        from scalepub.django import prepared
    except ImportError:
        return
    prepared.ENABLED = on


# Rounds that moved rows and the rows they moved, counted by the relay_once wrapper below.
_RELAYED = [0, 0]


def count_relay_rounds() -> None:
    """Wrap Relay.relay_once to count the rounds that moved rows and the rows moved."""
    from scalepub.django.relay import Relay

    original = Relay.relay_once

    def relay_once(self: Relay) -> Any:
        done = original(self)
        if done.moved:
            _RELAYED[0] += 1
            _RELAYED[1] += done.moved
        return done

    Relay.relay_once = relay_once  # type: ignore[method-assign]


def scalepub_threads_cpu_ns() -> int:
    """CPU time of this process's scalepub threads (relay, LISTEN session, nudges)."""
    total = 0
    for thread in threading.enumerate():
        if thread.name.startswith("scalepub-") and thread.ident is not None:
            with contextlib.suppress(OSError):  # ended meanwhile
                total += time.clock_gettime_ns(time.pthread_getcpuclockid(thread.ident))
    return total


def run_saves(mode: Mode, count: int, timed: bool) -> None:
    """``count`` saves of new rows in ``mode``, each timed alone when ``timed``."""
    mode.activate()
    gc.collect()
    clock, make = time.perf_counter_ns, mode.make
    relayed, relay_cpu = list(_RELAYED), scalepub_threads_cpu_ns()
    cpu = time.process_time_ns()
    for i in range(count):
        row = make(i)
        start = clock()
        row.save()
        elapsed = clock() - start
        if timed:
            mode.times.append(elapsed)
    if timed:
        mode.cpu_ns += time.process_time_ns() - cpu
        mode.relay_cpu_ns += scalepub_threads_cpu_ns() - relay_cpu
        mode.relay_rounds += _RELAYED[0] - relayed[0]
        mode.relay_rows += _RELAYED[1] - relayed[1]
    mode.saves += count


def run_rounds(modes: list[Mode], args: argparse.Namespace) -> None:
    """Warm up every mode, then cycle timed rounds A, B, C, A, B, C, ..."""
    for mode in modes:
        log(f"warm-up: {args.warmup} saves {mode.model} {mode.name}")
        run_saves(mode, args.warmup, timed=False)
    for r in range(args.rounds):
        mode = modes[r % len(modes)]
        before = len(mode.times)
        run_saves(mode, args.saves, timed=True)
        median = statistics.median(mode.times[before:])
        mode.round_medians.append(median)
        log(f"round {r + 1}/{args.rounds}: {mode.model} {mode.name:<7} {args.saves} saves, "
            f"median {median / 1000:.1f} us")


def stream_entries(client: Any, prefix: str) -> int:
    """Entries in every shard stream under ``prefix``."""
    from scalepub.sharding import Keys

    pattern = Keys(prefix).stream_pattern
    return sum(int(client.xlen(key)) for key in client.scan_iter(match=pattern, count=1000))


def delete_keys(client: Any, prefix: str) -> int:
    """Remove every key under ``prefix``; how many there were."""
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start:start + 500])
    return len(keys)


def p90(values: list[int]) -> float:
    """90th percentile (inclusive method)."""
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def report(modes: list[Mode], args: argparse.Namespace, database: str) -> None:
    """Print the Markdown table and one ratio line per registered mode."""
    plain, *registered = modes
    medians = {m.name: statistics.median(m.times) for m in modes}
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{plain.model}: {args.rounds} rounds x {args.saves} saves, cycling the modes; "
          f"{database}, autocommit; relay {args.relay}; times per save; load average {load}\n")
    cpu = {m.name: m.cpu_ns / len(m.times) for m in modes}
    print("| mode | saves | median (us) | p90 (us) | median / plain | p90 / plain "
          "| CPU per save (us) | CPU / plain |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m in modes:
        print(f"| {m.name} | {len(m.times)} | {medians[m.name] / 1000:.1f} "
              f"| {p90(m.times) / 1000:.1f} | {medians[m.name] / medians['plain']:.2f} "
              f"| {p90(m.times) / p90(plain.times):.2f} | {cpu[m.name] / 1000:.1f} "
              f"| {cpu[m.name] / cpu['plain']:.2f} |")
    print()
    for m in modes:
        if m.relay_rows:
            print(f"{m.model} {m.name}: relay threads {m.relay_cpu_ns / m.relay_rows / 1000:.1f}"
                  f" us CPU per moved row, {m.relay_rows / m.relay_rounds:.1f} rows per round "
                  f"({m.relay_rounds} rounds)")
    for m in registered:
        ratio = medians[m.name] / medians["plain"]
        pairs = [b / a for a, b in zip(plain.round_medians, m.round_medians, strict=True)]
        verdict = "MET" if ratio <= GOAL else "NOT MET"
        print(f"{m.model} {m.name}: ratio {ratio:.2f} (goal <= {GOAL}: {verdict}; stretch "
              f"{STRETCH}: {'MET' if ratio <= STRETCH else 'NOT MET'}), "
              f"+{(medians[m.name] - medians['plain']) / 1000:.1f} us; per-round ratios "
              f"{', '.join(f'{x:.2f}' for x in pairs)}")
    for name in ("outbox", "outbox-1s"):
        if name in medians and "outbox-tx" in medians:
            print(f"{plain.model} {name} / outbox-tx (transaction path): "
                  f"{medians[name] / medians['outbox-tx']:.2f}, "
                  f"{(medians[name] - medians['outbox-tx']) / 1000:+.1f} us per save")


def verify(client: Any, prefix: str, registered: list[Mode]) -> bool:
    """Print whether every registered save reached a Redis stream; True if so."""
    from scalepub.django import producer

    producer.reset()  # the relay thread drains the outbox before it stops
    drain_outbox()
    expected = sum(m.saves for m in registered)
    found = stream_entries(client, prefix)
    ok = found == expected
    status = "OK" if ok else "FAILED"
    print(f"redis check {status}: {found} stream entries under {prefix!r}, "
          f"{expected} registered saves (warm-up included)")
    return ok


def drain_outbox() -> None:
    """With ``--relay external`` nothing moved the outbox: run the relay command once."""
    from django.core.management import call_command

    from scalepub.django import outbox

    if outbox.count("default"):
        call_command("scalepub_relay", "--once", verbosity=0, stdout=io.StringIO())


def profile(args: argparse.Namespace) -> int:
    """Profile ``--saves`` saves of one mode (pyinstrument) and print the call tree."""
    try:
        from pyinstrument import Profiler
    except ImportError:
        log("--profile needs pyinstrument: .venv/bin/pip install -e '.[profile]'")
        return 2
    mode = make_modes(args.models[0], [args.profile])[0]
    run_saves(mode, args.warmup, timed=False)
    profiler = Profiler(interval=0.0002)
    profiler.start()
    run_saves(mode, args.saves, timed=True)
    profiler.stop()
    print(f"{mode.model} {mode.name}: median {statistics.median(mode.times) / 1000:.1f} us "
          "per save under the profiler")
    print(profiler.output_text(unicode=False, color=False))
    return 0


def main() -> int:
    """Set up, measure, report, verify, clean up."""
    args = parse_args()
    prefix = f"bench-ingest-{uuid.uuid4().hex[:12]}"
    database = setup_django(prefix, args.relay)
    count_relay_rounds()
    client = redis_client()
    try:
        if args.profile:
            return profile(args)
        ok = True
        for name in args.models:
            modes = make_modes(name, args.modes)
            run_rounds(modes, args)
            report(modes, args, database)
            ok = verify(client, prefix, modes[1:]) and ok
            delete_keys(client, prefix)
    finally:
        from scalepub.django import producer

        producer.reset()
        log(f"deleted {delete_keys(client, prefix)} Redis keys under {prefix!r}")
        drop_database()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
