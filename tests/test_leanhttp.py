"""The load test's lean keep-alive HTTP transport (loadtest/leanhttp.py) against a real server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from loadtest.bosh import TransportError
from loadtest.leanhttp import LeanTransport
from tests.httpstub import Handler, serving

EMPTY = "<body xmlns='http://jabber.org/protocol/httpbind'/>"


@pytest.fixture
def url() -> Iterator[str]:
    with serving() as address:
        yield address


def test_posts_share_one_connection_and_bodies_arrive_whole(url: str) -> None:
    big = b"<body>" + b"x" * 200_000 + b"</body>"  # several recv()s
    Handler.answers.extend([(200, b"one", {}), (200, big, {}), (200, b"", {})])
    transport = LeanTransport(url)
    assert transport.post(b"<a/>", 5) == b"one"
    assert transport.post(b"<b/>", 5) == big
    assert transport.post(b"<c/>", 5) == b""
    assert [body for _port, body in Handler.seen] == [b"<a/>", b"<b/>", b"<c/>"]
    assert len({port for port, _body in Handler.seen}) == 1
    transport.close()


def test_connection_close_is_honoured(url: str) -> None:
    Handler.answers.extend([(200, b"a", {"Connection": "close"}), (200, b"b", {})])
    transport = LeanTransport(url)
    assert transport.post(b"1", 5) == b"a"
    assert transport.post(b"2", 5) == b"b"
    assert len({port for port, _body in Handler.seen}) == 2
    transport.close()


def test_an_answer_it_cannot_frame_is_an_error_that_says_so(url: str) -> None:
    Handler.answers.append((200, b"3\r\nabc\r\n0\r\n\r\n", {"Transfer-Encoding": "chunked"}))
    with pytest.raises(TransportError, match="chunked"):
        LeanTransport(url).post(b"x", 5)


def test_only_plain_http_urls() -> None:
    with pytest.raises(ValueError, match="https is not supported"):
        LeanTransport("https://127.0.0.1/bosh")
