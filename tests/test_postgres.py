"""PostgreSQL as a first-class database (issue 17 §1, §4, bad input).

The first test runs in both passes (it only needs the session stack's PostgreSQL); the others
need Django on PostgreSQL and run in make test's PostgreSQL pass (marker ``postgres``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from django.core.management import call_command
from django.db import DatabaseError, DataError, OperationalError, connection, transaction
from twitter.models import Tweet

from scalepub.django import notify, relay
from scalepub.django.models import OutboxEntry
from scalepub.django.outbox import OutboxTableMissing
from scalepub.settings import Settings
from tests.conftest import django_side
from tests.stack import STACK, Stack, free_port, new_stack
from tests.streams import read_all, wait_for_entries

pytestmark = [pytest.mark.stack]


def test_the_stack_serves_the_example_projects_database(stack: Stack) -> None:
    url = stack.env["DATABASE_URL"]
    assert url.startswith("postgres://scalepub:") and "@127.0.0.1:" in url
    with psycopg.connect(url) as conn:
        found = conn.execute("SELECT current_user, current_database()").fetchone()
        assert found is not None
        user, db = found
        created = conn.execute("SELECT rolcreatedb FROM pg_roles WHERE rolname = current_user")
        assert (user, db) == ("scalepub", "scalepub")
        assert created.fetchone() == (True,)  # Django's test runner makes its own database
    assert "postgres: running" in stack.run("status").stdout


def test_wrong_password_is_refused(stack: Stack) -> None:
    bad = stack.env["DATABASE_URL"].replace("postgres://scalepub:", "postgres://scalepub:x")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(bad, connect_timeout=5)


def test_stack_up_twice_keeps_postgres_down_stops_it_bad_setting_refused() -> None:
    s = new_stack(SCALEPUB_POSTGRES="on")
    data_dir = s.state_dir / "postgres" / "data"
    try:
        s.up()
        pid = (data_dir / "postmaster.pid").read_text().split()[0]
        assert s.run("up").returncode == 0
        assert (data_dir / "postmaster.pid").read_text().split()[0] == pid  # not restarted
        assert f"postgres: running (pid {pid}" in s.run("status").stdout
        with psycopg.connect(s.env["DATABASE_URL"], connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        s.down()
    assert not (data_dir / "postmaster.pid").exists()
    assert not Path(f"/proc/{pid}").exists()
    assert "postgres: not running" in s.run("status").stdout
    for name, value, says in (("SCALEPUB_POSTGRES", "maybe", "must be on or off"),
                              ("SCALEPUB_PG_PORT", s.control["SCALEPUB_REDIS_PORT"], "is taken")):
        bad = subprocess.run([str(STACK), "up"], env={**os.environ, **s.control, name: value},
                             capture_output=True, text=True, timeout=60, check=False)
        assert bad.returncode != 0 and f"{name}" in bad.stderr and says in bad.stderr, bad.stderr
        assert "started" not in bad.stdout  # refused before anything starts
    shutil.rmtree(s.state_dir, ignore_errors=True)


def _listen(settings_dict: dict[str, object]) -> psycopg.Connection[tuple[object, ...]]:
    conn = psycopg.connect(
        dbname=str(settings_dict["NAME"]), user=str(settings_dict["USER"]),
        password=str(settings_dict["PASSWORD"]), host=str(settings_dict["HOST"]),
        port=int(str(settings_dict["PORT"])), autocommit=True)
    conn.execute(f"LISTEN {notify.CHANNEL}")
    return conn


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_commit_with_outbox_rows_notifies_a_rollback_does_not(outbox_django: Settings) -> None:
    listener = _listen(connection.settings_dict)
    try:
        with pytest.raises(RuntimeError), transaction.atomic():
            Tweet.objects.create(author="ann", text="rolled back")
            raise RuntimeError("roll back")
        assert list(listener.notifies(timeout=0.5)) == []
        with transaction.atomic():  # two rows, one transaction: one notification
            Tweet.objects.create(author="ann", text="one")
            Tweet.objects.create(author="ann", text="two")
        got = list(listener.notifies(timeout=2, stop_after=2))
        assert [n.channel for n in got] == [notify.CHANNEL]
    finally:
        listener.close()


@pytest.fixture
def polling_never(outbox_django: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Idle relays that would look only every 60 s: only a notification can wake them."""
    monkeypatch.setattr(relay, "LISTENING_POLL_S", 60.0)
    yield from django_side(outbox_django.replace(outbox_poll_ms=60_000))


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_relay_is_woken_by_another_sessions_commit(polling_never: Settings,
                                                      redis_client: redis.Redis) -> None:
    Tweet.objects.create(author="ann", text="starts this process's relay")
    assert len(wait_for_entries(redis_client, polling_never, 1)) == 1
    time.sleep(1.0)  # the relay is idle now, LISTENing, its poll 60 s away
    _insert_raw("/twitter/Tweet/raw")  # no in-process wake-up exists for another session
    entries = wait_for_entries(redis_client, polling_never, 2, timeout=15)
    assert [e.env.node for e in entries][-1] == "/twitter/Tweet/raw"


