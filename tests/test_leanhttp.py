"""The load test's lean keep-alive HTTP transport (loadtest/leanhttp.py) against a real server."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator

import pytest

from loadtest.bosh import BoshClient, BoshTerminated, Session, TransportError
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


def test_a_dropped_connection_is_retried_by_the_client_with_the_same_rid(url: str) -> None:
    Handler.answers.extend([(200, EMPTY.encode(), {}), (0, b"", {}), (200, EMPTY.encode(), {})])
    transport = LeanTransport(url)
    client = BoshClient(transport, "x", rid=7, sleep=lambda _s: None)
    client.session = Session("s", 5, 1, 2, 30)
    client.poll()
    client.poll()
    assert [ET.fromstring(b).get("rid") for _p, b in Handler.seen] == ["7", "8", "8"]
    assert client.retried == 1
    assert len({port for port, _body in Handler.seen}) == 2  # a new connection after the drop
    transport.close()


def test_connection_close_is_honoured(url: str) -> None:
    Handler.answers.extend([(200, b"a", {"Connection": "close"}), (200, b"b", {})])
    transport = LeanTransport(url)
    assert transport.post(b"1", 5) == b"a"
    assert transport.post(b"2", 5) == b"b"
    assert len({port for port, _body in Handler.seen}) == 2
    transport.close()


def test_http_404_ends_the_bosh_session(url: str) -> None:
    Handler.answers.append((404, b"", {}))
    client = BoshClient(LeanTransport(url), "x", rid=1)
    client.session = Session("s", 5, 1, 2, 30)
    with pytest.raises(BoshTerminated) as info:
        client.poll()
    assert info.value.condition == "item-not-found"


def test_an_answer_it_cannot_frame_is_an_error_that_says_so(url: str) -> None:
    Handler.answers.append((200, b"3\r\nabc\r\n0\r\n\r\n", {"Transfer-Encoding": "chunked"}))
    with pytest.raises(TransportError, match="chunked"):
        LeanTransport(url).post(b"x", 5)


def test_only_plain_http_urls() -> None:
    with pytest.raises(ValueError, match="https is not supported"):
        LeanTransport("https://127.0.0.1/bosh")
