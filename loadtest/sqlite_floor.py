"""SQLite's own floor for a registered create, without Django: what the database charges.

    .venv/bin/python loadtest/sqlite_floor.py [--saves N] [--dir DIR]

A table shaped like the example's Tweet (AUTOINCREMENT pk, an index) and one shaped like
``scalepub_outbox``, in a WAL file with ``synchronous=NORMAL``, through Python's ``sqlite3``
in autocommit. Per iteration, interleaved, each timed alone: ``plain`` (one autocommit
INSERT ... RETURNING, what a plain save sends), ``tx_only`` (that INSERT between BEGIN and
COMMIT), ``registered`` (BEGIN, the INSERT, the outbox INSERT with a 330-byte payload,
COMMIT: what a registered save sends) and ``two_autocommit`` (the two INSERTs, each its own
transaction). Each set runs with SQLite's default ``temp_store`` and with
``PRAGMA temp_store=MEMORY``: inside a transaction SQLite opens a statement journal per
INSERT, by default in 64 KiB chunks (SQLITE_STMTJRNL_SPILL) freed at the statement's end;
where glibc's heap returns that memory to the kernel each time (strace shows a ``brk`` pair
per statement), the transaction costs far more than the INSERT. In memory the journal takes
1 KiB chunks. Prints the median per mode and its ratio to ``plain`` of the same set.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

TWEET = ("CREATE TABLE t (id integer PRIMARY KEY AUTOINCREMENT, author varchar(64) NOT NULL, "
         "text varchar(280) NOT NULL, created_at datetime NOT NULL)")
OUTBOX = ("CREATE TABLE o (id integer PRIMARY KEY AUTOINCREMENT, node varchar(255) NOT NULL, "
          "ts_ns bigint NOT NULL, model varchar(200) NOT NULL, object_pk text NOT NULL, "
          "fmt varchar(8) NOT NULL, payload blob NOT NULL)")
INSERT = "INSERT INTO t (author, text, created_at) VALUES (?, ?, ?) RETURNING id"
ENTRY = "INSERT INTO o (node, ts_ns, model, object_pk, fmt, payload) VALUES (?, ?, ?, ?, ?, ?)"
ROW = ("bench1", "a benchmark tweet of a realistic size, some words, a link "
       "https://example.com/x/y", "2026-12-04 04:00:00.123456")
PAYLOAD = b"x" * 330


def connect(path: Path, temp_store: str | None) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    if temp_store:
        db.execute(f"PRAGMA temp_store={temp_store}")
    db.execute(TWEET)
    db.execute("CREATE INDEX t_author ON t (author)")
    db.execute(OUTBOX)
    return db


def modes(db: sqlite3.Connection) -> dict[str, Callable[[], None]]:
    def plain() -> None:
        db.execute(INSERT, ROW).fetchall()

    def tx_only() -> None:
        db.execute("BEGIN")
        db.execute(INSERT, ROW).fetchall()
        db.execute("COMMIT")

    def registered() -> None:
        db.execute("BEGIN")
        [(pk,)] = db.execute(INSERT, ROW).fetchall()
        db.execute(ENTRY, ("/twitter/Tweet/bench1", time.time_ns(), "twitter.tweet", str(pk),
                           "xml", PAYLOAD))
        db.execute("COMMIT")

    def two_autocommit() -> None:
        [(pk,)] = db.execute(INSERT, ROW).fetchall()
        db.execute(ENTRY, ("/twitter/Tweet/bench1", time.time_ns(), "twitter.tweet", str(pk),
                           "xml", PAYLOAD))

    return {"plain": plain, "tx_only": tx_only, "registered": registered,
            "two_autocommit": two_autocommit}


def run(directory: Path, temp_store: str | None, saves: int) -> None:
    path = directory / f"floor-{temp_store or 'default'}.db"
    db = connect(path, temp_store)
    timed = modes(db)
    times: dict[str, list[int]] = {name: [] for name in timed}
    clock = time.perf_counter_ns
    for _ in range(saves):
        for name, fn in timed.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    db.close()
    base = statistics.median(times["plain"])
    print(f"temp_store={temp_store or 'default'} ({saves} iterations, {path.parent}):")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:15s} {median / 1000:7.1f} us  {median / base:5.2f}x plain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--saves", type=int, default=5000)
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the database files go (default: a new temporary dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for temp_store in (None, "MEMORY"):
            run(Path(tmp), temp_store, args.saves)


if __name__ == "__main__":
    main()
