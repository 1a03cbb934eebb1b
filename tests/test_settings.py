"""Settings: env, Django dict and CLI overrides; errors name the setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from scalepub.settings import Settings, SettingsError, env_mapping

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_valid() -> None:
    s = Settings()
    assert s.shards == 8 and s.payload_format == "xml" and s.xmpp_host_is_loopback


def test_from_env_parses_types_and_overrides_win() -> None:
    env = {"SCALEPUB_SHARDS": "3", "SCALEPUB_REDIS_TIMEOUT": "0.25", "SCALEPUB_XMPP_PORT": "5333"}
    s = Settings.from_env(env, shards=5)
    assert (s.shards, s.redis_timeout, s.xmpp_port) == (5, 0.25, 5333)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SCALEPUB_SHARDS": "eight"}, "SCALEPUB_SHARDS: expected int, got 'eight'"),
        ({"SCALEPUB_SHARDS": "0"}, "SCALEPUB_SHARDS: must be greater than 0"),
        ({"SCALEPUB_REDIS_URL": "http://x"}, "SCALEPUB_REDIS_URL: must be a redis://"),
        ({"SCALEPUB_PAYLOAD_FORMAT": "yaml"}, "SCALEPUB_PAYLOAD_FORMAT: must be one of xml, json"),
        ({"SCALEPUB_XMPP_JID": "nobody"}, "SCALEPUB_XMPP_JID: must be a bare JID"),
        ({"SCALEPUB_XMPP_PORT": "70000"}, "SCALEPUB_XMPP_PORT: must be a TCP port"),
    ],
)
def test_env_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    assert message in str(err.value)


def test_django_mapping_errors_name_the_key() -> None:
    with pytest.raises(SettingsError, match=r"SCALEPUB\['SHARDS'\]: expected int"):
        Settings.from_mapping({"SHARDS": "many"})
    with pytest.raises(SettingsError, match=r"SCALEPUB\['SHARD'\]: unknown setting"):
        Settings.from_mapping({"SHARD": 4})
    with pytest.raises(SettingsError, match=r"SCALEPUB\['WINDOW'\]: expected int, got True"):
        Settings.from_mapping({"WINDOW": True})
    assert Settings.from_mapping({"SHARDS": 2, "LINGER_MS": 1}).linger_ms == 1.0


def test_password_never_shown() -> None:
    s = Settings(xmpp_password="hunter2")
    assert "hunter2" not in repr(s)


def test_cli_override_errors_name_the_flag() -> None:
    with pytest.raises(SettingsError, match="--window: must be greater than 0"):
        Settings().replace(window=0)


def test_env_mapping_takes_only_known_settings() -> None:
    env = {"SCALEPUB_SHARDS": "2", "SCALEPUB_STACK_DIR": "/x", "SCALEPUB_WINDOW": ""}
    assert env_mapping(env) == {"SHARDS": "2"}


def test_django_start_fails_naming_the_setting() -> None:
    env = {**os.environ, "SCALEPUB_SHARDS": "-1", "PYTHONPATH": str(REPO / "example")}
    done = subprocess.run(
        [sys.executable, str(REPO / "example" / "manage.py"), "check"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode != 0
    assert "SCALEPUB['SHARDS']: must be greater than 0" in done.stderr


def test_a_bad_redis_url_is_named_without_its_password() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_mapping({"REDIS_URL": "http://user:sekret@cache.example/0"})
    assert "SCALEPUB['REDIS_URL']" in str(caught.value)
    assert "sekret" not in str(caught.value) and "user:***@cache.example" in str(caught.value)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://127.0.0.1:notaport/0", "the port must be a number 1-65535"),
        ("redis://127.0.0.1:70000/0", "the port must be a number 1-65535"),
        ("redis://127.0.0.1:0/0", "the port must be a number 1-65535"),  # redis-py: 6379
        ("redis://:6379", "must name the host"),
        ("redis://127.0.0.1:6379/abc", "the database 'abc' must be a whole number"),  # redis-py: db 0
        ("redis://127.0.0.1:6379/-1", "the database '-1' must be a whole number"),
        ("redis://127.0.0.1:6379/0/1", "the database '0/1' must be a whole number"),  # redis-py: db 1
        ("redis://127.0.0.1?db=two", "the database 'two' must be a whole number"),
        ("unix:///run/redis.sock?db=x", "the database 'x' must be a whole number"),
        ("unix://", "must name the socket"),
        ("redis://127.0.0.1/0?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
    ],
)
def test_a_malformed_redis_url_is_named(url: str, problem: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"SCALEPUB_REDIS_URL": url})
    assert str(caught.value).startswith(f"SCALEPUB_REDIS_URL: {problem}"), caught.value
    with pytest.raises(SettingsError, match=r"^SCALEPUB\['REDIS_URL'\]: "):
        Settings.from_mapping({"REDIS_URL": url})


@pytest.mark.parametrize(("url", "db"), [
    ("redis://127.0.0.1:6379/0", 0), ("rediss://u:p@cache.example:6380/15", 15),
    ("redis://[::1]:6379", 0), ("redis://localhost/", 0), ("unix:///run/redis.sock", 0),
    ("unix:///run/redis.sock?db=3", 3), ("redis://h/2?socket_timeout=0.5", 2),
])
def test_well_formed_redis_urls_pass_and_mean_what_redis_py_reads(url: str, db: int) -> None:
    import redis

    settings = Settings.from_env({"SCALEPUB_REDIS_URL": url})
    kwargs = redis.ConnectionPool.from_url(settings.redis_url).connection_kwargs
    assert kwargs.get("db", 0) == db
    if url.startswith("unix"):
        assert kwargs["path"] == "/run/redis.sock"
    else:
        assert kwargs.get("port", 6379) == (urlsplit(url).port or 6379)
