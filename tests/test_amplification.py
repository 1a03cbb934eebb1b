"""Subscribe amplification (issue 13 part 3) against the real ejabberd.

A subscribe must not make ejabberd replay the node's last item (up to 128 KB of entries):
ops/ejabberd forces ``send_last_published_item: never`` on every node it creates, and
``scalepub configure-nodes`` applies it to nodes created before. The bytes are counted on
the attacker's own socket (tests/rawxmpp.py), not by scalepub's code.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from scalepub.settings import Settings, env_mapping
from scalepub.xmpp.batch import Batch, Entry, entry_part, publish_iq
from scalepub.xmpp.link import Reply, XmppLink
from scalepub.xmpp.nodeconfig import configure_nodes
from tests.e2e import settings_env
from tests.rawxmpp import RawClient
from tests.stack import STACK, Stack, new_stack, parse_exports

pytestmark = pytest.mark.stack

LAST_ITEM_BYTES = 120_000  # a full batch is up to 128 KB (BATCH_MAX_BYTES)
MAX_PER_SUBSCRIBE = 8 * 1024
NEVER_LINE = "        send_last_published_item: never\n"


def settings_of(stack: Stack) -> Settings:
    return Settings.from_mapping(env_mapping(stack.env), key_prefix=f"a{uuid.uuid4().hex[:8]}")


def big_batch(node: str, seq: int, size: int = LAST_ITEM_BYTES) -> Batch:
    batch = Batch(node, 0)
    part = entry_part(node=node.encode(), seq=seq, stream_id=f"{seq}-0".encode(),
                      ts_ns=time.time_ns(), model=b"t.row", pk=str(seq).encode(), fmt=b"json",
                      payload=b'"' + b"x" * size + b'"')
    batch.add(Entry(f"{seq}-0".encode(), node, seq, time.time_ns(), part, b""))
    return batch


async def publish(settings: Settings, node: str, seq: int) -> Reply:
    """One large item published by the shard's own link and IQ builder."""
    iq_id = f"amp{seq}"
    answer: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
    link = XmppLink(settings, f"amplification-{uuid.uuid4().hex[:6]}", lambda i: i == iq_id,
                    lambda r: None if answer.done() else answer.set_result(r), lambda: None)
    await link.connect(20)
    try:
        link.send(publish_iq(iq_id, settings.pubsub_service, big_batch(node, seq),
                             link.publish_options))
        return await asyncio.wait_for(answer, 20)
    finally:
        await link.close()


def subscribe_bytes(env: dict[str, str], node: str) -> tuple[int, RawClient]:
    """Bytes an anonymous client receives for one subscribe (answer plus 1.5 s after it)."""
    client = RawClient(env["SCALEPUB_XMPP_HOST"], int(env["SCALEPUB_XMPP_PORT"]))
    client.login_anonymous(env["SCALEPUB_ANON_DOMAIN"])
    client.drain(0.3)  # presence echo, stream management offers: not the subscribe's
    start = client.received + len(client.buffer)
    answer = client.subscribe(env["SCALEPUB_PUBSUB_SERVICE"], node)
    assert b"type='result'" in answer or b'type="result"' in answer, answer
    client.drain(1.5)
    return client.received - start, client


def test_each_subscribe_to_a_node_with_a_large_last_item_brings_at_most_8_kb(
        stack: Stack) -> None:
    settings = settings_of(stack)
    node = f"/amplification/{settings.key_prefix}"
    assert asyncio.run(publish(settings, node, 1)).ok
    clients = []
    try:
        for _ in range(3):
            size, client = subscribe_bytes(stack.env, node)
            clients.append(client)
            assert size <= MAX_PER_SUBSCRIBE, size
        # The same sockets do receive a new item: the measure would have seen a replay.
        assert asyncio.run(publish(settings, node, 2)).ok
        for client in clients:
            assert client.drain(2.0) > LAST_ITEM_BYTES
    finally:
        for client in clients:
            client.close()


# -- nodes created before the policy -------------------------------------------------------

@pytest.fixture
def upgraded_stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack first started with the old template (no send_last_published_item), so a node
    can be created with ejabberd's default (replay on subscribe); the test then restarts its
    ejabberd with the current template."""
    old_ops = tmp_path / "ops"
    shutil.copytree(STACK.parent, old_ops, symlinks=True)
    template = old_ops / "ejabberd" / "ejabberd.yml"
    text = template.read_text()
    assert NEVER_LINE in text
    template.write_text(text.replace(NEVER_LINE, ""))
    s = new_stack()
    try:
        done = subprocess.run([str(old_ops / "stack"), "up"], env={**os.environ, **s.control},
                              text=True, capture_output=True, timeout=180, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        s.env = parse_exports(s.run("env").stdout)
        yield s
    finally:
        s.down()


def test_a_node_created_before_is_fixed_by_configure_nodes(upgraded_stack: Stack) -> None:
    stack = upgraded_stack
    settings = settings_of(stack)
    node = f"/amplification/old/{settings.key_prefix}"
    assert asyncio.run(publish(settings, node, 1)).ok
    restarted = stack.run("restart", "ejabberd")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert asyncio.run(publish(settings, node, 2)).ok  # the last item, after the restart

    # The new template alone does not reach the existing node: it still replays.
    size, client = subscribe_bytes(stack.env, node)
    client.close()
    assert size > LAST_ITEM_BYTES, size

    # The operator's command, as a subprocess: every node the publisher owns.
    done = subprocess.run([sys.executable, "-m", "scalepub.cli", "configure-nodes"],
                          env={**os.environ, **settings_env(settings)}, text=True,
                          capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "node(s) configured (pubsub#send_last_published_item=never), 0 refused" in done.stdout

    for _ in range(2):
        size, client = subscribe_bytes(stack.env, node)
        client.close()
        assert size <= MAX_PER_SUBSCRIBE, size


def test_configure_nodes_names_the_nodes_it_configured_and_refused(stack: Stack) -> None:
    settings = settings_of(stack)
    node = f"/amplification/named/{settings.key_prefix}"
    assert asyncio.run(publish(settings, node, 1)).ok
    missing = f"/amplification/missing/{settings.key_prefix}"
    result = asyncio.run(configure_nodes(settings, [node, missing]))
    assert result.configured == [node]
    assert result.refused == {missing: "item-not-found"}
