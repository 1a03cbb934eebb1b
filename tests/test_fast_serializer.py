"""The fast serializer (scalepub/django/rowformat.py) writes what Django's serializers write.

Property tests (hypothesis) over every field kind of ``fieldzoo.Wide`` (text with any code
point, numbers, decimals, booleans, nulls, dates, times and datetimes with and without time
zones, durations, UUIDs, binary, JSON, a foreign key, a custom field) compare, byte for byte:

- the prepared serializer's text with Django's serializers (``django_text``: Django's XML
  serializer through scalepub's permissive generator, Django's JSON serializer);
- for XML, with ``django.core.serializers.serialize("xml")`` itself whenever Django accepts the
  row; Django refuses C0 control characters (ValueError), where scalepub keeps its documented
  replacement by U+FFFD instead (docs/reliability.md §4);
- the payload ``serialize()`` returns with the one built from Django's text (so payloads are
  unchanged), and an error Django raises for a value of the wrong type, raised alike.

Many-to-many relations are rendered from the database (at creation, after ``add``, from a
prefetch); a saved row's outbox payload equals Django's serialization of it, USE_TZ on and off.
"""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import pytest
from django.core import serializers
from django.test import override_settings
from fieldzoo.models import Point, Tag, Tagged, Wide
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twitter.models import Tweet

from scalepub.django import serialize as serialize_module
from scalepub.django.models import OutboxEntry
from scalepub.django.rowformat import RowFormat, forget, row_format
from scalepub.django.serialize import _clean, _render, django_text, serialize
from tests.test_hostile import ANY_CHAR, ANY_TEXT, FORMATS

DECLARATION = '<?xml version="1.0" encoding="utf-8"?>\n'
C0 = "".join(chr(c) for c in range(0x20) if chr(c) not in "\t\n\r")

OFFSETS = st.timedeltas(min_value=-dt.timedelta(hours=23, minutes=59),
                        max_value=dt.timedelta(hours=23, minutes=59))
ZONES = st.one_of(st.none(), st.just(dt.UTC), OFFSETS.map(dt.timezone), st.timezones())
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
              st.text(ANY_CHAR, max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(ANY_CHAR, max_size=8), inner, max_size=4)),
    max_leaves=12)


def nullable(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


WIDE_VALUES = {
    "pk": nullable(st.integers(1, 2**63 - 1)),
    "title": ANY_TEXT, "body": ANY_TEXT, "slug": ANY_TEXT, "email": ANY_TEXT,
    "count": st.integers(-2**31, 2**31 - 1),
    "big": nullable(st.integers(-2**63, 2**63 - 1)),
    "small": nullable(st.integers(0, 32767)),
    "ratio": nullable(st.floats()),
    "amount": nullable(st.decimals()),
    "flag": st.booleans(),
    "maybe": nullable(st.booleans()),
    "day": nullable(st.dates()),
    "at": nullable(st.datetimes(timezones=ZONES)),
    "clock": nullable(st.times()),  # aware times: test_errors_are_djangos_too
    "span": nullable(st.timedeltas()),
    "token": st.uuids(),
    "blob": nullable(st.binary(max_size=40)),
    "data": JSON_VALUES,
    "where": nullable(st.builds(Point, st.integers(), st.integers())),
    "tag_id": nullable(st.integers(1, 2**63 - 1)),
}


def prepared(obj: Any) -> RowFormat:
    """The model's prepared serializer: it must exist, or these tests would test Django."""
    fmt = row_format(type(obj))
    assert fmt is not None, f"{type(obj).__name__} fell back to Django's serializer"
    return fmt


def fast_text(obj: Any, fmt: str) -> str:
    rf = prepared(obj)
    return rf.xml(obj) if fmt == "xml" else rf.json(obj)


def assert_same(obj: Any) -> None:
    """Fast and Django's text, payload and error are identical in both formats."""
    refused = False
    for fmt in FORMATS:
        try:
            want = django_text(obj, fmt)
        except Exception as exc:
            with pytest.raises(type(exc)) as raised:
                fast_text(obj, fmt)
            assert str(raised.value) == str(exc)
            refused = refused or fmt == "xml"
            continue
        assert fast_text(obj, fmt) == want
        assert _render(obj, fmt) == _clean(obj, fmt, want)
    if not refused:
        assert_djangos_own_xml(obj)


def assert_djangos_own_xml(obj: Any) -> None:
    """Django's XML serializer as shipped: the same text, or its refusal of C0 controls."""
    texts = [getattr(obj, f.attname) for f in type(obj)._meta.concrete_fields
             if f.get_internal_type() != "JSONField"]  # json.dumps escapes controls
    has_c0 = any(isinstance(t, str) and any(c in C0 for c in t) for t in texts)
    try:
        real = serializers.serialize("xml", [obj])
    except ValueError as exc:
        assert has_c0 and "unserializable characters" in str(exc)
        return
    assert not has_c0
    assert real == DECLARATION + fast_text(obj, "xml")


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.fixed_dictionaries(WIDE_VALUES))
@example(values={"title": "a\x00b\r\n<&>]]>\ud800\ufffe", "at": dt.datetime(
    2024, 3, 31, 2, 30, 0, 0, tzinfo=dt.timezone(dt.timedelta(hours=5, seconds=7))),
    "amount": Decimal("-0E-7"), "ratio": float("nan"), "data": {"\x00": [1.5, None, "\ud800"]},
    "pk": None})
