"""Node enumeration (issue 13 part 4) against the real ejabberd, both settings.

Off (the default): an anonymous disco#items on the pubsub service names no node (ejabberd
23.01 answers internal-server-error: see ops/ejabberd/ejabberd.yml). On
(``SCALEPUB_NODE_LISTING=on``, a stack of its own): the same request lists the nodes. The
setting is ejabberd's service option max_nodes_discoitems, read at each request, so it
covers nodes created before it changed: no node option is involved.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from scalepub.settings import Settings, SettingsError, env_mapping
from tests.rawxmpp import RawClient
from tests.stack import STACK, Stack, running
from tests.test_amplification import publish

pytestmark = pytest.mark.stack

DISCO_ITEMS = "<query xmlns='http://jabber.org/protocol/disco#items'/>"


def anonymous_disco_items(env: dict[str, str]) -> bytes:
    """What an anonymous client gets for disco#items on the pubsub service."""
    client = RawClient(env["SCALEPUB_XMPP_HOST"], int(env["SCALEPUB_XMPP_PORT"]))
    try:
        client.login_anonymous(env["SCALEPUB_ANON_DOMAIN"])
        return client.iq(DISCO_ITEMS, env["SCALEPUB_PUBSUB_SERVICE"])
    finally:
        client.close()


def make_node(stack: Stack, tag: str) -> str:
    settings = Settings.from_mapping(env_mapping(stack.env), key_prefix=f"l{tag}")
    node = f"/listing/{tag}"
    reply = asyncio.run(publish(settings, node, 1))
    assert reply.ok, reply.reason
    return node


def test_anonymous_disco_items_lists_no_node_by_default(stack: Stack) -> None:
    assert stack.env["SCALEPUB_NODE_LISTING"] == "off"
    tag = uuid.uuid4().hex[:10]
    node = make_node(stack, tag)
    answer = anonymous_disco_items(stack.env)
    assert tag.encode() not in answer and node.encode() not in answer, answer
    assert not re.search(rb"<item\b", answer), answer


@pytest.fixture(scope="module")
def listing_stack() -> Iterator[Stack]:
    yield from running(SCALEPUB_NODE_LISTING="on")


def test_listing_on_lists_the_nodes(listing_stack: Stack) -> None:
    assert listing_stack.env["SCALEPUB_NODE_LISTING"] == "on"
    tags = [uuid.uuid4().hex[:10] for _ in range(3)]
    nodes = [make_node(listing_stack, tag) for tag in tags]
    answer = anonymous_disco_items(listing_stack.env)
    assert b"type='result'" in answer, answer
    for node in nodes:
        assert f"node='{node}'".encode() in answer, answer


@pytest.fixture
def switched_stack() -> Iterator[Stack]:
    yield from running(SCALEPUB_NODE_LISTING="on")


def test_turning_listing_off_hides_the_nodes_created_while_it_was_on(
    switched_stack: Stack,
) -> None:
    """The option is the service's, not the nodes': nodes made under ``on`` are hidden once
    ejabberd runs with ``off`` (no migration needed, unlike send_last_published_item)."""
    tag = uuid.uuid4().hex[:10]
    node = make_node(switched_stack, tag)
    assert f"node='{node}'".encode() in anonymous_disco_items(switched_stack.env)
    done = subprocess.run([str(STACK), "restart", "ejabberd"], text=True, capture_output=True,
                          timeout=180, check=False,
                          env={**os.environ, **switched_stack.control,
                               "SCALEPUB_NODE_LISTING": "off"})
    assert done.returncode == 0, done.stdout + done.stderr
    answer = anonymous_disco_items(switched_stack.env)
    assert tag.encode() not in answer and not re.search(rb"<item\b", answer), answer
    # Hidden, not gone: the node outlived the restart and can still be subscribed to.
    env = switched_stack.env
    client = RawClient(env["SCALEPUB_XMPP_HOST"], int(env["SCALEPUB_XMPP_PORT"]))
    try:
        client.login_anonymous(env["SCALEPUB_ANON_DOMAIN"])
        subscribed = client.subscribe(env["SCALEPUB_PUBSUB_SERVICE"], node)
    finally:
        client.close()
    assert b"type='result'" in subscribed and b"subscription='subscribed'" in subscribed, \
        subscribed


def test_a_bad_listing_value_is_refused_naming_the_setting() -> None:
    with pytest.raises(SettingsError, match="SCALEPUB_NODE_LISTING: must be one of off, on"):
        Settings.from_env({"SCALEPUB_NODE_LISTING": "yes"})
    done = subprocess.run([str(STACK), "env"], text=True, capture_output=True, timeout=60,
                          env={**os.environ, "SCALEPUB_STACK_DIR": f"/tmp/nolisting{os.getpid()}",
                               "SCALEPUB_NODE_LISTING": "yes"}, check=False)
    assert done.returncode != 0
    assert "SCALEPUB_NODE_LISTING must be on or off (got 'yes')" in done.stderr
