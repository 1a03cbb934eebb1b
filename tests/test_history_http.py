"""The history endpoint over HTTP: JSON errors that echo no markup, strict parameters, the
cost bound (limit), the HISTORY_RATE_LIMIT hook (429 + Retry-After) and its system check.

Requests go through Django's test Client (the example project's URLconf and middleware).
Tests of refusals point REDIS_URL at a closed port: they pass only if the refusal comes before
any Redis call (an answer that reached Redis would be a 503).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.cache import cache
from django.core.checks import run_checks
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse
from django.test import Client

from scalepub.django.views import MAX_LIMIT, HistoryRateLimited
from scalepub.producer import PendingEntry, StreamProducer
from scalepub.settings import Settings
from tests.conftest import django_side
from tests.stack import free_port

URL = "/scalepub/history"
XSS = "<script>window.__pwned=1</script>"
SEEN: list[tuple[str, str]] = []  # (path, node) each test limiter was called with


def offline(**changes: Any) -> contextlib.AbstractContextManager[Settings]:
    """The Django side with Redis on a closed port and no relay thread."""
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout=0.2,
                        outbox_relay="external").replace(**changes)
    return contextlib.contextmanager(django_side)(settings)


@pytest.fixture
def online(settings_for: Settings) -> Iterator[Settings]:
    """The Django side on the session's Redis, appending on commit, no relay thread."""
    yield from django_side(settings_for.replace(delivery="direct", outbox_relay="external"))


def refused(response: HttpResponse, status: int, param: str | None) -> str:
    """Assert a JSON error of ``status`` naming ``param``, with no markup; its reason."""
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert b"<" not in response.content and b">" not in response.content
    body = json.loads(response.content)
    assert body.get("param") == param and set(body) <= {"error", "param"}, body
    assert isinstance(body["error"], str) and body["error"]
    return str(body["error"])


def append(settings: Settings, node: str, count: int) -> None:
    producer = StreamProducer(settings)
    try:
        result = producer.append([PendingEntry(node, time.time_ns(), "t.row", str(i), "json",
                                               b"{}") for i in range(count)])
        assert not result.failures
    finally:
        producer.close()


# -- parameters ---------------------------------------------------------------------------

BAD_NUMBERS = ["", "x", "-1", "+1", " 1", "1 ", "1_000", "1.5", "0x10", "1e3", "\u0661",
               "\uff11", "\u00b2", "1\u200b", "1" * 41, "<img src=x onerror=alert(1)>"]


@pytest.mark.parametrize("param", ["after", "limit"])
@pytest.mark.parametrize("value", BAD_NUMBERS)
def test_after_and_limit_take_ascii_digits_only(param: str, value: str) -> None:
    with offline():
        reason = refused(Client().get(URL, {"node": "/a", param: value}), 400, param)
    assert reason == "must be 1 to 40 ASCII digits 0-9"  # the value is not echoed


@pytest.mark.parametrize("node", [XSS, "", "no/slash", "/", "/a\x00", "/a\u2028b",
                                  "/" + "x" * 255])
def test_an_invalid_node_is_refused_as_json_without_markup(node: str) -> None:
    with offline():
        reason = refused(Client().get(URL, {"node": node}), 400, "node")
    assert "node name" in reason


def test_the_node_reason_quotes_it_as_json_escapes() -> None:
    with offline():
        response = Client().get(URL, {"node": XSS})
    assert b"\\u003cscript\\u003e" in response.content
    assert "'<script>window.__pwned=1</script>'" in json.loads(response.content)["error"]


def test_missing_node_repeated_parameters_and_limit_out_of_range() -> None:
    with offline():
        client = Client()
        assert "missing" in refused(client.get(URL), 400, "node")
        assert "more than once" in refused(client.get(f"{URL}?node=/a&node=/b"), 400, "node")
        assert "more than once" in refused(client.get(f"{URL}?node=/a&after=1&after=2"), 400,
                                           "after")
        for limit in ("0", str(MAX_LIMIT + 1), "5000"):
            assert f"from 1 to {MAX_LIMIT}" in refused(
                client.get(URL, {"node": "/a", "limit": limit}), 400, "limit")


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"])
def test_other_methods_are_405_with_allow(method: str) -> None:
    with offline():
        response = Client().generic(method, f"{URL}?node={XSS}")
    refused(response, 405, None)
    assert response["Allow"] == "GET, HEAD"


def test_accepted_values_and_success_headers(online: Settings) -> None:
    append(online, "/ok", 3)
    client = Client()
    response = client.get(URL, {"node": "/ok"})
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Content-Security-Policy"] == "default-src 'none'; frame-ancestors 'none'"
    assert [e["seq"] for e in response.json()["entries"]] == [1, 2, 3]
    for params in ({"after": "0"}, {"after": "0002"}, {"after": "9" * 40}, {"limit": "1"},
                   {"limit": str(MAX_LIMIT)}):
        assert client.get(URL, {"node": "/ok", **params}).status_code == 200, params
    assert [e["seq"] for e in client.get(URL, {"node": "/ok", "after": "0002"}).json()[
        "entries"]] == [3]
    head = client.head(URL, {"node": "/ok"})
    assert head.status_code == 200 and head["X-Content-Type-Options"] == "nosniff"
    # a valid node name may hold markup: it comes back as JSON data, never as HTML
    node = "/" + XSS
    append(online, node, 1)
    body = client.get(URL, {"node": node})
    assert body["Content-Type"] == "application/json" and body.json()["node"] == node


def test_redis_unreachable_is_503_json() -> None:
    with offline():
        response = Client().get(URL, {"node": "/a"})
    refused(response, 503, None)
    assert response["Retry-After"] == "1"


