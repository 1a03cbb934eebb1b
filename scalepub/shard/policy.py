"""What a shard does when publishing fails: send as is, retry later, create the node first,
split, or dead-letter.

A pure function of the failure and the batch's history, so the rules can be read in one
place and tested as a table (tests/test_policy.py); publisher.py and reader.py carry them out.
The guarantees it keeps: a batch of several entries is never dead-lettered (it is split
until the entry at fault stands alone), and every failure but AUTH ends in a bounded number
of steps. AUTH (the account may not publish there) and NO_SERVICE (the server knows no
such pubsub service: PUBSUB_SERVICE is wrong) are retried for ever: the operator fixes them,
and dropping entries for a permission or configuration problem would lose data.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# A batch in flight at this many connection losses is split; a single entry is dead-lettered.
SPLIT_AFTER_RESENDS = 2
DEAD_AFTER_RESENDS = 5
# After this many transient refusals a batch is treated as refused for its content.
MAX_TRANSIENT_RETRIES = 8
TRANSIENT_CONDITIONS = frozenset({
    "internal-server-error", "resource-constraint", "remote-server-timeout",
    "service-unavailable", "recipient-unavailable",
})
# item-not-found: most likely the node's auto-creation aborted (ejabberd's mnesia
# transaction, when two connections auto-create nodes at once): the batch goes to node
# creation (creator.py) this many times, counted as retries; after that its refusals are
# transient ones (retried with a delay up to MAX_TRANSIENT_RETRIES, then split).
MISSING_NODE_TRIES = 3
# The n-th transient retry waits TRANSIENT_RETRY_BASE_S * 2**n, at most TRANSIENT_RETRY_MAX_S.
TRANSIENT_RETRY_BASE_S = 0.05
TRANSIENT_RETRY_MAX_S = 5.0
AUTH_RETRY_S = 5.0
# Redis calls: a try is cheap and recovery after an outage waits for the next one, so the
# cap is low. An XMPP reconnect costs a TLS handshake and a SASL login: it backs off further.
REDIS_RETRY_FIRST_S = 0.1
REDIS_RETRY_MAX_S = 2.0
RECONNECT_FIRST_S = 0.2
RECONNECT_MAX_S = 5.0


class Failure(enum.Enum):
    """Why a batch (or one entry) could not be published."""

    REFUSED_TRANSIENT = "refused_transient"  # error type wait, or a TRANSIENT_CONDITION
    REFUSED_CONTENT = "refused_content"  # any other refusal: something in the batch
    AUTH = "auth"  # error type auth: the account may not publish to the node (now)
    NO_SERVICE = "no_service"  # remote-server-not-found: no such pubsub service (a setting)
    MISSING_NODE = "missing_node"  # item-not-found: the node does not exist (yet)
    CONNECTION_LOST = "connection_lost"  # in flight when the link dropped; now re-sent
    UNREADABLE_ENTRY = "unreadable_entry"  # the envelope does not decode, or a bad node
    TOO_LARGE = "too_large"  # one entry alone exceeds batch_max_bytes
    NOT_WELL_FORMED = "not_well_formed"  # XML 1.0 cannot carry the entry


class Action(enum.Enum):
    """What the worker does with the batch."""

    SEND = "send"  # publish it as it is (now)
    RETRY = "retry"  # publish it as it is after ``delay_s``, counting one more retry
    CREATE_NODE = "create_node"  # create its node, then publish it, counting one more retry
    SPLIT = "split"  # publish its two halves instead, in order
    DEAD_LETTER = "dead_letter"  # move its single entry to the dead-letter stream


@dataclass(frozen=True, slots=True)
class History:
    """What the policy needs to know of a batch."""

    entries: int
    resends: int = 0  # times it was in flight when the connection dropped
    retries: int = 0  # times the server refused it transiently (or for auth)


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer."""

    action: Action
    delay_s: float = 0.0  # RETRY: how long to wait
    reason: str = ""  # DEAD_LETTER: stored with the entry; SPLIT: why, for the log
    resends: int = 0  # SPLIT: the resend count each half starts with


SEND = Decision(Action.SEND)
CREATE_NODE = Decision(Action.CREATE_NODE)


def classify(error_type: str, condition: str) -> Failure:
    """The failure a refusal stands for, from the XMPP error type and condition."""
    if error_type == "auth":
        return Failure.AUTH
    if condition == "remote-server-not-found":  # about the addressee, never the content
        return Failure.NO_SERVICE
    if condition == "item-not-found":
        return Failure.MISSING_NODE
    if error_type == "wait" or condition in TRANSIENT_CONDITIONS:
        return Failure.REFUSED_TRANSIENT
    return Failure.REFUSED_CONTENT


def decide(failure: Failure, batch: History, detail: str = "") -> Decision:
    """The next step for a batch that met ``failure``.

    ``detail`` says what happened in words (the server's answer, the parser's complaint, the
    byte cap): it becomes part of the reason.
    """
    if failure is Failure.CONNECTION_LOST:
        return _after_connection_loss(batch)
    if failure in (Failure.AUTH, Failure.NO_SERVICE):
        return Decision(Action.RETRY, delay_s=AUTH_RETRY_S)
    if failure is Failure.MISSING_NODE and batch.retries < MISSING_NODE_TRIES:
        return CREATE_NODE
    if (failure in (Failure.REFUSED_TRANSIENT, Failure.MISSING_NODE)
            and batch.retries < MAX_TRANSIENT_RETRIES):
        return Decision(Action.RETRY, delay_s=transient_delay(batch.retries + 1))
    reason = _describe(failure, detail)
    if batch.entries > 1:  # isolate the entry at fault: never dead-letter its neighbours
        return Decision(Action.SPLIT, reason=reason)
    return Decision(Action.DEAD_LETTER, reason=reason)


def _after_connection_loss(batch: History) -> Decision:
    # The batch may be what made the server drop the connection: after a few losses, halve
    # it, keeping most of its count so the halves are halved again if the losses go on.
    if batch.entries > 1 and batch.resends >= SPLIT_AFTER_RESENDS:
        return Decision(Action.SPLIT, resends=batch.resends - 1,
                        reason=f"connection lost {batch.resends} times while publishing it")
    if batch.entries == 1 and batch.resends >= DEAD_AFTER_RESENDS:
        return Decision(Action.DEAD_LETTER,
                        reason=f"connection lost {batch.resends} times while publishing it")
    return SEND


def _describe(failure: Failure, detail: str) -> str:
    if failure is Failure.UNREADABLE_ENTRY:
        return f"unreadable entry: {detail}"
    if failure is Failure.TOO_LARGE:
        return f"entry larger than batch_max_bytes ({detail})"
    if failure is Failure.NOT_WELL_FORMED:
        return detail or "not well-formed XML"
    return f"refused by the XMPP server: {detail}"


def transient_delay(retry: int) -> float:
    """Seconds before the ``retry``-th transient retry (from 1): doubling, capped."""
    return min(TRANSIENT_RETRY_BASE_S * 2.0 ** retry, TRANSIENT_RETRY_MAX_S)


def backoff(delay: float, cap: float) -> float:
    """The next delay of a doubling backoff."""
    return min(delay * 2, cap)
