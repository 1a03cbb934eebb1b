"""One publisher connection to the XMPP server (slixmpp), publish IQs sent raw.

slixmpp handles the session (TCP, STARTTLS, SASL, bind). Publish IQs bypass its stanza
objects: they are byte strings built from the batch, and replies are matched by id through a
dict, because slixmpp's per-IQ future registers one handler each and scans them linearly.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import slixmpp
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher.base import MatcherBase

from scalepub.settings import Settings
from scalepub.xmpp.batch import publish_options

log = logging.getLogger(__name__)

# SASL elements carry credentials (PLAIN: base64 of "\0user\0password"; SCRAM: proofs an
# attacker could brute-force offline); slixmpp logs every sent and received stanza at DEBUG.
_SASL_ELEMENT = re.compile(r"(<(auth|response|challenge|success)\b[^>]*>)[^<]*(</\2>)")


class XmppAuthError(RuntimeError):
    """The server refused the publisher's credentials."""


class XmppUnreachable(RuntimeError):
    """No session could be established with the XMPP server."""


class XmppTlsError(XmppUnreachable):
    """TLS was required but failed: no STARTTLS offered, or the certificate was refused."""


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
        self._client = _make_client(settings, resource, self._fail)
        # Sent with every publish: ejabberd creates a missing node with these options and
        # refuses a publish to a node configured otherwise (precondition-not-met).
        self.publish_options = publish_options(settings.node_access_model)
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
        if tls_required(self.settings) and "starttls" not in self._client.features:
            # SASL mechanisms that carry credentials refuse to run unencrypted.
            self._fail(tls_error(self.settings, self._client.boundjid.domain,
                                 "the server offered no STARTTLS"))
            return
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


def _make_client(settings: Settings, resource: str,
                 on_tls_error: Callable[[XmppTlsError], None]) -> _Client:
    client = _Client(f"{settings.xmpp_jid}/{resource}", settings.xmpp_password)
    configure_transport(client, settings, on_tls_error)
    # No XEP-0199 keepalive or stream management: a dead link shows as a failed write/read.
    client.whitespace_keepalive = True
    client.whitespace_keepalive_interval = 30
    return client


def tls_required(settings: Settings) -> bool:
    """Whether the session must use STARTTLS (``xmpp_tls``; auto: all but loopback)."""
    if settings.xmpp_tls == "auto":
        return not settings.xmpp_host_is_loopback
    return settings.xmpp_tls == "required"


def configure_transport(client: slixmpp.ClientXMPP, settings: Settings,
                        on_tls_error: Callable[[XmppTlsError], None]) -> None:
    """Plain TCP only where ``xmpp_tls`` allows it; otherwise STARTTLS, certificate checked.

    The certificate must chain to ``xmpp_ca_file`` (or the system's CAs when it is empty)
    and be valid for the XMPP domain of the JID, as RFC 6120 says, not for ``xmpp_host``.
    """
    redact_sasl_in_logs()
    tls = tls_required(settings)
    if not tls and not settings.xmpp_host_is_loopback:
        log.warning("SCALEPUB_XMPP_TLS=off: plain TCP to %s, credentials and entries readable "
                    "on the network (development only)", settings.xmpp_host)
    client.enable_direct_tls = False
    client.enable_starttls = tls
    client.enable_plaintext = not tls
    client["feature_mechanisms"].unencrypted_plain = not tls
    if not tls:
        _fail_if_tls_demanded(client, settings, on_tls_error)
        return
    # Only the given CA file when there is one (a private CA), not that plus the system's.
    client.ssl_context = ssl.create_default_context(cafile=settings.xmpp_ca_file or None)

    def invalid_chain(exc: Exception) -> None:
        on_tls_error(tls_error(settings, client.boundjid.domain, _ssl_reason(exc)))

    def session_start(_event: Any) -> None:
        if "starttls" not in client.features:  # SASL ANONYMOUS runs unencrypted
            on_tls_error(tls_error(settings, client.boundjid.domain,
                                   "the server offered no STARTTLS"))

    client.add_event_handler("ssl_invalid_chain", invalid_chain)
    client.add_event_handler("session_start", session_start)


def _fail_if_tls_demanded(client: slixmpp.ClientXMPP, settings: Settings,
                          on_tls_error: Callable[[XmppTlsError], None]) -> None:
    """A server that requires STARTTLS offers no login before it: say so, do not hang."""

    def negotiated(_event: Any) -> None:
        if not client.authenticated and "starttls" not in client.features:
            on_tls_error(tls_error(settings, client.boundjid.domain,
                                   "the server requires STARTTLS: set SCALEPUB_XMPP_TLS=required"))

    client.add_event_handler("stream_negotiated", negotiated)


def tls_error(settings: Settings, domain: str, reason: str) -> XmppTlsError:
    """An error that says what failed and which settings decide it."""
    cas = (f"the CA file SCALEPUB_XMPP_CA_FILE={settings.xmpp_ca_file}"
           if settings.xmpp_ca_file else "the system's CAs (SCALEPUB_XMPP_CA_FILE is empty)")
    return XmppTlsError(
        f"TLS with the XMPP server {settings.xmpp_host}:{settings.xmpp_port} failed: {reason}. "
        f"Its certificate must be valid for the XMPP domain "
        f"{domain!r} and signed by {cas}; SCALEPUB_XMPP_TLS={settings.xmpp_tls} "
        "(off turns TLS off: development only, see docs/security.md)")


def _ssl_reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate refused: {exc.verify_message}"
    return f"TLS handshake failed: {exc}"


class _RedactSasl(logging.Filter):
    """Blanks the content of SASL elements in slixmpp's stanza log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "urn:ietf:params:xml:ns:xmpp-sasl" in message:
            record.msg, record.args = _SASL_ELEMENT.sub(r"\1***\3", message), ()
        return True


def redact_sasl_in_logs() -> None:
    """Install the SASL-redacting filter on slixmpp's stanza logger (once)."""
    stanza_log = logging.getLogger("slixmpp.xmlstream.xmlstream")
    if not any(isinstance(f, _RedactSasl) for f in stanza_log.filters):
        stanza_log.addFilter(_RedactSasl())
