"""The recovery policy as a table: failure + batch history → decision. Pure, no I/O.

Each row pins one rule; changing a rule (a constant, a delay, an order of checks) fails a row.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scalepub.shard.policy import (
    AUTH_RETRY_S,
    MAX_TRANSIENT_RETRIES,
    MISSING_NODE_TRIES,
    RECONNECT_FIRST_S,
    RECONNECT_MAX_S,
    REDIS_RETRY_FIRST_S,
    REDIS_RETRY_MAX_S,
    TRANSIENT_RETRY_MAX_S,
    Action,
    Decision,
    Failure,
    History,
    backoff,
    classify,
    decide,
)

RETRY, SPLIT, DEAD, SEND = Action.RETRY, Action.SPLIT, Action.DEAD_LETTER, Action.SEND
CREATE = Action.CREATE_NODE
F = Failure

LOST_5 = "connection lost 5 times while publishing it"
LOST_6 = "connection lost 6 times while publishing it"
TOO_BIG = "modify/not-acceptable: payload too big"
REFUSED = f"refused by the XMPP server: {TOO_BIG}"
BUSY = "wait/resource-constraint"
NOT_FOUND = "cancel/item-not-found"

ROWS: list[tuple[Failure, History, str, Decision]] = [
    # Connection lost while in flight: re-sent as is twice, then halved, the halves keeping
    # one resend less; a single entry goes on until its fifth loss.
    (F.CONNECTION_LOST, History(10, resends=1), "", Decision(SEND)),
    (F.CONNECTION_LOST, History(10, resends=2), "",
     Decision(SPLIT, resends=1, reason="connection lost 2 times while publishing it")),
    (F.CONNECTION_LOST, History(2, resends=4), "",
     Decision(SPLIT, resends=3, reason="connection lost 4 times while publishing it")),
    (F.CONNECTION_LOST, History(250, resends=2, retries=8), "",
     Decision(SPLIT, resends=1, reason="connection lost 2 times while publishing it")),
    (F.CONNECTION_LOST, History(1, resends=1), "", Decision(SEND)),
    (F.CONNECTION_LOST, History(1, resends=4), "", Decision(SEND)),
    (F.CONNECTION_LOST, History(1, resends=4, retries=8), "", Decision(SEND)),
    (F.CONNECTION_LOST, History(1, resends=5), "", Decision(DEAD, reason=LOST_5)),
    (F.CONNECTION_LOST, History(1, resends=6), "", Decision(DEAD, reason=LOST_6)),
    # Transient refusals: retried with a doubling delay from 0.1 s, capped at 5 s; after
    # 8 retries the batch counts as refused for its content.
    (F.REFUSED_TRANSIENT, History(10), BUSY, Decision(RETRY, delay_s=0.1)),
    (F.REFUSED_TRANSIENT, History(1), BUSY, Decision(RETRY, delay_s=0.1)),
    (F.REFUSED_TRANSIENT, History(10, retries=1), BUSY, Decision(RETRY, delay_s=0.2)),
    (F.REFUSED_TRANSIENT, History(10, retries=3), BUSY, Decision(RETRY, delay_s=0.8)),
    (F.REFUSED_TRANSIENT, History(10, retries=5), BUSY, Decision(RETRY, delay_s=3.2)),
    (F.REFUSED_TRANSIENT, History(10, retries=6), BUSY, Decision(RETRY, delay_s=5.0)),
    (F.REFUSED_TRANSIENT, History(1, resends=3, retries=7), BUSY, Decision(RETRY, delay_s=5.0)),
    (F.REFUSED_TRANSIENT, History(10, retries=8), BUSY,
     Decision(SPLIT, reason=f"refused by the XMPP server: {BUSY}")),
    (F.REFUSED_TRANSIENT, History(1, retries=8), BUSY,
     Decision(DEAD, reason=f"refused by the XMPP server: {BUSY}")),
    # Refused for its content: split down to the entry at fault, which alone is dead-lettered.
    (F.REFUSED_CONTENT, History(50), TOO_BIG, Decision(SPLIT, reason=REFUSED)),
    (F.REFUSED_CONTENT, History(2, resends=1), TOO_BIG, Decision(SPLIT, reason=REFUSED)),
    (F.REFUSED_CONTENT, History(1), TOO_BIG, Decision(DEAD, reason=REFUSED)),
    (F.REFUSED_CONTENT, History(1, resends=4, retries=3), TOO_BIG, Decision(DEAD, reason=REFUSED)),
    # item-not-found: the node's auto-creation most likely aborted: sent to node creation
    # three times (counted as retries), then refused transiently like the others.
    (F.MISSING_NODE, History(10), NOT_FOUND, Decision(CREATE)),
    (F.MISSING_NODE, History(1, retries=2), NOT_FOUND, Decision(CREATE)),
    (F.MISSING_NODE, History(10, resends=3, retries=1), NOT_FOUND, Decision(CREATE)),
    (F.MISSING_NODE, History(10, retries=3), NOT_FOUND, Decision(RETRY, delay_s=0.8)),
    (F.MISSING_NODE, History(10, retries=7), NOT_FOUND, Decision(RETRY, delay_s=5.0)),
    (F.MISSING_NODE, History(10, retries=8), NOT_FOUND,
     Decision(SPLIT, reason=f"refused by the XMPP server: {NOT_FOUND}")),
    (F.MISSING_NODE, History(1, retries=8), NOT_FOUND,
     Decision(DEAD, reason=f"refused by the XMPP server: {NOT_FOUND}")),
    # Not allowed to publish there: retried every 5 s for ever, never dropped.
    (F.AUTH, History(10), "auth/forbidden", Decision(RETRY, delay_s=5.0)),
    (F.AUTH, History(1), "auth/forbidden", Decision(RETRY, delay_s=5.0)),
    (F.AUTH, History(1, retries=1000), "auth/forbidden", Decision(RETRY, delay_s=5.0)),
    # PUBSUB_SERVICE names no service: a setting to fix, not entries to drop
    (F.NO_SERVICE, History(10), "cancel/remote-server-not-found", Decision(RETRY, delay_s=5.0)),
    (F.NO_SERVICE, History(1, retries=1000), "", Decision(RETRY, delay_s=5.0)),
    # One entry that cannot be published at all: dead-lettered at once, saying why.
    (F.UNREADABLE_ENTRY, History(1), "not msgpack: FormatError",
     Decision(DEAD, reason="unreadable entry: not msgpack: FormatError")),
    (F.TOO_LARGE, History(1), "128000 B",
     Decision(DEAD, reason="entry larger than batch_max_bytes (128000 B)")),
    (F.NOT_WELL_FORMED, History(1), "not well-formed XML: not well-formed (invalid token)",
     Decision(DEAD, reason="not well-formed XML: not well-formed (invalid token)")),
    (F.NOT_WELL_FORMED, History(1), "", Decision(DEAD, reason="not well-formed XML")),
    # ... and never with neighbours: a batch is split to isolate it.
    (F.TOO_LARGE, History(3), "128000 B",
     Decision(SPLIT, reason="entry larger than batch_max_bytes (128000 B)")),
]


@pytest.mark.parametrize(("failure", "batch", "detail", "expected"), ROWS,
                         ids=[f"{f.name}-{b.entries}e-{b.resends}s-{b.retries}r"
                              for f, b, _, _ in ROWS])
def test_decision_table(failure: Failure, batch: History, detail: str,
                        expected: Decision) -> None:
    assert decide(failure, batch, detail) == expected


@pytest.mark.parametrize(("error_type", "condition", "failure"), [
    ("wait", "resource-constraint", F.REFUSED_TRANSIENT),
    ("wait", "policy-violation", F.REFUSED_TRANSIENT),  # any "wait" is worth waiting for
    ("cancel", "internal-server-error", F.REFUSED_TRANSIENT),
    ("cancel", "remote-server-timeout", F.REFUSED_TRANSIENT),
    ("cancel", "service-unavailable", F.REFUSED_TRANSIENT),
    ("cancel", "recipient-unavailable", F.REFUSED_TRANSIENT),
    ("cancel", "item-not-found", F.MISSING_NODE),  # e.g. ejabberd's node auto-create race
    ("wait", "item-not-found", F.MISSING_NODE),
    ("modify", "not-acceptable", F.REFUSED_CONTENT),
    ("modify", "bad-request", F.REFUSED_CONTENT),
    ("cancel", "conflict", F.REFUSED_CONTENT),
    ("cancel", "feature-not-implemented", F.REFUSED_CONTENT),
    ("cancel", "undefined-condition", F.REFUSED_CONTENT),
    ("auth", "forbidden", F.AUTH),
    ("auth", "not-authorized", F.AUTH),
    ("cancel", "remote-server-not-found", F.NO_SERVICE),  # e.g. a wrong PUBSUB_SERVICE
])
def test_refusals_are_classified_by_type_and_condition(error_type: str, condition: str,
                                                       failure: Failure) -> None:
    assert classify(error_type, condition) is failure


histories = st.builds(History, entries=st.integers(1, 1000), resends=st.integers(0, 20),
                      retries=st.integers(0, 20))


@given(st.sampled_from(Failure), histories, st.text(max_size=20))
def test_several_entries_are_never_dead_lettered_together(failure: Failure, batch: History,
                                                          detail: str) -> None:
    decision = decide(failure, batch, detail)
    assert decision.action is not DEAD or batch.entries == 1
    assert decision.action is not RETRY or 0 < decision.delay_s <= max(TRANSIENT_RETRY_MAX_S,
                                                                      AUTH_RETRY_S)
    assert decision.resends >= 0


def _halves(entries: int) -> tuple[int, int]:
    """The entry counts of Batch.split()'s halves."""
    return entries // 2, entries - entries // 2


