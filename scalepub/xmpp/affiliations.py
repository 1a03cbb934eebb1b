"""Who may subscribe to a whitelist node: affiliations set by its owner, the publisher account.

With ``NODE_ACCESS_MODEL=whitelist`` ejabberd lets only JIDs with an affiliation (``member``
or higher) subscribe. The publisher account created the node and owns it, so it sets them
(XEP-0060 §8.9.2); ``scalepub authorize NODE JID...`` is the command for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from xml.sax.saxutils import quoteattr

from scalepub.settings import Settings
from scalepub.xmpp.link import Reply, XmppLink

NS_PUBSUB_OWNER = "http://jabber.org/protocol/pubsub#owner"
AFFILIATIONS = ("member", "none", "outcast")  # none revokes; outcast bans


def affiliations_iq(iq_id: str, service: str, node: str, affiliations: Mapping[str, str]) -> bytes:
    """The owner's IQ that sets ``{bare JID: affiliation}`` on ``node``."""
    items = "".join(f"<affiliation jid={quoteattr(jid)} affiliation={quoteattr(aff)}/>"
                    for jid, aff in affiliations.items())
    return (f"<iq type='set' id={quoteattr(iq_id)} to={quoteattr(service)}>"
            f"<pubsub xmlns='{NS_PUBSUB_OWNER}'><affiliations node={quoteattr(node)}>"
            f"{items}</affiliations></pubsub></iq>").encode()


async def set_affiliations(settings: Settings, node: str, affiliations: Mapping[str, str],
                           timeout: float = 20.0) -> Reply:
    """Log in as the publisher, set the affiliations, return the server's answer."""
    bad = sorted(set(affiliations.values()) - set(AFFILIATIONS))
    if bad:
        raise ValueError(f"affiliation must be one of {', '.join(AFFILIATIONS)} (got {bad})")
    waiting: set[str] = set()  # the IQ's id once sent: a fixed id could be answered by anyone
    answer: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()

    def on_reply(reply: Reply) -> None:
        if not answer.done():
            answer.set_result(reply)

    link = XmppLink(settings, "access", waiting.__contains__, on_reply, lambda: None)
    await link.connect(timeout)
    try:
        iq_id = link.new_id()  # after connect(): each connection draws a new random prefix
        waiting.add(iq_id)
        link.send(affiliations_iq(iq_id, settings.pubsub_service, node, affiliations))
        return await asyncio.wait_for(answer, timeout)
    finally:
        await link.close()
