"""The node options scalepub wants, applied to nodes that already exist.

ejabberd applies ``force_node_config`` (ops/ejabberd/ejabberd.yml) when a node is created or
configured, and keeps the options a node was created with otherwise. Nodes created before a
change of policy (e.g. before ``send_last_published_item: never``) are fixed by configuring
them as their owner, the publisher account (XEP-0060 §8.2): ``scalepub configure-nodes``.

The options cannot travel in the publish-options of every publish instead: ejabberd 23.01's
publish-options form knows only ``pubsub#access_model`` and ``pubsub#persist_items``, and
refuses a publish carrying any other field (unknown_var, checked with its xmpp library).
This is a maintenance command, not the publish path: slixmpp's stanza objects are fine here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout

from scalepub.settings import Settings
from scalepub.xmpp.link import XmppAuthError, XmppUnreachable, configure_transport

log = logging.getLogger(__name__)

NS_NODE_CONFIG = "http://jabber.org/protocol/pubsub#node_config"
# What every scalepub node must have, whenever it was created. send_last_published_item:
# a subscribe must not replay the last item (up to 128 KB): issue 13 part 3.
NODE_OPTIONS = {"pubsub#send_last_published_item": "never"}
WINDOW = 16  # configure IQs in flight


@dataclass
class ConfigureResult:
    """Which nodes took the options and which refused (node -> error condition)."""

    configured: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


def options_form(forms: Any) -> Any:
    """The node_config submit form carrying ``NODE_OPTIONS`` (``forms``: slixmpp's xep_0004)."""
    form = forms.make_form(ftype="submit")
    form.add_field(var="FORM_TYPE", ftype="hidden", value=NS_NODE_CONFIG)
    for var, value in NODE_OPTIONS.items():
        form.add_field(var=var, value=value)
    return form


async def configure_nodes(settings: Settings, nodes: Iterable[str] | None = None,
                          timeout: float = 20.0) -> ConfigureResult:
    """Log in as the publisher and apply ``NODE_OPTIONS`` to ``nodes`` (default: all it owns)."""
    client = await _connect(settings, timeout)
    try:
        pubsub = client.plugin["xep_0060"]
        todo = list(nodes) if nodes is not None else await owned_nodes(pubsub, settings, timeout)
        result = ConfigureResult()
        window = asyncio.Semaphore(WINDOW)

        async def one(node: str) -> None:
            async with window:
                problem = await _configure(pubsub, settings, node, timeout)
            if problem:
                result.refused[node] = problem
            else:
                result.configured.append(node)

        await asyncio.gather(*(one(n) for n in todo))
        log.info("configured %d node(s), %d refused", len(result.configured), len(result.refused))
        return result
    finally:
        await client.disconnect(wait=1.0)


async def owned_nodes(pubsub: Any, settings: Settings, timeout: float) -> list[str]:
    """Every node on the service where the publisher is owner (listing-independent)."""
    iq = await pubsub.get_affiliations(settings.pubsub_service, timeout=timeout)
    return sorted(a["node"] for a in iq["pubsub"]["affiliations"]
                  if a["affiliation"] == "owner")


async def _configure(pubsub: Any, settings: Settings, node: str, timeout: float) -> str:
    form = options_form(pubsub.xmpp.plugin["xep_0004"])
    try:
        await pubsub.set_node_config(settings.pubsub_service, node, form, timeout=timeout)
    except IqError as exc:
        return str(exc.iq["error"]["condition"]) or "error"
    except IqTimeout:
        return "timeout"
    return ""


async def _connect(settings: Settings, timeout: float) -> slixmpp.ClientXMPP:
    client = slixmpp.ClientXMPP(f"{settings.xmpp_jid}/scalepub-configure",
                                settings.xmpp_password)
    failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def fail(exc: Exception) -> None:
        if not failed.done():
            failed.set_exception(exc)

    configure_transport(client, settings, fail)
    client.register_plugin("xep_0004")
    client.register_plugin("xep_0060")
    def started(_event: Any) -> None:
        if not failed.done():
            failed.set_result(None)

    client.add_event_handler("session_start", started)
    client.add_event_handler("failed_all_auth", lambda _e: fail(XmppAuthError(
        f"the XMPP server refused the credentials of {settings.xmpp_jid}")))
    client.connect(settings.xmpp_host, settings.xmpp_port)
    try:
        await asyncio.wait_for(failed, timeout)
    except (TimeoutError, XmppAuthError, XmppUnreachable) as exc:
        client.cancel_connection_attempt()  # slixmpp would retry on its own, for ever
        client.disconnect(wait=0)
        if isinstance(exc, TimeoutError):
            raise XmppUnreachable(f"no XMPP session with {settings.xmpp_host}:"
                                  f"{settings.xmpp_port} within {timeout:.0f} s") from None
        raise
    return client


def create_iq(iq_id: str, service: str, node_attr: bytes, access_model: str) -> bytes:
    """A raw XEP-0060 §8.1 create IQ for the (attribute-escaped) node, with its access model.

    The shard's own path (no stanza objects). Open is ejabberd's default and needs no form;
    another model rides in the create's configure form, as it does in each publish's
    publish-options (a node created otherwise would refuse them: precondition-not-met).
    """
    configure = b"<configure/>"
    if access_model != "open":
        configure = (
            b'<configure><x xmlns="jabber:x:data" type="submit">'
            b'<field var="FORM_TYPE" type="hidden"><value>%s</value></field>'
            b'<field var="pubsub#access_model"><value>%s</value></field></x></configure>'
            % (NS_NODE_CONFIG.encode(), access_model.encode()))
    return (b'<iq type="set" id="%s" to="%s"><pubsub xmlns="http://jabber.org/protocol/pubsub">'
            b'<create node="%s"/>%s</pubsub></iq>'
            % (iq_id.encode(), service.encode(), node_attr, configure))
