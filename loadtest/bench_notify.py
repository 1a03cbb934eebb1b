"""Benchmark: what the outbox's commit notification (PostgreSQL) adds to a committed save.

    eval "$(ops/stack env)"; .venv/bin/python loadtest/bench_notify.py [--saves N] [--listen]

What: a registered save on PostgreSQL is, in SQL, an INSERT of the row, an INSERT into
``scalepub_outbox`` and a COMMIT; migration 0002 adds a statement trigger that calls
``pg_notify`` (scalepub/django/notify.py), and PostgreSQL queues the notification at commit.
This measures that transaction with and without the trigger, on two scratch copies of the
outbox table (one with the trigger, one without) in the ``DATABASE_URL`` database, saves
alternating between them so load drift on a busy machine hits both alike. Prints the median
of each, their ratio and difference. ``--listen`` keeps a session LISTENing (and draining) as
the relay does, so delivery is counted too. The scratch tables are dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import psycopg

from scalepub.django import notify

ON, OFF, ROWS = "bench_notify_on", "bench_notify_off", "bench_notify_rows"
PAYLOAD = b"<object>" + b"x" * 300 + b"</object>"


def setup(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """The row table and two outbox copies; the trigger on ON only (its own function)."""
    conn.execute(f"DROP TABLE IF EXISTS {ON}, {OFF}, {ROWS}")
    conn.execute(f"CREATE TABLE {ROWS} (id bigserial PRIMARY KEY, author varchar(64), "
                 "text varchar(280))")
    for table in (ON, OFF):
        conn.execute(f"CREATE TABLE {table} (LIKE scalepub_outbox INCLUDING ALL)"
                     if _has_outbox(conn) else
                     f"CREATE TABLE {table} (id bigserial PRIMARY KEY, node varchar(255), "
                     "ts_ns bigint, model varchar(200), object_pk text, fmt varchar(8), "
                     "payload bytea)")
    conn.execute(f"""
CREATE OR REPLACE FUNCTION bench_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('{notify.CHANNEL}', ''); RETURN NULL; END $$;
CREATE TRIGGER bench_notify AFTER INSERT ON {ON} FOR EACH STATEMENT
  EXECUTE FUNCTION bench_notify()""")


def _has_outbox(conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    return conn.execute("SELECT to_regclass('scalepub_outbox') IS NOT NULL").fetchone() == (True,)


def save(conn: psycopg.Connection[tuple[object, ...]], outbox: str) -> int:
    """One committed save in SQL; its wall time in ns."""
    started = time.perf_counter_ns()
    with conn.transaction():
        row = conn.execute(f"INSERT INTO {ROWS} (author, text) VALUES (%s, %s) RETURNING id",
                           ["ann", "hello"]).fetchone()
        assert row is not None
        conn.execute(f"INSERT INTO {outbox} (node, ts_ns, model, object_pk, fmt, payload) "
                     "VALUES (%s, %s, 'bench.row', %s, 'xml', %s)",
                     ["/bench/ann", time.time_ns(), str(row[0]), PAYLOAD])
    return time.perf_counter_ns() - started


def listener(url: str, stop: threading.Event, got: list[int]) -> None:
    """LISTEN and drain notifications until ``stop``, as the relay's listener does."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"LISTEN {notify.CHANNEL}")
        while not stop.is_set():
            got[0] += sum(1 for _ in conn.notifies(timeout=0.2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--saves", type=int, default=5000, help="saves per variant (5000)")
    parser.add_argument("--listen", action="store_true", help="a session LISTENs meanwhile")
    args = parser.parse_args()
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        print("bench_notify: DATABASE_URL must name a PostgreSQL database: run "
              '`eval "$(ops/stack env)"` with the stack up', file=sys.stderr)
        return 2
    stop, got = threading.Event(), [0]
    thread = threading.Thread(target=listener, args=(url, stop, got), daemon=True)
    with psycopg.connect(url, autocommit=True) as conn:
        setup(conn)
        try:
            if args.listen:
                thread.start()
            on, off = measure(conn, args.saves)
        finally:
            stop.set()
            conn.execute(f"DROP TABLE {ON}, {OFF}, {ROWS}; DROP FUNCTION bench_notify()")
    a, b = statistics.median(off) / 1000, statistics.median(on) / 1000
    print(f"{args.saves} saves each (INSERT row + INSERT outbox + COMMIT), alternating"
          f"{', a session LISTENing' if args.listen else ''}: median without trigger "
          f"{a:.0f} us, with the notify trigger {b:.0f} us; ratio {b / a:.3f}, "
          f"difference {b - a:+.0f} us" + (f"; {got[0]} notifications received"
                                          if args.listen else ""))
    return 0


def measure(conn: psycopg.Connection[tuple[object, ...]],
            saves: int) -> tuple[list[int], list[int]]:
    """Warm-up, then ``saves`` of each variant, alternating which goes first."""
    for _ in range(300):
        save(conn, ON)
        save(conn, OFF)
    on: list[int] = []
    off: list[int] = []
    for i in range(saves):
        if i % 2:
            on.append(save(conn, ON))
            off.append(save(conn, OFF))
        else:
            off.append(save(conn, OFF))
            on.append(save(conn, ON))
    return on, off


if __name__ == "__main__":
    sys.exit(main())