def _resolve(failure: Failure, entries: int) -> tuple[list[int], int, list[float]]:
    """Run the policy against a server that fails every attempt with ``failure``.

    Returns the sizes of the batches dead-lettered, the attempts made and every retry delay.
    A connection loss is seen when the batch is sent again (its resends count one more).
    """
    start = History(entries, resends=1) if failure is F.CONNECTION_LOST else History(entries)
    todo, dead, attempts, delays = [start], [], 0, []
    while todo:
        batch = todo.pop()
        attempts += 1
        assert attempts < 10_000, "the policy does not converge"
        decision = decide(failure, batch, "detail")
        if decision.action is SEND:  # lost again
            todo.append(History(batch.entries, batch.resends + 1, batch.retries))
        elif decision.action is RETRY:
            delays.append(decision.delay_s)
            todo.append(History(batch.entries, batch.resends, batch.retries + 1))
        elif decision.action is CREATE:  # created, then refused again
            todo.append(History(batch.entries, batch.resends, batch.retries + 1))
        elif decision.action is SPLIT:
            first, second = _halves(batch.entries)
            todo += [History(n, decision.resends) for n in (second, first) if n]
        else:
            dead.append(batch.entries)
    return dead, attempts, delays


@given(st.sampled_from([f for f in Failure if f not in (F.AUTH, F.NO_SERVICE)]),
       st.integers(1, 300))