def test_every_field_kind_matches_django(values: dict[str, Any]) -> None:
    assert_same(Wide(**values))


@settings(max_examples=300, deadline=None)
@given(values=st.fixed_dictionaries({
    "day": st.one_of(st.text(max_size=10), st.integers(), st.dates()),
    "blob": st.one_of(st.text(max_size=10), st.binary(max_size=5), st.none()),
    "clock": st.one_of(st.times(timezones=ZONES), st.text(max_size=5)),
    "at": st.one_of(st.text(max_size=10), st.floats(), st.datetimes()),
    "count": st.one_of(st.integers(), st.text(ANY_CHAR, max_size=5), st.floats()),
    "where": st.one_of(st.none(), st.text(max_size=5)),
    "data": st.one_of(st.sets(st.integers(), max_size=2), st.builds(object), JSON_VALUES),
}))
def test_errors_are_djangos_too(values: dict[str, Any]) -> None:
    """Values of the wrong type (a str in a DateField, an aware time in JSON ...): the same
    error as Django's serializer, or the same text where Django writes one."""
    assert_same(Wide(pk=7, title="t", **values))


@given(author=ANY_TEXT, text=ANY_TEXT, at=st.datetimes(timezones=ZONES))
@settings(max_examples=200, deadline=None)
def test_the_example_model_matches_django(author: str, text: str, at: dt.datetime) -> None:
    assert_same(Tweet(pk=3, author=author, text=text, created_at=at))


ASCII_TEXT = st.text(st.characters(max_codepoint=0x7F), max_size=60)


