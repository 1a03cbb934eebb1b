"""A lean HTTP/1.1 keep-alive POST client on a plain socket: the BOSH subscribers' transport.

With 200 BOSH subscribers at 200 saves/s a Locust process makes ~3,400 long-poll requests a
second, and Locust's ``FastHttpSession`` (geventhttpclient's user agent: URL and header
objects, cookie jar, redirect and compression handling, response wrappers) took ~70 % of the
subscriber's CPU there (py-spy, docs/benchmarks.md "A fair lab"). A long poll needs none of
that: one request line and three headers out, a status line and ``Content-Length`` back. Under
Locust, gevent has patched ``socket``, so this transport is cooperative there too.

Only what a BOSH connection manager answers is accepted: ``Content-Length`` framed bodies
(a chunked or unframed answer is a ``TransportError`` that says so, never a silent guess).
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from loadtest.bosh import TransportError

_HEAD_END = b"\r\n\r\n"
_RECV_BYTES = 65_536
_MAX_HEAD_BYTES = 16_384


class LeanTransport:
    """POSTs bodies to one HTTP URL over one keep-alive connection (reopened when dropped)."""

    def __init__(self, url: str, content_type: str = "text/xml; charset=utf-8") -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not an http URL (https is not supported here): {url!r}")
        self.address = (parts.hostname, parts.port or 80)
        path = parts.path or "/"
        self._head = (f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                      f"Content-Type: {content_type}\r\nContent-Length: ").encode()
        self._sock: socket.socket | None = None
        self._timeout = 0.0
        self._buf = bytearray()

    def post(self, body: bytes, timeout: float) -> bytes:
        """POST ``body``; the answer's body. A broken connection is closed and reported as
        ``TransportError`` (the BOSH client retries with the same rid); HTTP status != 200
        raises ``TransportError`` carrying the status."""
        try:
            sock = self._connection(timeout)
            sock.sendall(b"".join((self._head, str(len(body)).encode(), _HEAD_END, body)))
            status, data, keep = self._answer(sock)
        except (OSError, ValueError) as exc:
            self.close()
            raise TransportError(f"{type(exc).__name__}: {exc}") from exc
        if not keep:
            self.close()
        if status != 200:
            raise TransportError(f"HTTP {status}", status)
        return data

    def close(self) -> None:
        """Drop the connection (the next post opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf.clear()

    def _connection(self, timeout: float) -> socket.socket:
        if self._sock is None:
            self._sock = socket.create_connection(self.address, timeout=timeout)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._timeout = timeout
        elif timeout != self._timeout:
            self._sock.settimeout(timeout)
            self._timeout = timeout
        return self._sock

    def _answer(self, sock: socket.socket) -> tuple[int, bytes, bool]:
        """Status, body and whether the connection stays open, of one answer."""
        buf = self._buf
        end = buf.find(_HEAD_END)
        while end < 0:
            if len(buf) > _MAX_HEAD_BYTES:
                raise ValueError(f"no end of the HTTP head in {len(buf)} bytes")
            self._recv(sock, buf)
            end = buf.find(_HEAD_END)
        status, length, keep = _head(bytes(buf[:end]))
        start = end + len(_HEAD_END)
        while len(buf) < start + length:
            self._recv(sock, buf)
        data = bytes(buf[start:start + length])
        del buf[:start + length]
        return status, data, keep

    @staticmethod
    def _recv(sock: socket.socket, buf: bytearray) -> None:
        chunk = sock.recv(_RECV_BYTES)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        buf += chunk


def _head(head: bytes) -> tuple[int, int, bool]:
    """Status, Content-Length and keep-alive of an HTTP/1.x response head."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if not version.startswith("HTTP/1."):
        raise ValueError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
    status = int(rest[:3])
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip().lower()
    if "chunked" in fields.get("transfer-encoding", ""):
        raise ValueError("chunked answer: this transport reads Content-Length bodies only")
    if "content-length" not in fields:
        raise ValueError(f"HTTP {status} answer without Content-Length")
    connection = fields.get("connection", "")
    keep = connection == "keep-alive" or (connection != "close" and version != "HTTP/1.0")
    return status, int(fields["content-length"]), keep