def _insert_raw(node: str) -> None:
    """Commit one outbox row from another session (as another process would)."""
    d = connection.settings_dict
    with psycopg.connect(dbname=str(d["NAME"]), user=str(d["USER"]), password=str(d["PASSWORD"]),
                         host="127.0.0.1", port=int(str(d["PORT"]))) as other:
        other.execute(
            "INSERT INTO scalepub_outbox (node, ts_ns, model, object_pk, fmt, payload) "
            "VALUES (%s, %s, 'twitter.tweet', '999', 'xml', %s)",
            [node, time.time_ns(), b"<object/>"])


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_relay_listens_again_after_postgres_restarts(
        polling_never: Settings, redis_client: redis.Redis, stack: Stack) -> None:
    Tweet.objects.create(author="ann", text="starts this process's relay")
    assert len(wait_for_entries(redis_client, polling_never, 1)) == 1
    restarted = stack.run("restart", "postgres")
    assert restarted.returncode == 0, restarted.stderr
    connection.close()  # this thread's session died with the server
    time.sleep(2.0)  # the relay's own session and its LISTEN session reconnect meanwhile
    _insert_raw("/twitter/Tweet/after-restart")
    entries = wait_for_entries(redis_client, polling_never, 2, timeout=15)
    assert [e.env.node for e in entries][-1] == "/twitter/Tweet/after-restart"


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_postgres_unreachable_fails_the_save_and_writes_nothing(
        outbox_django: Settings, redis_client: redis.Redis) -> None:
    port = connection.settings_dict["PORT"]
    connection.close()
    connection.settings_dict["PORT"] = free_port()  # nobody listens there
    try:
        with pytest.raises(OperationalError):
            Tweet.objects.create(author="ann", text="no database")
    finally:
        connection.close()
        connection.settings_dict["PORT"] = port
    assert not Tweet.objects.exists() and not OutboxEntry.objects.exists()
    time.sleep(0.3)
    assert read_all(redis_client, outbox_django) == []


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_row_postgres_refuses_fails_its_save_and_writes_nothing(
        outbox_django: Settings, redis_client: redis.Redis) -> None:
    with pytest.raises(DataError, match="NUL"):
        Tweet.objects.create(author="ann", text="nul \x00 inside")
    assert not Tweet.objects.exists() and not OutboxEntry.objects.exists()
    assert read_all(redis_client, outbox_django) == []


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_connection_lost_in_the_middle_of_a_save_leaves_nothing_half_written(
        outbox_django: Settings, redis_client: redis.Redis) -> None:
    """The session dies between the row's INSERT and the entry's: the row is not kept."""
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE FUNCTION scalepub_test_die() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NEW; END $$; "
            "CREATE TRIGGER scalepub_test_die BEFORE INSERT ON scalepub_outbox "
            "FOR EACH ROW EXECUTE FUNCTION scalepub_test_die()")
    try:
        with pytest.raises(DatabaseError):
            Tweet.objects.create(author="ann", text="half")
    finally:
        connection.close()
        with connection.cursor() as cursor:
            cursor.execute("DROP FUNCTION scalepub_test_die() CASCADE")
    assert not Tweet.objects.exists() and not OutboxEntry.objects.exists()
    assert read_all(redis_client, outbox_django) == []
    Tweet.objects.create(author="ann", text="whole")  # the next save works
    assert len(wait_for_entries(redis_client, outbox_django, 1)) == 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_missing_migration_on_postgres_is_a_clear_error_at_the_first_save(
        outbox_django: Settings) -> None:
    from django.core.checks import run_checks

    call_command("migrate", "scalepub", "zero", verbosity=0)
    try:
        warned = [m for m in run_checks(databases=["default"]) if m.id == "scalepub.W001"]
        assert warned and "0001_initial" in warned[0].msg
        with pytest.raises(OutboxTableMissing, match=r"manage\.py migrate"):
            Tweet.objects.create(author="ann", text="no outbox table")
        assert not Tweet.objects.exists()  # rolled back with it, the connection still usable
    finally:
        call_command("migrate", "scalepub", verbosity=0)
    with connection.cursor() as cursor:  # migration 0002 put the notify trigger back
        cursor.execute("SELECT tgname FROM pg_trigger WHERE tgname = 'scalepub_outbox_notify'")
        assert cursor.fetchall() == [("scalepub_outbox_notify",)]
    call_command("migrate", "scalepub", "0001", verbosity=0)  # an install that lacks 0002
    try:
        [warned] = [m for m in run_checks(databases=["default"]) if m.id == "scalepub.W001"]
        assert "0002_outbox_notify" in warned.msg and "saves work" in warned.msg
        Tweet.objects.create(author="ann", text="saved without the trigger")
    finally:
        call_command("migrate", "scalepub", verbosity=0)
