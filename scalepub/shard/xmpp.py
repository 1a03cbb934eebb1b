"""One publisher connection to the XMPP server (slixmpp), publish IQs sent raw.

slixmpp handles the session (TCP, STARTTLS, SASL, bind). Publish IQs bypass its stanza
objects: they are byte strings built from the batch, and replies are matched by id through a
dict, because slixmpp's per-IQ future registers one handler each and scans them linearly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import slixmpp
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher.base import MatcherBase

from scalepub.settings import Settings

log = logging.getLogger(__name__)


class XmppAuthError(RuntimeError):
    """The server refused the publisher's credentials."""


class XmppUnreachable(RuntimeError):
    """No session could be established with the XMPP server."""


@dataclass(frozen=True, slots=True)
class Reply:
    """The server's answer to one publish IQ."""

    iq_id: str
    ok: bool
    error_type: str = ""  # XMPP error type: cancel, modify, wait, auth, continue
    condition: str = ""
    text: str = ""

    @property
    def reason(self) -> str:
        """Human-readable error, e.g. ``modify/not-acceptable: payload too big``."""
        base = f"{self.error_type}/{self.condition}"
        return f"{base}: {self.text}" if self.text else base


class _OurIqReplies(MatcherBase):
    """Matches result/error IQs whose id is one of ours (a dict lookup, O(1))."""

    def __init__(self, pending: Callable[[str], bool]) -> None:
        super().__init__(None)
        self._pending = pending

    def match(self, xml: Any) -> bool:
        return bool(xml.name == "iq" and xml["type"] in ("result", "error")
                    and self._pending(xml["id"]))


class _Client(slixmpp.ClientXMPP):
    pass


class XmppLink:
    """A publisher session; ``on_reply`` gets each Reply, ``on_down`` a lost session."""

    def __init__(self, settings: Settings, resource: str, is_pending: Callable[[str], bool],
                 on_reply: Callable[[Reply], None], on_down: Callable[[], None]) -> None:
        self.settings = settings
        self._on_reply = on_reply
        self._on_down = on_down
        # One resource per shard: two sessions with the same full JID evict each other.
        self._client = _make_client(settings, resource)
        self._client.register_handler(
            Callback("scalepub publish replies", _OurIqReplies(is_pending), self._reply)
        )
        self._session: asyncio.Future[None] | None = None
        self.up = False
        self._closing = False
        for event, handler in (
            ("session_start", self._started), ("failed_all_auth", self._auth_failed),
            ("connection_failed", self._connect_failed), ("disconnected", self._disconnected),
        ):
            self._client.add_event_handler(event, handler)

    async def connect(self, timeout: float = 10.0) -> None:
        """Open a session; raise XmppAuthError or XmppUnreachable."""
        self._session = asyncio.get_running_loop().create_future()
        self._client.connect(self.settings.xmpp_host, self.settings.xmpp_port)
        try:
            await asyncio.wait_for(asyncio.shield(self._session), timeout)
        except TimeoutError:
            self._client.cancel_connection_attempt()
            self._client.disconnect(wait=0)
            raise XmppUnreachable(
                f"no XMPP session with {self.settings.xmpp_host}:{self.settings.xmpp_port} "
                f"within {timeout:.0f} s"
            ) from None
        self.up = True

    def send(self, data: bytes) -> None:
        """Write a raw stanza (a publish IQ)."""
        self._client.send_raw(data)

    async def close(self) -> None:
        """End the session politely."""
        self._closing = True
        self.up = False
        if self._client.transport is not None:
            await self._client.disconnect(wait=1.0)

    def _started(self, _event: Any) -> None:
        if self._session is not None and not self._session.done():
            self._session.set_result(None)

    def _auth_failed(self, _event: Any) -> None:
        self._fail(XmppAuthError(
            f"the XMPP server refused the credentials of {self.settings.xmpp_jid} "
            "(check SCALEPUB_XMPP_JID and SCALEPUB_XMPP_PASSWORD)"))

    def _connect_failed(self, event: Any) -> None:
        self._fail(XmppUnreachable(
            f"cannot connect to XMPP server {self.settings.xmpp_host}:"
            f"{self.settings.xmpp_port}: {event}"))

    def _fail(self, exc: Exception) -> None:
        if self._session is not None and not self._session.done():
            self._session.set_exception(exc)
        self._client.cancel_connection_attempt()  # slixmpp would retry on its own, for ever
        self._client.disconnect(wait=0)

    def _disconnected(self, _event: Any) -> None:
        was_up, self.up = self.up, False
        if was_up and not self._closing:
            self._on_down()

    def _reply(self, iq: Any) -> None:
        if iq["type"] == "result":
            self._on_reply(Reply(iq["id"], True))
            return
        err = iq["error"]
        self._on_reply(Reply(iq["id"], False, err["type"] or "cancel",
                             err["condition"] or "undefined-condition", err["text"] or ""))


def _make_client(settings: Settings, resource: str) -> _Client:
    client = _Client(f"{settings.xmpp_jid}/{resource}", settings.xmpp_password)
    configure_transport(client, settings)
    # No XEP-0199 keepalive or stream management: a dead link shows as a failed write/read.
    client.whitespace_keepalive = True
    client.whitespace_keepalive_interval = 30
    return client


def configure_transport(client: slixmpp.ClientXMPP, settings: Settings) -> None:
    """Plain TCP only where ``xmpp_tls`` allows it; otherwise STARTTLS, certificate checked."""
    plain = settings.xmpp_tls == "off" or (
        settings.xmpp_tls == "auto" and settings.xmpp_host_is_loopback
    )
    client.enable_direct_tls = False
    client.enable_starttls = not plain
    client.enable_plaintext = plain
    client["feature_mechanisms"].unencrypted_plain = plain
