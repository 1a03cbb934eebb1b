"""Exit codes of ``scalepub`` commands and shard processes, and which error means which: once."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scalepub.settings import Settings

OK = 0
FAILURE = 1  # an unexpected error (a bug): the traceback is logged
USAGE = 2  # bad command line or settings (click also uses 2)
XMPP_UNREACHABLE = 3
XMPP_AUTH = 4
REDIS_UNREACHABLE = 5
SHARD_COUNT_MISMATCH = 6
UNHEALTHY = 7  # `scalepub status`: a shard is dead or stuck
INTERRUPTED = 130  # stopped at once by a second signal (128 + SIGINT)

# A shard exiting with one of these would fail the same way again: the pool stops.
FATAL = frozenset({USAGE, XMPP_AUTH, SHARD_COUNT_MISMATCH})

# The errors a user can cause or fix, by the class that raises them (a subclass maps like its
# nearest listed base). Names rather than imports: `scalepub status` and a shard process can
# map an error without loading slixmpp, redis or the pool, and this module stays below every
# layer. tests/test_exitcodes.py checks that each name is a real exception class.
BY_CLASS: dict[str, int] = {
    "scalepub.settings.SettingsError": USAGE,
    "scalepub.nodes.InvalidNodeName": USAGE,  # a node name given on the command line
    "scalepub.xmpp.link.XmppUnreachable": XMPP_UNREACHABLE,
    "scalepub.xmpp.link.XmppAuthError": XMPP_AUTH,
    "redis.exceptions.ConnectionError": REDIS_UNREACHABLE,  # AuthenticationError too
    "redis.exceptions.TimeoutError": REDIS_UNREACHABLE,
    "scalepub.shard.streams.ShardCountMismatch": SHARD_COUNT_MISMATCH,
}


def for_exception(exc: BaseException) -> int:
    """The exit code an error ends a command with; ``FAILURE`` for any error not listed."""
    for cls in type(exc).__mro__:
        code = BY_CLASS.get(f"{cls.__module__}.{cls.__qualname__}")
        if code is not None:
            return code
    return FAILURE


def explain(exc: BaseException, settings: Settings) -> str:
    """One line for the user: the error's own message, plus where Redis is for a Redis one."""
    if for_exception(exc) == REDIS_UNREACHABLE:
        return f"cannot reach Redis at {settings.redis_url_redacted}: {exc}"
    return str(exc)


def report(exc: Exception, settings: Settings, say: Callable[[str], object]) -> int:
    """Tell the user why in one line and return the exit code; a bug is raised again."""
    code = for_exception(exc)
    if code == FAILURE:
        raise exc  # unexpected: its traceback is worth more than a line
    say(explain(exc, settings))
    return code
