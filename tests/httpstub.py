"""A scripted HTTP/1.1 server on loopback for the load test's BOSH transports' tests."""

from __future__ import annotations

import http.server
import socket
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers each POST with the next of ``answers`` and records it in ``seen``."""

    protocol_version = "HTTP/1.1"  # keep-alive, as ejabberd answers
    # (status, body, extra headers); status 0: drop the connection without an answer
    answers: ClassVar[deque[tuple[int, bytes, dict[str, str]]]] = deque()
    seen: ClassVar[list[tuple[int, bytes]]] = []  # (client port, request body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append((self.client_address[1], body))
        status, answer, headers = self.answers.popleft()
        if status == 0:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(status)
        for name, value in {"Content-Length": str(len(answer)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *_args: object) -> None:
        pass


@contextmanager
def serving() -> Iterator[str]:
    """The URL of a fresh server (``Handler``'s script and record emptied)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Handler.answers.clear()
    Handler.seen.clear()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/bosh"
    finally:
        server.shutdown()
        server.server_close()