def test_a_refused_read_is_403_json_naming_the_node() -> None:
    with offline(history_access="tests.test_history_http.deny"):
        reason = refused(Client().get(URL, {"node": "/private"}), 403, "node")
    assert "not allowed" in reason


# -- cost bound ---------------------------------------------------------------------------

def test_one_request_returns_at_most_max_limit_entries(online: Settings) -> None:
    capped = online.replace(history_maxlen=MAX_LIMIT + 500)
    with contextlib.contextmanager(django_side)(capped):
        append(capped, "/big", MAX_LIMIT + 200)
        client = Client()
        first = client.get(URL, {"node": "/big"}).json()  # limit defaults to the bound
        assert [e["seq"] for e in first["entries"]] == list(range(1, MAX_LIMIT + 1))
        rest = client.get(URL, {"node": "/big", "after": MAX_LIMIT}).json()
        assert [e["seq"] for e in rest["entries"]] == list(range(MAX_LIMIT + 1, MAX_LIMIT + 201))
        assert first["last_seq"] == rest["last_seq"] == MAX_LIMIT + 200


# -- rate-limit hook ----------------------------------------------------------------------

def deny(request: HttpRequest, node: str) -> bool:
    return False


def refuse_quietly(request: HttpRequest, node: str) -> bool:
    SEEN.append((request.path, node))
    return False


def refuse_for_a_while(request: HttpRequest, node: str) -> bool:
    raise HistoryRateLimited(retry_after_s=float(request.GET.get("wait", "2.5")))


def allow(request: HttpRequest, node: str) -> bool:
    SEEN.append((request.path, node))
    return True


def test_a_limiter_returning_false_is_429_before_any_redis_call() -> None:
    SEEN.clear()
    with offline(history_rate_limit="tests.test_history_http.refuse_quietly"):
        response = Client().get(URL, {"node": "/n/1"})
    assert "too many" in refused(response, 429, None)
    assert response["Retry-After"] == "1"
    assert SEEN == [(URL, "/n/1")]


@pytest.mark.parametrize(("wait", "header"), [("2.5", "3"), ("0", "1"), ("-4", "1"),
                                              ("30", "30"), ("inf", "60"), ("nan", "60")])
def test_history_rate_limited_gives_retry_after_in_whole_seconds(wait: str, header: str) -> None:
    with offline(history_rate_limit="tests.test_history_http.refuse_for_a_while"):
        response = Client().get(URL, {"node": "/n", "wait": wait})
    refused(response, 429, None)
    assert response["Retry-After"] == header


def test_limiter_runs_after_validation_and_before_the_access_check() -> None:
    SEEN.clear()
    with offline(history_rate_limit="tests.test_history_http.refuse_quietly",
                 history_access="tests.test_history_http.deny"):
        client = Client()
        refused(client.get(URL, {"node": "bad"}), 400, "node")
        assert SEEN == []  # a bad request costs the limiter nothing
        refused(client.get(URL, {"node": "/n"}), 429, None)
    with offline(history_rate_limit="tests.test_history_http.allow",
                 history_access="tests.test_history_http.deny"):
        refused(Client().get(URL, {"node": "/n"}), 403, "node")


def test_an_allowing_limiter_lets_the_read_through(online: Settings) -> None:
    SEEN.clear()
    append(online, "/allowed", 2)
    with contextlib.contextmanager(django_side)(
            online.replace(history_rate_limit="tests.test_history_http.allow")):
        body = Client().get(URL, {"node": "/allowed", "after": 1}).json()
    assert [e["seq"] for e in body["entries"]] == [2]
    assert SEEN == [(URL, "/allowed")]


@pytest.mark.django_db  # run_checks also runs the migration check (W001)
def test_a_bad_rate_limit_path_is_e003_at_start_and_a_clear_error_at_request() -> None:
    def found() -> dict[str, str]:
        return {m.id: m.msg for m in run_checks() if str(m.id).startswith("scalepub.")}

    with offline(history_rate_limit="nope.nothing"):
        assert "HISTORY_RATE_LIMIT']: cannot import 'nope.nothing'" in found()["scalepub.E003"]
        with pytest.raises(ImproperlyConfigured, match=r"SCALEPUB\['HISTORY_RATE_LIMIT'\]"):
            Client().get(URL, {"node": "/n"})
    with offline(history_rate_limit="os.sep"):
        assert "'os.sep' is not callable" in found()["scalepub.E003"]
    with offline(history_rate_limit="exampleproject.limits.history"):
        assert "scalepub.E003" not in found()


# -- the documented example: exampleproject.limits (cache framework) ----------------------

def test_the_cache_framework_example_limits_each_address(online: Settings,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from exampleproject import limits

    monkeypatch.setattr(limits, "MAX_REQUESTS", 3)
    monkeypatch.setattr(limits, "WINDOW_S", 4)
    append(online, "/limited", 1)
    cache.clear()
    with contextlib.contextmanager(django_side)(
            online.replace(history_rate_limit="exampleproject.limits.history")):
        time.sleep(limits.WINDOW_S - time.time() % limits.WINDOW_S)  # a window's start
        alice, bob = Client(REMOTE_ADDR="192.0.2.1"), Client(REMOTE_ADDR="192.0.2.2")
        for _ in range(3):
            assert alice.get(URL, {"node": "/limited"}).status_code == 200
        response = alice.get(URL, {"node": "/other"})
        refused(response, 429, None)
        wait = int(response["Retry-After"])
        assert 1 <= wait <= limits.WINDOW_S
        assert bob.get(URL, {"node": "/limited"}).status_code == 200  # another address
        time.sleep(wait)
        assert alice.get(URL, {"node": "/limited"}).status_code == 200  # the next window
