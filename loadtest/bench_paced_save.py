"""Benchmark: CPU per save of one load-test producer (``manage.py tweet``) paced vs flat out.

    .venv/bin/python loadtest/bench_paced_save.py [--rates 90,0] [--seconds 10] [--rounds 2]
        [--databases sqlite,postgres] [--baseline-rev HEAD~3] [--no-external]

A load test's producers save at a set rate (bosh200: 2 x 90 + 1 x 20 saves/s). Their CPU per
save there is several times what ``bench_ingest`` measures flat out. This runs the same
command against a private Redis (no ejabberd, no pool: only the producer's side), rate 0
meaning as fast as it goes, in interleaved rounds, and prints CPU per save (the process's user
+ system time from ``wait4``, minus a start-up-only run's, so Django's start is not in it).
Paced commits come one at a time, so every save gets an outbox relay round (SELECT, the
append script, DELETE) of its own; flat out, a round moves the commits of its gather window.

Variants, each on every database, interleaved: ``this tree``; ``relay external`` (the same
code with ``OUTBOX_RELAY = "external"``: no relay thread, the save alone, the floor the relay
round adds to); ``baseline REV`` per ``--baseline-rev`` (that commit's ``scalepub`` package
from ``git archive``, the example project of this tree). PostgreSQL: ``DATABASE_URL`` (as
``eval "$(ops/stack env)"`` exports it with the stack's PostgreSQL up). A paced save here
costs several times a flat-out one even with no relay: on this box code that runs after a
sleep runs on cold caches (a pure-Python loop paced at 90/s: ~1.7x its flat-out CPU).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
STARTUP_SAVES = 20
DATABASES = ("sqlite", "postgres")


@dataclass(frozen=True)
class Variant:
    """A way to run the producer: the ``scalepub`` package it imports and extra settings."""

    label: str
    tree: Path = REPO
    extra: tuple[tuple[str, str], ...] = ()


def _redis(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc


def _manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "example/manage.py", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, check=True)


class Producer:
    """Runs ``manage.py tweet`` processes of one variant on one database."""

    def __init__(self, env: dict[str, str], variant: Variant, database: str,
                 base: Path) -> None:
        path = f"{variant.tree}{os.pathsep}{REPO}"
        self.env = {**env, **dict(variant.extra), "PYTHONPATH": path}
        self.database, self.base = database, base
        if database == "sqlite":
            self.env.pop("DATABASE_URL", None)
        # from / (python -c puts its working directory first on sys.path; manage.py puts
        # example/ there instead)
        where = subprocess.run([PY, "-c", "import scalepub; print(scalepub.__file__)"], cwd="/",
                               env=self.env, capture_output=True, text=True, check=True)
        if not where.stdout.startswith(str(variant.tree)):  # the checkout's package won
            raise RuntimeError(f"{variant.label}: imports {where.stdout.strip()}")

    def cpu(self, rate: float, count: int) -> float:
        """CPU seconds of one producer process saving ``count`` rows at ``rate``."""
        env = dict(self.env)
        if self.database == "sqlite":  # a fresh file per run: same table sizes every time
            db = self.base.with_name(f"p{time.monotonic_ns()}.sqlite3")
            shutil.copyfile(self.base, db)
            env["EXAMPLE_DB"] = str(db)
        cmd = [PY, "example/manage.py", "tweet", "--rate", str(rate), "--authors", "100",
               "--count", str(count), "--prefix", "user"]
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        _pid, status, usage = os.wait4(proc.pid, 0)
        if status:
            raise RuntimeError(f"{' '.join(cmd)} failed ({status})")
        if self.database == "postgres" and env.get("SCALEPUB_OUTBOX_RELAY") == "external":
            _manage(env, "scalepub_relay", "--once")  # the next run starts on an empty outbox
        return usage.ru_utime + usage.ru_stime


def _baseline(rev: str, work: Path) -> Variant:
    """The ``scalepub`` package of an older commit, from ``git archive``."""
    from loadtest.revisions import package_tree

    return Variant(f"baseline {rev}", package_tree(rev, work))


def _options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rates", default="90,0", help="saves/s per process (0: flat out)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per paced run")
    parser.add_argument("--flat-count", type=int, default=3000, help="saves of a rate-0 run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--databases", default="sqlite",
                        help=f"comma-separated, of {', '.join(DATABASES)} (postgres: "
                             "DATABASE_URL)")
    parser.add_argument("--baseline-rev", action="append", default=[],
                        help="also run this commit's scalepub package (repeatable)")
    parser.add_argument("--no-external", action="store_true",
                        help="leave out the relay-external variant")
    opts = parser.parse_args()
    opts.databases = [d for d in opts.databases.split(",") if d]
    if bad := [d for d in opts.databases if d not in DATABASES]:
        parser.error(f"--databases: unknown {', '.join(bad)} (one of {', '.join(DATABASES)})")
    if "postgres" in opts.databases and not os.environ.get("DATABASE_URL"):
        parser.error("--databases postgres needs DATABASE_URL (eval \"$(ops/stack env)\" with "
                     "the stack's PostgreSQL up)")
    return opts


def _run(opts: argparse.Namespace, env: dict[str, str], tmp: Path,
         variants: list[Variant]) -> dict[tuple[str, str, float], list[float]]:
    """Interleaved rounds; µs per save by (database, variant, rate)."""
    base = tmp / "base.sqlite3"
    _manage({**env, "EXAMPLE_DB": str(base), "DATABASE_URL": ""}, "migrate", "-v", "0")
    if "postgres" in opts.databases:
        _manage(env, "migrate", "-v", "0")
        _manage(env, "scalepub_relay", "--once")
    producers = {(db, v.label): Producer(env, v, db, base)
                 for db in opts.databases for v in variants}
    got: dict[tuple[str, str, float], list[float]] = defaultdict(list)
    order = list(producers.items())
    for r in range(1, opts.rounds + 1):
        # each round starts with the next variant: none always runs first (or last)
        for (db, label), producer in order[r - 1:] + order[:r - 1]:
            start_up = producer.cpu(0, STARTUP_SAVES)
            for rate in (float(x) for x in opts.rates.split(",")):
                count = round(rate * opts.seconds) if rate else opts.flat_count
                us = (producer.cpu(rate, count) - start_up) / count * 1e6
                got[(db, label, rate)].append(us)
                print(f"round {r} {db:8} {label:>16} {_rate(rate):>9}: {count} saves, "
                      f"{us:,.0f} us per save (start-up {start_up:.2f} s), "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
    return got


def _rate(rate: float) -> str:
    return f"{rate:g}/s" if rate else "flat out"


def _report(got: dict[tuple[str, str, float], list[float]], variants: list[Variant]) -> None:
    """Median µs per save, and ratios against this tree's figure."""
    print("\n| database | rate | " + " | ".join(v.label for v in variants) + " |")
    print("|---|---|" + "---:|" * len(variants))
    for (db, rate) in dict.fromkeys((db, rate) for db, _, rate in got):
        mine = statistics.median(got[(db, variants[0].label, rate)])
        cells = []
        for v in variants:
            runs = got[(db, v.label, rate)]
            med = statistics.median(runs)
            ratio = "" if v == variants[0] else f" ({med / mine:.2f}x)"
            cells.append(f"{med:,.0f}{ratio} [{min(runs):,.0f}-{max(runs):,.0f}]")
        print(f"| {db} | {_rate(rate)} | " + " | ".join(cells) + " |")
    print("(median us of CPU per save [min-max over rounds]; (x): against "
          f"'{variants[0].label}')")


def main() -> None:
    """Interleaved rounds of every variant on every database; a table of µs per save."""
    opts = _options()
    sys.path.insert(0, str(REPO))
    from tests.stack import free_port

    port, tmp = free_port(), Path(tempfile.mkdtemp(prefix="bench-paced-", dir="/dev/shm"))
    redis = _redis(port)
    env = {**os.environ, "SCALEPUB_REDIS_URL": f"redis://127.0.0.1:{port}/0",
           "SCALEPUB_SHARDS": "8", "SCALEPUB_KEY_PREFIX": "bp", "SCALEPUB_METRICS_PORT": "0",
           "DJANGO_DEBUG": "0"}
    variants = [Variant("this tree")]
    if not opts.no_external:
        variants.append(Variant("relay external", extra=(("SCALEPUB_OUTBOX_RELAY",
                                                          "external"),)))
    try:
        variants += [_baseline(rev, tmp) for rev in opts.baseline_rev]
        print(f"load average at start: {os.getloadavg()[0]:.1f}")
        got = _run(opts, env, tmp, variants)
        print(f"load average at end: {os.getloadavg()[0]:.1f}")
        _report(got, variants)
    finally:
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
