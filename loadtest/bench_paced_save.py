"""Benchmark: CPU per save of one load-test producer (``manage.py tweet``) paced vs flat out.

    .venv/bin/python loadtest/bench_paced_save.py [--rates 90,0] [--seconds 10] [--rounds 2]

A load test's producers save at a set rate (bosh200: 2 x 90 + 1 x 20 saves/s). Their CPU per
save there (~1.5-1.8 ms) is several times what ``bench_ingest`` measures flat out. This runs
the same command against a private Redis (no ejabberd, no pool: only the producer's side),
rate 0 meaning as fast as it goes, in interleaved rounds, and prints CPU per save (the
process's user + system time from ``wait4``, minus a start-up-only run's, so Django's start is
not in it). The difference is the outbox relay: paced commits come one at a time, so every
save gets a relay round (SELECT, the append script, DELETE) of its own; flat out, a round
moves the commits of its gather window.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
STARTUP_SAVES = 20


def _redis(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc


def _tweet(env: dict[str, str], base: Path, rate: float, count: int) -> float:
    """CPU seconds of one producer process saving ``count`` rows at ``rate``."""
    db = base.with_name(f"p{time.monotonic_ns()}.sqlite3")
    shutil.copyfile(base, db)
    cmd = [PY, "example/manage.py", "tweet", "--rate", str(rate), "--authors", "100",
           "--count", str(count), "--prefix", "user"]
    proc = subprocess.Popen(cmd, env={**env, "EXAMPLE_DB": str(db)}, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _pid, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise RuntimeError(f"{' '.join(cmd)} failed ({status})")
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    """Interleaved rounds; prints µs of CPU per save for each rate."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", default="90,0", help="saves/s per process (0: flat out)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per paced run")
    parser.add_argument("--flat-count", type=int, default=3000, help="saves of a rate-0 run")
    parser.add_argument("--rounds", type=int, default=2)
    opts = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.stack import free_port

    port, tmp = free_port(), Path(tempfile.mkdtemp(prefix="bench-paced-", dir="/dev/shm"))
    redis = _redis(port)
    env = {**os.environ, "SCALEPUB_REDIS_URL": f"redis://127.0.0.1:{port}/0",
           "SCALEPUB_SHARDS": "8", "SCALEPUB_KEY_PREFIX": "bp", "SCALEPUB_METRICS_PORT": "0",
           "DJANGO_DEBUG": "0", "PYTHONPATH": str(REPO)}
    try:
        base = tmp / "base.sqlite3"
        subprocess.run([PY, "example/manage.py", "migrate", "-v", "0"], cwd=REPO, check=True,
                       env={**env, "EXAMPLE_DB": str(base)}, capture_output=True)
        print(f"load average at start: {os.getloadavg()[0]:.1f}")
        for r in range(1, opts.rounds + 1):
            start_up = _tweet(env, base, 0, STARTUP_SAVES)
            for rate in (float(x) for x in opts.rates.split(",")):
                count = round(rate * opts.seconds) if rate else opts.flat_count
                cpu = _tweet(env, base, rate, count) - start_up
                label = f"{rate:g}/s" if rate else "flat out"
                print(f"round {r}: {label:>9}: {count} saves, {cpu:.2f} s CPU after start-up "
                      f"({start_up:.2f} s): {cpu / count * 1e6:,.0f} us per save", flush=True)
        print(f"load average at end: {os.getloadavg()[0]:.1f}")
    finally:
        redis.terminate()
        redis.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
