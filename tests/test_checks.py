"""System checks: a newcomer's mistakes reported by ``manage.py check``, not as tracebacks."""

from __future__ import annotations

import io

import pytest
import redis
from django.core.checks import run_checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection
from django.test import override_settings
from twitter.models import Tweet

from scalepub.django.outbox import OutboxTableMissing
from scalepub.settings import Settings
from scalepub.sharding import Keys
from tests.stack import free_port

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]  # W001 reads the DB


def messages(**kwargs: object) -> dict[str, str]:
    """``{check id: message}`` of scalepub's checks."""
    return {m.id: m.msg for m in run_checks(**kwargs) if str(m.id).startswith("scalepub.")}


def test_a_correct_setup_has_no_issue(settings_for: Settings) -> None:
    with override_settings(SCALEPUB={"REDIS_URL": settings_for.redis_url}):
        assert messages() == {}


def test_bad_setting_is_e001_naming_it() -> None:
    with override_settings(SCALEPUB={"SHARDS": 0}):
        found = messages()
        assert found == {"scalepub.E001": "SCALEPUB['SHARDS']: must be greater than 0 (got 0)"}
        with pytest.raises(SystemCheckError, match=r"scalepub\.E001.*SHARDS"):
            call_command("check", stdout=io.StringIO())
    with override_settings(SCALEPUB={"REDIS_URL": "http://x"}):
        assert "SCALEPUB['REDIS_URL']" in messages()["scalepub.E001"]
    with override_settings(SCALEPUB=["REDIS_URL"]):
        assert "must be a dict" in messages()["scalepub.E001"]


def test_bad_history_access_is_e002_at_start() -> None:
    with override_settings(SCALEPUB={"HISTORY_ACCESS": "nope.nothing"}):
        assert "cannot import 'nope.nothing'" in messages()["scalepub.E002"]
    with override_settings(SCALEPUB={"HISTORY_ACCESS": "os.sep"}):
        assert "'os.sep' is not callable" in messages()["scalepub.E002"]
    with override_settings(SCALEPUB={"HISTORY_ACCESS": "os.path.exists"}):
        assert "scalepub.E002" not in messages()


def test_unapplied_migration_is_w001_and_a_clear_error_at_the_first_save(
    outbox_django: Settings,
) -> None:
    call_command("migrate", "scalepub", "zero", verbosity=0)
    try:
        found = messages(databases=["default"])
        assert "0001_initial" in found["scalepub.W001"]
        assert "not applied to database 'default'" in found["scalepub.W001"]
        out = io.StringIO()
        call_command("check", stdout=out, stderr=out)  # a warning: the command succeeds
        assert "scalepub.W001" in out.getvalue() and "manage.py migrate" in out.getvalue()
        with pytest.raises(OutboxTableMissing, match=r"manage\.py migrate"):
            Tweet.objects.create(author="ann", text="no outbox table")
        assert not Tweet.objects.exists()  # the create rolled back with it
    finally:
        call_command("migrate", "scalepub", verbosity=0)
    assert "scalepub.W001" not in messages(databases=["default"])
    Tweet.objects.create(author="ann", text="table back")  # found again after migrate
    assert connection.introspection.table_names().count("scalepub_outbox") == 1


def test_shard_count_differing_from_the_pool_is_w002(
    settings_for: Settings, redis_client: redis.Redis
) -> None:
    mapping = {"REDIS_URL": settings_for.redis_url, "KEY_PREFIX": settings_for.key_prefix,
               "SHARDS": 4}
    with override_settings(SCALEPUB=mapping):
        assert "scalepub.W002" not in messages()  # nothing recorded yet
        redis_client.set(Keys(settings_for.key_prefix).shard_count, 4)
        assert "scalepub.W002" not in messages()
        redis_client.set(Keys(settings_for.key_prefix).shard_count, 3)
        found = messages()["scalepub.W002"]
        assert "SCALEPUB['SHARDS'] is 4 but the pool recorded 3 shards" in found
    closed = {**mapping, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    with override_settings(SCALEPUB=closed):
        assert messages() == {}  # Redis unreachable: skipped quietly
