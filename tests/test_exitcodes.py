"""Which error ends a command with which exit code: one table, real exception classes."""

from __future__ import annotations

import importlib

import pytest
import redis

from scalepub import exitcodes
from scalepub.nodes import InvalidNodeName
from scalepub.settings import Settings, SettingsError
from scalepub.shard.streams import ShardCountMismatch
from scalepub.xmpp.link import XmppAuthError, XmppTlsError, XmppUnreachable


@pytest.mark.parametrize("name", sorted(exitcodes.BY_CLASS))
def test_every_name_in_the_table_is_an_exception_class(name: str) -> None:
    module, _, qualname = name.rpartition(".")
    cls = getattr(importlib.import_module(module), qualname)
    assert isinstance(cls, type) and issubclass(cls, BaseException)
    assert f"{cls.__module__}.{cls.__qualname__}" == name  # not a re-export: the MRO name


@pytest.mark.parametrize(("exc", "code"), [
    (SettingsError("SCALEPUB_SHARDS: must be greater than 0"), exitcodes.USAGE),
    (InvalidNodeName("invalid node name 'x'"), exitcodes.USAGE),
    (XmppUnreachable("cannot connect"), exitcodes.XMPP_UNREACHABLE),
    (XmppTlsError("no STARTTLS"), exitcodes.XMPP_UNREACHABLE),  # a subclass maps like its base
    (XmppAuthError("refused"), exitcodes.XMPP_AUTH),
    (redis.ConnectionError("refused"), exitcodes.REDIS_UNREACHABLE),
    (redis.AuthenticationError("WRONGPASS"), exitcodes.REDIS_UNREACHABLE),
    (redis.TimeoutError("timed out"), exitcodes.REDIS_UNREACHABLE),
    (ShardCountMismatch("written for 4 shards"), exitcodes.SHARD_COUNT_MISMATCH),
    (redis.ResponseError("WRONGTYPE"), exitcodes.FAILURE),
    (ValueError("a bug"), exitcodes.FAILURE),
])
def test_for_exception(exc: Exception, code: int) -> None:
    assert exitcodes.for_exception(exc) == code


def test_report_says_one_line_and_raises_a_bug_again() -> None:
    settings = Settings(redis_url="redis://:sekret@cache.example:6379/0")
    said: list[str] = []
    code = exitcodes.report(redis.ConnectionError("Connection refused"), settings, said.append)
    assert code == exitcodes.REDIS_UNREACHABLE
    assert said == ["cannot reach Redis at redis://:***@cache.example:6379/0: Connection refused"]
    bug = KeyError("x")
    with pytest.raises(KeyError) as raised:
        exitcodes.report(bug, settings, said.append)
    assert raised.value is bug and len(said) == 1