def full_path(obj: Any, fmt: str, limit: int) -> bytes | type[Exception]:
    """``serialize`` without its one-pass shortcut (what it returned before the shortcut), or
    the type of the error it raised."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(serialize_module, "_plain_ascii", lambda *args: None)
        try:
            return serialize(obj, fmt, max_bytes=limit)
        except Exception as exc:
            return type(exc)


def one_pass(obj: Any, fmt: str, limit: int) -> bytes | type[Exception]:
    try:
        return serialize(obj, fmt, max_bytes=limit)
    except Exception as exc:
        return type(exc)


@settings(max_examples=300, deadline=None)
@given(author=st.one_of(ASCII_TEXT, ANY_TEXT), text=st.one_of(ASCII_TEXT, ANY_TEXT),
       at=st.datetimes(timezones=ZONES), slack=st.integers(-40, 40))
def test_the_one_pass_payload_is_the_full_paths(author: str, text: str, at: dt.datetime,
                                               slack: int) -> None:
    """serialize's shortcut for the usual row (prepared serializer, plain ASCII, within the
    limit) returns what the full path returns, around the byte limit too (a cut row)."""
    obj = Tweet(pk=3, author=author, text=text, created_at=at)
    for fmt in FORMATS:
        size = len(fast_text(obj, fmt).encode("utf-8", "surrogatepass"))
        for limit in (10**6, max(size + slack, 0)):
            assert one_pass(obj, fmt, limit) == full_path(obj, fmt, limit), (fmt, limit)


@pytest.mark.django_db
def test_many_to_many_as_django_renders_it() -> None:
    tags = [Tag.objects.create(name=f"t{i}") for i in range(3)]
    row = Tagged.objects.create(title="at creation")
    assert '<field name="tags" rel="ManyToManyRel" to="fieldzoo.tag"></field>' in \
        fast_text(row, "xml")
    assert_same(row)
    row.tags.add(*tags)
    assert_same(row)  # the query Django runs, in the order the database answers
    [fetched] = Tagged.objects.prefetch_related("tags").filter(pk=row.pk)
    assert_same(fetched)  # the prefetched rows, no query


@pytest.mark.django_db
@pytest.mark.parametrize("use_tz", [True, False])
def test_saved_rows_outbox_payload_is_djangos(use_tz: bool) -> None:
    """Through the real save path (post_save -> outbox row), fixture values included."""
    zone = dt.timezone(dt.timedelta(hours=-3, minutes=-30)) if use_tz else None
    with override_settings(USE_TZ=use_tz):
        tag = Tag.objects.create(name="x")
        row = Wide.objects.create(
            title="é <&> \x01 \r\n \U0001f600", body="b" * 300, slug="s", email="a@b.c",
            count=-5, big=2**62, small=7, ratio=0.1, amount=Decimal("12.345600"), flag=True,
            day=dt.date(2026, 12, 3), at=dt.datetime(2026, 12, 3, 9, 30, 1, 250, tzinfo=zone),
            clock=dt.time(23, 59, 59, 999999), span=dt.timedelta(days=-1, microseconds=3),
            token=uuid.UUID(int=5), blob=b"\x00\xff", data={"k": [1, "\u2028", None]},
            where=Point(-1, 2), tag=tag)
        [entry] = OutboxEntry.objects.filter(object_pk=str(row.pk), model="fieldzoo.wide")
        assert entry.fmt == "xml"
        assert bytes(entry.payload) == _clean(row, "xml", django_text(row, "xml"))[0]
        assert_same(row)
        assert_same(Wide.objects.get(pk=row.pk))  # as read back from the database


class WideProxy(Wide):
    """A proxy: Django labels its rows with the proxy's name, fields are the concrete model's."""

    class Meta:
        proxy = True
        app_label = "fieldzoo"


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.fixed_dictionaries(WIDE_VALUES))
def test_a_proxy_model_matches_django(values: dict[str, Any]) -> None:
    row = WideProxy(**values)
    assert '<object model="fieldzoo.wideproxy"' in fast_text(row, "xml")
    assert_same(row)


def test_prepared_once_per_model() -> None:
    forget(Wide)
    first = row_format(Wide)
    assert first is row_format(Wide)
    assert len(first.xml_parts) == 20 and len(first.json_parts) == 20  # type: ignore[union-attr]
    forget()
    assert row_format(Wide) is not first


def test_no_query_for_a_row_without_many_to_many() -> None:
    """Not marked django_db: any query would fail this test (pytest-django blocks it)."""
    row = Wide(pk=1, title="t", tag_id=4)
    for fmt in FORMATS:
        assert serialize(row, fmt, max_bytes=10**6) == _clean(row, fmt, django_text(row, fmt))[0]
