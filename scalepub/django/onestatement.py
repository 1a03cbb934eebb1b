"""A registered create under autocommit as ONE statement: the row and its outbox entry.

In autocommit one statement is its own transaction, so if the model's INSERT also writes the
outbox row, the two commit together or not at all with no BEGIN, no COMMIT and (PostgreSQL)
no second round trip. The entry needs the row's pk, known only inside the statement:

- PostgreSQL: the INSERT becomes a data-modifying CTE, ``WITH r AS (<Django's INSERT ...
  RETURNING pk>), q AS (SELECT set_config('scalepub.notify', ...)), o AS (INSERT INTO
  scalepub_outbox ... SELECT ..., head || r.pk || tail FROM r, q) SELECT * FROM r``; Django
  reads its RETURNING row as before. It goes out as a prepared statement (``prepared``), and
  skips the commit notification while this process's relay leads (``notify.QUIET_SETTING``).
- SQLite (no DML in CTEs): a TEMP trigger per connection and table, ``AFTER INSERT ... WHEN
  scalepub_pending(table)``, whose outbox INSERT takes its values from Python functions of
  this module (they read this thread's pending entry and splice ``NEW.pk`` in; they never
  touch the database connection).

The entry is made right before the INSERT runs (the fields' ``pre_save``, e.g.
``auto_now_add``, has set their values by then) with a sentinel pk, and cut at the sentinel.
This module only says yes where that is exactly the old path's entry; anywhere else
``run`` declines and atomic._Outer begins a transaction as before (``claim``, ``_parts``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db.models import Model
from django.db.models.fields import AutoFieldMixin

from scalepub.django import notify, outbox
from scalepub.django.registry import Registration
from scalepub.django.rowformat import row_format
from scalepub.django.runtime import runtime
from scalepub.django.serialize import plain_payload
from scalepub.nodes import validate_node

# Two pks the real one never is while the row is unsaved: a node rule gives the same node
# for both, and neither appears in it, or its node depends on the pk (then: the old path).
# 19 digits, as long as the longest positive BigAutoField pk: whatever fit the payload limit
# with the sentinel fits with the real pk, so the old path would not have cut a field either.
SENTINELS = (7340912651083426519, 7340912651083426520)
_SENTINEL = str(SENTINELS[0])
# False: every create takes the transaction path. Not a setting: the A/B switch of
# loadtest/bench_ingest.py (the baseline in the same run) and of the tests that show what
# this module changes.
ENABLED = True
# Where it is used. SQLite's path works (tests/test_one_statement.py runs it) but measured
# slower than its transaction (docs/benchmarks.md, ingest, third pass: 1.04-1.08x with the
# relay external, 1.17-1.39x with the relay thread, whose GIL the trigger's call into Python
# waits for while it holds the write lock): BEGIN and COMMIT cost SQLite, in process, less
# than the trigger does. PostgreSQL saves a round trip (0.65-0.77x).
VENDORS = frozenset({"postgresql"})
# False: every one-statement create notifies, even while this process's relay leads (the A/B
# switch of loadtest/bench_ingest.py's mode outbox-nq and of the tests).
QUIET = True
DECLINED: Any = object()  # what ``run`` returns when the statement is left to the old path
_JSON = json.JSONEncoder(ensure_ascii=False)
_TRIGGERS = "scalepub_one_statement_triggers"  # attribute of Django's SQLite connection


@dataclass(slots=True)
class Claim:
    """A create that may run as one statement, from its `_do_insert` until its block ends."""

    instance: Model
    reg: Registration
    using: str


@dataclass(slots=True)
class _Parts:
    """The entry of the row being inserted, cut at its pk."""

    table: str
    node: str
    ts_ns: int
    model: str
    fmt: str
    head: bytes
    tail: bytes
    fired: bool = False

    def json(self) -> str:
        """The values the SQLite trigger reads, in one text (one call into Python per row:
        each call waits for the GIL, which another thread, the relay's, may hold)."""
        return _JSON.encode([self.node, self.ts_ns, self.model, self.fmt,
                             self.head.decode(), self.tail.decode()])


class _State(threading.local):
    def __init__(self) -> None:
        self.claim: Claim | None = None  # the block's create (atomic._Outer)
        self.inserting: Model | None = None  # that create inside its _do_insert
        self.written: Model | None = None  # its entry went with the INSERT
        self.pending: _Parts | None = None  # SQLite: read by the trigger's functions


_state = _State()


def claim(instance: Model, reg: Registration, using: str, vendor: str) -> Claim | None:
    """A Claim if the INSERT about to run (atomic's ``_do_insert`` hook, outside any
    transaction) is a plain create of a model whose table gets exactly one INSERT with only
    its auto pk returned, in outbox delivery. Receivers of the save's signals do not matter:
    they run outside the create's unit on every path (``post_save`` after its commit)."""
    if not ENABLED or vendor not in VENDORS or instance.pk is not None:
        return None
    if not eligible(type(instance)) or runtime.settings().delivery != "outbox":
        return None
    return Claim(instance, reg, using)


def eligible(model: type[Model]) -> bool:
    """Whether ``model``'s create is one INSERT into its own table returning its auto pk,
    serialized by a prepared serializer with no query of its own (many-to-many)."""
    try:
        return _eligible[model]
    except KeyError:
        meta = model._meta
        ok = _eligible[model] = (
            not meta.proxy and not meta.parents and isinstance(meta.pk, AutoFieldMixin)
            and not meta.local_many_to_many and row_format(model) is not None)
        return ok


_eligible: dict[type[Model], bool] = {}


def begin(claimed: Claim) -> None:
    """The block of ``claimed`` starts (atomic._Outer.__enter__)."""
    _state.claim, _state.written, _state.inserting = claimed, None, None


def end() -> None:
    """The block ends: forget its create."""
    _state.claim = _state.written = _state.inserting = None


def claimed(instance: Model) -> bool:
    """Whether ``instance`` is the create of this thread's block (for the _do_insert hook)."""
    current = _state.claim
    return current is not None and current.instance is instance


def insert(instance: Model, do_insert: Callable[..., Any], args: tuple[Any, ...],
           kwargs: dict[str, Any]) -> Any:
    """Django's ``_do_insert`` for the claimed create: its INSERT is the one ``run`` takes,
    if Django returns nothing but the pk (no db_default, no generated field)."""
    returning, raw = [*args, kwargs.get("returning_fields"), kwargs.get("raw")][3:5]
    if raw or list(returning or ()) != [instance._meta.pk]:
        return do_insert(instance, *args, **kwargs)
    _state.inserting = instance
    try:
        return do_insert(instance, *args, **kwargs)
    finally:
        _state.inserting = None


def run(claimed: Claim, execute: Callable[..., Any], sql: str, params: Any, many: bool,
        context: Any) -> Any:
    """The first statement of the claimed create's block: the INSERT with its entry as one
    statement, or DECLINED (nothing executed) for the old path."""
    instance, connection = claimed.instance, context["connection"]
    if many or _state.inserting is not instance:
        # not the create's own INSERT: a custom field's query, say, or an INSERT returning
        # more than the pk (insert() did not mark it)
        return DECLINED
    table = claimed.instance._meta.db_table
    if not sql.startswith(f"INSERT INTO {connection.ops.quote_name(table)} "):
        return DECLINED
    outbox.require_table(claimed.using)
    parts = _parts(claimed, table)
    if parts is None:
        return DECLINED
    if connection.vendor == "postgresql":
        return _postgresql(claimed, parts, execute, sql, params, context)
    return _sqlite(claimed, parts, execute, sql, params, context)


def take_written(instance: Model) -> bool:
    """Whether ``instance``'s entry went with its INSERT (atomic then writes none)."""
    if _state.written is instance:
        _state.written = None
        return True
    return False


def _parts(claimed: Claim, table: str) -> _Parts | None:
    """The entry with the sentinel pk cut out, or None where that would not be the entry the
    old path writes with the real pk."""
    instance, attname = claimed.instance, claimed.instance._meta.pk.attname
    fmt = runtime.settings().payload_format
    try:
        nodes = set()
        for sentinel in SENTINELS:
            setattr(instance, attname, sentinel)
            nodes.add(validate_node(claimed.reg.node_for(instance)))
        setattr(instance, attname, SENTINELS[0])
        payload = plain_payload(instance, fmt)  # None: cut or altered (logged, counted)
    except Exception:  # the old path raises or logs it, naming the real pk
        return None
    finally:
        setattr(instance, attname, None)
    node = nodes.pop()
    if payload is None or nodes or _SENTINEL in node:
        return None
    pieces = payload.split(_SENTINEL.encode())
    if len(pieces) != 2:
        return None
    head, tail = pieces
    return _Parts(table, node, time.time_ns(), instance._meta.label_lower, fmt, head, tail)


def _postgresql(claimed: Claim, parts: _Parts, execute: Callable[..., Any], sql: str,
                params: Any, context: Any) -> Any:
    one = _ctes.get((claimed.using, sql))
    if one is None:
        one = _cte(context["connection"], claimed, parts.table, sql)
    if not one:
        return DECLINED
    # Quiet: no commit notification (notify.QUIET_SETTING) while this process's relay leads;
    # it is woken here instead, once the statement (its own transaction) has committed.
    quiet = QUIET and runtime.leads(claimed.using)
    extra = [notify.QUIET_SETTING, "off" if quiet else "on", parts.node, parts.ts_ns,
             parts.model, parts.fmt, parts.head, parts.tail]
    from scalepub.django import prepared  # psycopg's: imported where PostgreSQL is in use

    prepared.bind(context)  # parsed and planned once per connection, where it can be
    result = execute(one, [*params, *extra], False, context)
    _state.written = claimed.instance
    if quiet:
        runtime.wake(claimed.using, notified=False)
    return result


def _cte(connection: Any, claimed: Claim, table: str, sql: str) -> str:
    """Django's INSERT ... RETURNING pk (``sql``) as a CTE whose row the outbox INSERT joins
    (set_config, q, runs before that INSERT ends, when the trigger's WHEN is read), or ""
    if ``sql`` returns more than the pk. Cached per database and INSERT text (a model's
    creates share one text): built per save it was most of this function's own time."""
    quote = connection.ops.quote_name
    pk = quote(claimed.instance._meta.pk.column)
    target, columns = outbox.target(claimed.using)
    one = ""
    if sql.endswith(f" RETURNING {quote(table)}.{pk}"):
        key = f"convert_to(r.{pk}::text, 'UTF8')"
        one = (f"WITH r AS ({sql}), q AS (SELECT set_config(%s, %s, true)), "
               f"o AS (INSERT INTO {target} ({', '.join(columns)}) "
               f"SELECT %s, %s, %s, r.{pk}::text, %s, %s || {key} || %s FROM r, q) "
               "SELECT * FROM r")
    if len(_ctes) >= _MAX_CTES:  # texts that vary per row (an expression in a field)
        _ctes.clear()
    _ctes[(claimed.using, sql)] = one
    return one


_ctes: dict[tuple[str, str], str] = {}
_MAX_CTES = 512


def _sqlite(claimed: Claim, parts: _Parts, execute: Callable[..., Any], sql: str,
            params: Any, context: Any) -> Any:
    if not _trigger(context["connection"], claimed):
        return DECLINED
    _state.pending = parts
    try:
        result = execute(sql, params, False, context)
    finally:
        _state.pending = None
    if parts.fired:  # else: no trigger ran (its table was dropped?): atomic writes it
        _state.written = claimed.instance
    else:
        _forget_triggers(context["connection"])
    return result


def _trigger(connection: Any, claimed: Claim) -> bool:
    """Make the SQLite connection's function and the table's TEMP trigger, once each."""
    raw, meta = connection.connection, claimed.instance._meta
    known = getattr(connection, _TRIGGERS, None)
    try:
        if known is None or known[0] is not raw:
            raw.create_function("scalepub_entry", 1, _entry_json)
            known = (raw, set())
            setattr(connection, _TRIGGERS, known)
        if meta.db_table not in known[1]:
            raw.execute(_trigger_sql(connection, claimed.using, meta.db_table, meta.pk.column))
            known[1].add(meta.db_table)
    except sqlite3.Error:  # the driver's own (not Django's) errors: then the old path
        return False
    return True


def _forget_triggers(connection: Any) -> None:
    setattr(connection, _TRIGGERS, None)


def _trigger_sql(connection: Any, using: str, table: str, pk_column: str) -> str:
    """The trigger: for a row inserted while an entry pends for ``table``, one outbox row
    from the entry's JSON (read once: ``LIMIT 1`` keeps SQLite from flattening the subquery
    and calling the function per column), the pk spliced in. The payload is UTF-8 text
    (serialize's output) cast back to a BLOB."""
    quote = connection.ops.quote_name
    target, columns = outbox.target(using)
    pk = f"NEW.{quote(pk_column)}"
    values = [f"json_extract(v, '$[{i}]')" for i in range(4)]
    payload = f"CAST(json_extract(v, '$[4]') || {pk} || json_extract(v, '$[5]') AS BLOB)"
    select = [*values[:3], f"CAST({pk} AS TEXT)", values[3], payload]
    literal = "'" + table.replace("'", "''") + "'"
    return (f"CREATE TEMP TRIGGER IF NOT EXISTS {quote('scalepub_one_' + table)} AFTER INSERT "
            f"ON main.{quote(table)} BEGIN INSERT INTO {target} ({', '.join(columns)}) "
            f"SELECT {', '.join(select)} FROM (SELECT scalepub_entry({literal}) AS v LIMIT 1) "
            "WHERE v IS NOT NULL; END")


def _entry_json(table: str) -> str | None:
    """SQLite function: the pending entry of ``table`` as JSON, once (else NULL: no row)."""
    parts = _state.pending
    if parts is None or parts.fired or parts.table != table:
        return None
    parts.fired = True
    return parts.json()
