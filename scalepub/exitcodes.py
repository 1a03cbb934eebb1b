"""Exit codes of ``scalepub`` commands and shard processes, defined once."""

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
