"""New nodes in a burst (issue 16 §2): explicit creation under the pool-wide lock.

Against the real ejabberd and Redis of the session's stack. ejabberd 23.01 aborts node
creations that run at once on several connections (docs/benchmarks.md, "Node-creation
burst"); the creator lets one connection create at a time, so none of its creates is refused.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis
import redis.asyncio as aredis

from scalepub.settings import Settings
from scalepub.shard import creator as creator_module
from scalepub.shard.creator import NodeCreator
from scalepub.sharding import Keys
from scalepub.xmpp.batch import Batch, Entry, entry_part, node_attr, publish_iq, publish_options
from scalepub.xmpp.link import Reply, XmppLink
from scalepub.xmpp.nodeconfig import create_iq

pytestmark = pytest.mark.stack


def batch_for(node: str) -> Batch:
    batch = Batch(node, 0)
    batch.add(Entry(b"1-0", node, 1, 1, entry_part(
        node=node.encode(), seq=1, stream_id=b"1-0", ts_ns=1, model=b"a.b", pk=b"1",
        fmt=b"xml", payload=b"<p/>")))
    return batch


class Session:
    """One publisher connection whose create replies go to a NodeCreator."""

    def __init__(self, settings: Settings, client: Any, name: str) -> None:
        self.ready: list[Batch] = []
        self.replies: dict[str, Reply] = {}
        self.link = XmppLink(settings, f"creator-test-{name}-{uuid.uuid4().hex[:6]}",
                             self._awaits, self._on_reply, lambda: None)
        self.creator = NodeCreator(client, Keys(settings.key_prefix).node_creation, self.link,
                                   settings.pubsub_service, settings.node_access_model,
                                   self.ready.append, lambda: True, name)
        self.own: dict[str, asyncio.Future[Reply]] = {}

    def _awaits(self, iq_id: str) -> bool:
        return iq_id in self.creator.inflight or iq_id in self.own

    def _on_reply(self, reply: Reply) -> None:
        if reply.iq_id in self.own:
            self.own.pop(reply.iq_id).set_result(reply)
        else:
            self.creator.on_reply(reply)

    async def request(self, make: Any) -> Reply:
        iq_id = self.link.new_id()
        self.own[iq_id] = asyncio.get_running_loop().create_future()
        future = self.own[iq_id]
        self.link.send(make(iq_id))
        return await asyncio.wait_for(future, 10)

    async def created(self, count: int, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while len(self.ready) < count:
                await asyncio.sleep(0.02)


def refusals(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every create refusal any creator sees (other than conflict), as ``node: reason``."""
    seen: list[str] = []
    original = NodeCreator.on_reply

    def on_reply(self: NodeCreator, reply: Reply) -> None:
        if not reply.ok and reply.condition != "conflict":
            seen.append(f"{self.inflight[reply.iq_id].node}: {reply.reason}")
        original(self, reply)

    monkeypatch.setattr(NodeCreator, "on_reply", on_reply)
    return seen


async def burst(settings: Settings, client: Any, sessions: int, nodes: int) -> list[Session]:
    run = uuid.uuid4().hex[:8]
    made = [Session(settings, client, f"s{k}") for k in range(sessions)]
    for s in made:
        await s.link.connect()
    for k, s in enumerate(made):  # disjoint nodes per connection, parked all at once
        for i in range(k, nodes, sessions):
            s.creator.park(batch_for(f"/creator-test/{run}/n{i}"))
    for k, s in enumerate(made):
        await s.created(len(range(k, nodes, sessions)))
    return made


def test_concurrent_connections_create_without_a_single_refusal(
        settings_for: Settings, redis_client: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Four connections park 400 new nodes at once: all created, none refused (without the
    lock 20-70 % of such creates are refused internal-server-error), the lock is free after,
    and parking the same nodes again finds them existing (conflict counts as created)."""
    refused = refusals(monkeypatch)

    async def main() -> None:
        client = aredis.Redis.from_url(settings_for.redis_url)
        made = await burst(settings_for, client, 4, 400)
        assert refused == []
        assert sum(s.creator.created for s in made) == 400
        assert sum(len(s.ready) for s in made) == 400
        assert await client.exists(Keys(settings_for.key_prefix).node_creation) == 0
        s = made[0]
        again = list(s.ready)
        s.ready.clear()
        for batch in again:
            s.creator.park(batch)
        await s.created(len(again))
        assert s.creator.existed == len(again)
        for m in made:
            await m.link.close()
        await client.aclose()

    asyncio.run(main())


def test_without_the_lock_concurrent_creates_are_refused(
        settings_for: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reason for the lock, checked against this ejabberd: the same burst with every
    connection holding its own lock (none shared) sees refusals, which the creator retries
    (up to MAX_TRIES, then hands the batch over to be published anyway)."""
    refused = refusals(monkeypatch)
    monkeypatch.setattr(creator_module, "MAX_TRIES", 10)

    async def main() -> None:
        client = aredis.Redis.from_url(settings_for.redis_url)
        run = uuid.uuid4().hex[:6]
        made = []
        for k in range(4):  # a lock key of its own for each: no mutual exclusion
            s = Session(settings_for, client, f"u{k}")
            s.creator.lock_key = f"{settings_for.key_prefix}:{{nodes}}:own-{run}-{k}"
            await s.link.connect()
            made.append(s)
        for k, s in enumerate(made):
            for i in range(k, 400, 4):
                s.creator.park(batch_for(f"/creator-test/{run}/u{i}"))
        for s in made:
            await s.created(100)
        for s in made:
            await s.link.close()
        await client.aclose()

    asyncio.run(main())
    assert refused, "ejabberd no longer aborts concurrent creations: the lock may be moot"


def test_a_whitelist_node_created_explicitly_takes_whitelist_publishes(
        settings_for: Settings) -> None:
    """A create carries the access model the publishes' publish-options ask for; otherwise
    ejabberd would refuse every publish to the node (precondition-not-met)."""
    settings = settings_for.replace(node_access_model="whitelist")

    async def main() -> None:
        client = aredis.Redis.from_url(settings.redis_url)
        s = Session(settings, client, "wl")
        await s.link.connect()
        node = f"/creator-test/{uuid.uuid4().hex[:8]}/whitelisted"
        made = await s.request(lambda i: create_iq(i, settings.pubsub_service,
                                                   node_attr(node.encode()), "whitelist"))
        assert made.ok, made.reason
        again = await s.request(lambda i: create_iq(i, settings.pubsub_service,
                                                    node_attr(node.encode()), "whitelist"))
        assert again.condition == "conflict"
        published = await s.request(lambda i: publish_iq(
            i, settings.pubsub_service, batch_for(node), publish_options("whitelist")))
        assert published.ok, published.reason
        await s.link.close()
        await client.aclose()

    asyncio.run(main())
