"""One publisher connection to the XMPP server (slixmpp), publish IQs sent raw.

slixmpp handles the session (TCP, STARTTLS, SASL, bind). Publish IQs bypass its stanza
objects: they are byte strings built from the batch, and replies are matched by id through a
dict, because slixmpp's per-IQ future registers one handler each and scans them linearly.

Anyone who can log in can send stanzas to a publisher session's full JID (it is predictable).
So a reply counts only if its id is one this session sent and still waits for, and it comes
from the pubsub service (errors also from the server itself); ids carry a random prefix per
connection. Everything else a publisher never expects is dropped before slixmpp builds a
stanza object for it, and counted (``Ignored``). docs/security.md, threat model.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import re
import secrets
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import quoteattr

import slixmpp
from slixmpp.xmlstream import XMLStream

from scalepub.settings import Settings, SettingsError
from scalepub.xmpp.batch import publish_options

log = logging.getLogger(__name__)

# SASL elements carry credentials (PLAIN: base64 of "\0user\0password"; SCRAM: proofs an
# attacker could brute-force offline); slixmpp logs every sent and received stanza at DEBUG.
_SASL_ELEMENT = re.compile(r"(<(auth|response|challenge|success)\b[^>]*>)[^<]*(</\2>)")

_IQ = "{jabber:client}iq"
_DROPPED = frozenset({"{jabber:client}message", "{jabber:client}presence"})
_ERROR = "{jabber:client}error"
_STANZA_ERRORS = "{urn:ietf:params:xml:ns:xmpp-stanzas}"
_TEXT = _STANZA_ERRORS + "text"
# RFC 6120 §8.2.3: an IQ request must be answered; §8.4: service-unavailable for a request
# the entity does not handle. The request's payload is not echoed back.
_REFUSAL = ("<iq type='error' id=%s to=%s><error type='cancel'><service-unavailable "
            "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>")

# _Client hooks into it; older slixmpp releases named it __spawn_event (name-mangled), and
# hooking nothing would leave every publish reply unmatched.
if not callable(getattr(XMLStream, "_spawn_event", None)):
    raise ImportError("scalepub needs a slixmpp whose XMLStream has _spawn_event "
                      "(1.17 is tested): pip install -U slixmpp")


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


class Ignored(enum.StrEnum):
    """Why a stanza sent to a publisher session was dropped (the metric's ``kind``)."""

    FORGED_REPLY = "forged_reply"  # an answer to an IQ in flight, from someone else
    UNKNOWN_ID = "unknown_id"  # an answer to no IQ this session waits for
    UNEXPECTED = "unexpected"  # a message, a presence, an IQ request not from the server


class Verdict(enum.Enum):
    """What the link does with an incoming stanza."""

    REPLY = "reply"  # the answer to a publish IQ in flight
    SLIXMPP = "slixmpp"  # session set-up, the server's own requests, stream-level elements
    REFUSE = "refuse"  # an IQ request from someone else: answered service-unavailable, counted
    DROP = "drop"  # counted as the Ignored kind given with it


@dataclass(frozen=True, slots=True)
class Peers:
    """Who may answer a publisher session's IQs.

    The pubsub service, exactly as the IQs address it: ejabberd 23.01 answers from the very
    string in ``to`` (also for errors it makes itself when the service cannot be reached).
    Errors also from the server on the account's behalf (RFC 6120 §8.1.2.1, §8.3): no
    ``from``, the account's bare JID or its domain, which no other user can send from, since
    the server stamps ``from`` on what its clients send. Other spellings of the same JIDs are
    compared case-folded (domains and localparts are case-insensitive).
    """

    service: str
    server: frozenset[str]  # case-folded bare JID and domain of the account

    @classmethod
    def of(cls, service: str, account: str) -> Peers:
        """The peers of a session of ``account`` (a JID) publishing to ``service``."""
        bare = account.partition("/")[0]
        return cls(service, frozenset({bare.casefold(), bare.rpartition("@")[2].casefold()}))

    def is_server(self, sender: str | None) -> bool:
        """Whether ``sender`` is the server speaking for the account."""
        return sender is None or sender.casefold() in self.server

    def may_answer(self, sender: str | None, error: bool) -> bool:
        """Whether an answer (an error if ``error``) from ``sender`` is genuine."""
        if sender == self.service:
            return True
        if sender is not None and sender.casefold() == self.service.casefold():
            return True
        return error and self.is_server(sender)


def judge(tag: str, iq_type: str | None, sender: str | None, pending: bool, live: bool,
          peers: Peers) -> tuple[Verdict, Ignored | None]:
    """What to do with a stanza: ``pending`` if its id is an IQ in flight, ``live`` once
    the session started (before, slixmpp's own set-up IQs are answered)."""
    if tag in _DROPPED:
        return Verdict.DROP, Ignored.UNEXPECTED
    if tag != _IQ:
        return Verdict.SLIXMPP, None
    if iq_type in ("result", "error"):
        return _judge_answer(iq_type == "error", sender, pending, live, peers)
    if iq_type in ("get", "set"):
        if peers.is_server(sender):
            return Verdict.SLIXMPP, None  # e.g. a roster push: slixmpp answers it
        return Verdict.REFUSE, Ignored.UNEXPECTED
    return Verdict.DROP, Ignored.UNEXPECTED  # no valid type: nothing to answer (RFC 6120 §8.2.3)


def _judge_answer(error: bool, sender: str | None, pending: bool, live: bool,
                  peers: Peers) -> tuple[Verdict, Ignored | None]:
    if pending:
        if peers.may_answer(sender, error):
            return Verdict.REPLY, None
        return Verdict.DROP, Ignored.FORGED_REPLY
    if live:
        return Verdict.DROP, Ignored.UNKNOWN_ID
    return Verdict.SLIXMPP, None


def reply_of(iq: ET.Element, iq_id: str) -> Reply:
    """The Reply an IQ result or error element carries."""
    if iq.get("type") == "result":
        return Reply(iq_id, True)
    error = iq.find(_ERROR)
    if error is None:
        return Reply(iq_id, False, "cancel", "undefined-condition")
    condition, text = "", ""
    for child in error:
        if child.tag == _TEXT:
            text = child.text or ""
        elif not condition and child.tag.startswith(_STANZA_ERRORS):
            condition = child.tag[len(_STANZA_ERRORS):]
    return Reply(iq_id, False, error.get("type") or "cancel", condition or "undefined-condition",
                 text)


def _id_source() -> tuple[str, itertools.count[int]]:
    """A fresh random id prefix (96 bits, URL-safe: no XML escaping) and a counter."""
    return f"sp{secrets.token_urlsafe(12)}-", itertools.count()


def _consumed_by_nobody(_xml: ET.Element) -> bool:
    return False


class _Client(slixmpp.ClientXMPP):
    """slixmpp's client with a first look at every stanza, before slixmpp builds objects."""

    def __init__(self, jid: str, password: str) -> None:
        super().__init__(jid, password)
        self.first_look: Callable[[ET.Element], bool] = _consumed_by_nobody

    def _spawn_event(self, xml: ET.Element) -> None:
        # slixmpp's per-stanza entry point: replies skip its stanza objects and handler scan,
        # and a flood of stanzas nobody asked for costs one look each.
        if not self.first_look(xml):
            super()._spawn_event(xml)


class XmppLink:
    """A publisher session; ``on_reply`` gets each Reply, ``on_down`` a lost session."""

    def __init__(self, settings: Settings, resource: str, is_pending: Callable[[str], bool],
                 on_reply: Callable[[Reply], None], on_down: Callable[[], None],
                 on_ignored: Callable[[Ignored], None] | None = None) -> None:
        self.settings = settings
        self._is_pending = is_pending
        self._on_reply = on_reply
        self._on_down = on_down
        self._on_ignored = on_ignored
        self._peers = Peers.of(settings.pubsub_service, settings.xmpp_jid)
        # One resource per shard: two sessions with the same full JID evict each other.
        self._client = _make_client(settings, resource, self._fail)
        self._client.first_look = self._first_look
        # Sent with every publish: ejabberd creates a missing node with these options and
        # refuses a publish to a node configured otherwise (precondition-not-met).
        self.publish_options = publish_options(settings.node_access_model)
        self._session: asyncio.Future[None] | None = None
        self.up = False
        self._live = False  # True once the session started: slixmpp then has no IQ in flight
        self._closing = False
        self._prefix, self._count = _id_source()
        for event, handler in (
            ("session_start", self._started), ("failed_all_auth", self._auth_failed),
            ("connection_failed", self._connect_failed), ("disconnected", self._disconnected),
            ("stream_error", self._stream_error),
        ):
            self._client.add_event_handler(event, handler)

    def new_id(self) -> str:
        """An IQ id nobody can guess: a random prefix per connection, then a counter."""
        return f"{self._prefix}{next(self._count)}"

    async def connect(self, timeout: float = 10.0) -> None:
        """Open a session; raise XmppAuthError or XmppUnreachable."""
        self._prefix, self._count = _id_source()
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
        # slixmpp cancels its output-filter task only when the client is garbage-collected:
        # in a process that lives on (a shard's next worker) asyncio then logs it as
        # "Task was destroyed but it is pending!".
        filters = getattr(self._client, "_run_out_filters", None)
        if filters is not None:
            filters.cancel()

    def _started(self, _event: Any) -> None:
        self._live = True
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

    def _stream_error(self, error: Any) -> None:
        """The server ended the stream before a session: say why instead of timing out."""
        if self._live:
            return  # a lost session: _disconnected reports it
        condition = str(error["condition"] or "")
        where = f"{self.settings.xmpp_host}:{self.settings.xmpp_port}"
        if condition == "host-unknown":  # a setting to fix: the pool stops (exit 2)
            self._fail(SettingsError(
                f"the XMPP server {where} does not serve {self._client.boundjid.domain} "
                "(host-unknown): check the domain of SCALEPUB_XMPP_JID"))
        else:
            self._fail(XmppUnreachable(f"the XMPP server {where} ended the stream: {condition}"))

    def _fail(self, exc: Exception) -> None:
        if self._session is not None and not self._session.done():
            self._session.set_exception(exc)
        self._client.cancel_connection_attempt()  # slixmpp would retry on its own, for ever
        self._client.disconnect(wait=0)

    def _disconnected(self, _event: Any) -> None:
        was_up, self.up = self.up, False
        self._live = False
        if was_up and not self._closing:
            self._on_down()

    def _first_look(self, xml: ET.Element) -> bool:
        """Handle a publish reply or drop an unexpected stanza; False leaves it to slixmpp."""
        tag = xml.tag
        iq_id = xml.get("id", "")
        verdict, ignored = judge(tag, xml.get("type"), xml.get("from"),
                                 tag == _IQ and self._is_pending(iq_id), self._live, self._peers)
        if verdict is Verdict.SLIXMPP:
            return False
        if verdict is Verdict.REPLY:
            self._reply(reply_of(xml, iq_id))
            return True
        if verdict is Verdict.REFUSE:
            self._client.send_raw(_REFUSAL % (quoteattr(iq_id), quoteattr(xml.get("from", ""))))
        if ignored is not None:
            self._ignored(ignored, tag, xml.get("from"))
        return True

    def _reply(self, reply: Reply) -> None:
        try:
            self._on_reply(reply)
        except Exception:  # a bug in the caller must not take the stream down with it
            log.exception("error handling the reply to IQ %s", reply.iq_id)

    def _ignored(self, kind: Ignored, tag: str, sender: str | None) -> None:
        # Never the content: it is the sender's, and a flood must not flood the log with it.
        log.debug("ignored %s stanza (%s) from %s", kind.value, tag.rpartition("}")[2], sender)
        if self._on_ignored is not None:
            self._on_ignored(kind)


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
