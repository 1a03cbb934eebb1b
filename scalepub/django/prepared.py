"""PostgreSQL: the one-statement create (``onestatement``) as a named prepared statement.

Django's psycopg cursor binds parameters on the client by default: every save sends a new
text, which the server parses and plans again. For the create's data-modifying CTE (two
INSERTs, the outbox's statement trigger) that was most of what a registered save cost beyond
a plain one (docs/benchmarks.md, ingest, fourth pass). Here that one statement is parsed and
planned once per connection and then only bound and executed, its parameters sent apart from
the text (server-side binding); every other statement keeps Django's cursor.

Django leaves psycopg's own prepared statements off (``prepare_threshold`` None) for the sake
of transaction-mode connection poolers: psycopg names them ``_pg3_0``, ``_pg3_1``... per client
connection, and behind such a pooler a name can reach a server session where it is another
client's statement. The name here is a hash of the statement's text and parameter types, so
wherever it exists it is this very statement. A session that lacks it (``DEALLOCATE ALL``,
``DISCARD ALL``, a pooler moved the client) or has it from someone else answers with an error
before the statement ran; under autocommit nothing was written. A missing statement is
prepared again, once; if that misses too (behind a transaction-mode pooler the Parse and the
Bind can reach different server sessions), or the name was taken, the statement is sent
unprepared, that connection stops preparing, and after MAX_MISSES such misses the process
stops on that database and says so once.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import psycopg
from psycopg import errors, pq

try:  # private to psycopg (3.1-3.3): a later release without it turns preparing off, never a save
    from psycopg._preparing import Prepare  # what the private hook _get_prepared answers
except ImportError:  # pragma: no cover - depends on the installed psycopg
    Prepare = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

# False: the create's statement goes out as Django sends it (client-side binding). Not a
# setting: the A/B switch of loadtest/bench_ingest.py and of the tests.
ENABLED = True
# Prepared statements per connection, at most (a model's create has one text per set of
# parameter types; a text that varies per row, e.g. an expression in a field, would add one
# per save): beyond it, statements go unprepared.
MAX_PER_SESSION = 64
# Misses (a name the server did not have, or had already) per database before this process
# stops preparing there.
MAX_MISSES = 3
# What a session that does not hold our statement as we left it answers, always before the
# statement ran: no such statement, a statement of that name exists (a pooler's session), the
# cached plan's result type changed (a migration altered the table).
_MISSED = (errors.InvalidSqlStatementName, errors.DuplicatePreparedStatement,
           errors.FeatureNotSupported)
_SESSION = "scalepub_prepared_session"  # attribute of Django's connection
_misses: dict[str, int] = {}
# The psycopg cursor's hooks this module overrides (psycopg 3.1-3.3; private, so checked).
_SUPPORTED = Prepare is not None and all(
    hasattr(psycopg.Cursor, hook)
    for hook in ("_get_prepared", "_send_query_prepared"))
_names: dict[tuple[bytes, tuple[int, ...]], bytes] = {}


class _Session:
    """What one driver connection (one server session) has prepared."""

    __slots__ = ("names", "off", "raw")

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.names: set[bytes] = set()
        self.off = False  # a miss happened here: this session prepares no more


def bind(context: Any) -> bool:
    """Let the Django cursor of an execute wrapper's ``context`` send its next statement as a
    named prepared statement; False (nothing changed) where that cannot be done."""
    connection, wrapper = context["connection"], context["cursor"]
    alias = connection.alias
    if not ENABLED or not _SUPPORTED or _misses.get(alias, 0) >= MAX_MISSES:
        return False
    raw = connection.connection
    client = getattr(wrapper, "cursor", None)
    if (not isinstance(raw, psycopg.Connection) or not isinstance(client, psycopg.Cursor)
            or raw.pgconn.pipeline_status != pq.PipelineStatus.OFF):
        return False
    session = getattr(connection, _SESSION, None)
    if session is None or session.raw is not raw:  # a new connection: a new server session
        session = _Session(raw)
        setattr(connection, _SESSION, session)
    if session.off:
        return False
    wrapper.cursor = _Cursor(raw, session, alias)
    client.close()  # Django's wrapper closes the new one when the statement is done
    return True


class _Cursor(psycopg.Cursor[Any]):
    """A server-side binding cursor whose statements are prepared under content names."""

    def __init__(self, connection: psycopg.Connection[Any], session: _Session,
                 alias: str) -> None:
        super().__init__(connection)
        self._session, self._alias = session, alias

    def execute(self, query: Any, params: Any = None, *, prepare: bool | None = None,
                binary: bool | None = None) -> Any:
        """psycopg's execute; a statement the session did not hold is prepared again once
        (its prepared statements were dropped: DEALLOCATE ALL, which psycopg itself sends
        after a rollback when ``prepare_threshold`` is set), then sent unprepared."""
        try:
            return super().execute(query, params, prepare=prepare, binary=binary)
        except _MISSED as exc:
            if not self._idle():
                raise
            if not isinstance(exc, errors.InvalidSqlStatementName):
                return self._unprepared(exc, query, params, binary)
            self._session.names.clear()
        try:
            return super().execute(query, params, prepare=prepare, binary=binary)
        except _MISSED as exc:
            if not self._idle():
                raise
            return self._unprepared(exc, query, params, binary)

    def _unprepared(self, exc: Exception, query: Any, params: Any, binary: bool | None) -> Any:
        self._missed(exc)
        return super().execute(query, params, prepare=False, binary=binary)

    def _idle(self) -> bool:
        """Outside a transaction: a failed statement wrote nothing, it may be sent again
        (inside one it is aborted, and a retry would not help)."""
        return bool(self.connection.info.transaction_status == pq.TransactionStatus.IDLE)

    def _get_prepared(self, pgq: Any, prepare: bool | None = None) -> tuple[Prepare, bytes]:
        """psycopg's hook: which statement to use (YES), to prepare first (SHOULD), or none."""
        session = self._session
        if prepare is False or session.off:
            return Prepare.NO, b""
        name = _name(pgq.query, pgq.types)
        if name in session.names:
            return Prepare.YES, name
        if len(session.names) >= MAX_PER_SESSION:
            return Prepare.NO, b""
        return Prepare.SHOULD, name

    def _send_query_prepared(self, name: bytes, *args: Any, **kwargs: Any) -> None:
        # Called once the server holds ``name`` (prepared now or before): recorded even if
        # this execution fails (e.g. a constraint), so the next save does not prepare again.
        self._session.names.add(name)
        super()._send_query_prepared(name, *args, **kwargs)

    def _missed(self, exc: Exception) -> None:
        self._session.off = True
        self._session.names.clear()
        misses = _misses[self._alias] = _misses.get(self._alias, 0) + 1
        level = logging.WARNING if misses == MAX_MISSES else logging.DEBUG
        log.log(level, "scalepub: PostgreSQL session of database %r did not hold the "
                "prepared create statement (%s: %s); sent unprepared%s", self._alias,
                type(exc).__name__, exc, ", and so from now on in this process (a "
                "transaction-mode connection pooler?)" if misses == MAX_MISSES else "")


def _name(query: bytes, types: tuple[int, ...]) -> bytes:
    """The statement's name: a hash of its text and parameter types (a parameter's type is
    fixed when it is prepared, and psycopg picks an int's by its size)."""
    key = (query, types)
    name = _names.get(key)
    if name is None:
        if len(_names) > 4 * MAX_PER_SESSION:
            _names.clear()
        digest = hashlib.blake2b(query + repr(types).encode(), digest_size=20).hexdigest()
        name = _names[key] = f"scalepub_{digest}".encode()
    return name
