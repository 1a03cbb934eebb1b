"""A bare XMPP client on a plain socket, for tests that count the bytes a peer gets or sends.

It is independent of scalepub's XMPP code and of slixmpp: an attacker's view of the server.
Plain TCP only (the session stack on loopback).
"""

from __future__ import annotations

import base64
import contextlib
import re
import socket
import time
import uuid
from xml.sax.saxutils import quoteattr

NS_PUBSUB = "http://jabber.org/protocol/pubsub"
_STREAM = ("<?xml version='1.0'?><stream:stream to={domain} xmlns='jabber:client' "
           "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>")


class RawClient:
    """One XMPP session; ``received`` counts every byte the server sent."""

    def __init__(self, host: str, port: int, timeout: float = 20.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self.buffer = b""
        self.received = 0
        self.jid = ""

    def close(self) -> None:
        """Close the stream and the socket."""
        with contextlib.suppress(OSError):
            self.sock.sendall(b"</stream:stream>")
        self.sock.close()

    def send(self, data: str | bytes) -> None:
        """Write raw bytes."""
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def read_until(self, pattern: bytes, timeout: float | None = None) -> bytes:
        """Read until ``pattern`` (a regex) matches the buffer; return and drop what matched."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            found = re.search(pattern, self.buffer, re.S)
            if found:
                text, self.buffer = self.buffer[:found.end()], self.buffer[found.end():]
                return text
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {pattern!r} in {self.buffer[-500:]!r}")
            self._recv(left)

    def drain(self, seconds: float) -> int:
        """Read whatever arrives during ``seconds``; return its size."""
        before = self.received + len(self.buffer)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._recv(left)
        size = self.received + len(self.buffer) - before
        self.buffer = b""
        return size

    def _recv(self, timeout: float) -> None:
        self.sock.settimeout(max(timeout, 0.01))
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return
        if not chunk:
            raise ConnectionError(f"server closed the stream: {self.buffer[-500:]!r}")
        self.received += len(chunk)
        self.buffer += chunk

    def login_anonymous(self, domain: str) -> str:
        """SASL ANONYMOUS on ``domain``, bind, initial presence; return the full JID."""
        self.send(_STREAM.format(domain=quoteattr(domain)))
        self.read_until(rb"</stream:features>")
        self.send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='ANONYMOUS'/>")
        self.read_until(rb"<success[^>]*(/>|</success>)")
        jid = self._bind(domain)
        self.send("<presence/>")
        return jid

    def _bind(self, domain: str) -> str:
        self.send(_STREAM.format(domain=quoteattr(domain)))
        self.read_until(rb"</stream:features>")
        self.send("<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
        bound = self.read_until(rb"<jid>[^<]+</jid>")
        self.jid = re.findall(rb"<jid>([^<]+)</jid>", bound)[-1].decode()
        self.read_until(rb"</iq>")
        return self.jid

    def login_plain(self, user: str, domain: str, password: str) -> str:
        """SASL PLAIN (loopback, no TLS), bind; return the full JID."""
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        self.send(_STREAM.format(domain=quoteattr(domain)))
        self.read_until(rb"</stream:features>")
        self.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>")
        self.read_until(rb"<success[^>]*(/>|</success>)")
        return self._bind(domain)

    def iq(self, body: str, to: str, kind: str = "get") -> bytes:
        """Send an IQ and return the server's answer to it (result or error)."""
        iq_id = uuid.uuid4().hex
        self.send(f"<iq type='{kind}' id='{iq_id}' to={quoteattr(to)}>{body}</iq>")
        return self.read_until(rb"<iq [^>]*id=['\"]" + iq_id.encode()
                               + rb"['\"][^>]*(/>|>.*?</iq>)")

    def subscribe(self, service: str, node: str) -> bytes:
        """Subscribe this full JID to ``node``; return the answer."""
        body = (f"<pubsub xmlns='{NS_PUBSUB}'><subscribe node={quoteattr(node)} "
                f"jid={quoteattr(self.jid)}/></pubsub>")
        return self.iq(body, service, "set")