def test_every_failure_but_auth_ends_with_each_entry_dead_lettered_once(
        failure: Failure, entries: int) -> None:
    dead, _, delays = _resolve(failure, entries)
    assert dead == [1] * entries
    # retries are bounded: at most MAX_TRANSIENT_RETRIES per batch, delays never shrink
    # within a batch and never exceed the cap
    assert len(delays) <= MAX_TRANSIENT_RETRIES * (2 * entries - 1)
    assert all(0 < d <= TRANSIENT_RETRY_MAX_S for d in delays)


def test_a_missing_node_is_created_three_times_then_retried_as_transient() -> None:
    steps = []
    batch = History(1)
    while (decision := decide(F.MISSING_NODE, batch, NOT_FOUND)).action in (CREATE, RETRY):
        steps.append(decision.delay_s if decision.action is RETRY else "create")
        batch = History(1, retries=batch.retries + 1)
    assert steps == ["create"] * MISSING_NODE_TRIES + [0.8, 1.6, 3.2, 5.0, 5.0]
    assert decision == Decision(DEAD, reason=f"refused by the XMPP server: {NOT_FOUND}")


def test_transient_retries_of_one_batch_are_bounded_and_grow() -> None:
    delays = []
    batch = History(1)
    while (decision := decide(F.REFUSED_TRANSIENT, batch, BUSY)).action is RETRY:
        delays.append(decision.delay_s)
        batch = History(1, retries=batch.retries + 1)
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert len(delays) == MAX_TRANSIENT_RETRIES
    assert decision == Decision(DEAD, reason=f"refused by the XMPP server: {BUSY}")


@pytest.mark.parametrize(("first", "cap", "expected"), [
    (REDIS_RETRY_FIRST_S, REDIS_RETRY_MAX_S, [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]),
    (RECONNECT_FIRST_S, RECONNECT_MAX_S, [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]),
])
def test_redis_retries_and_xmpp_reconnects_back_off_to_their_caps(
        first: float, cap: float, expected: list[float]) -> None:
    delays = [first]
    while len(delays) < len(expected):
        delays.append(backoff(delays[-1], cap))
    assert delays == pytest.approx(expected)
