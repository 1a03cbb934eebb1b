"""The suite leaves a developer's stack settings out of its runs (tests/conftest.py)."""

from __future__ import annotations

import os

from tests.conftest import KEPT_VARIABLES, inherited_settings


def test_what_ops_stack_env_exports_is_left_out_and_the_suites_knobs_stay() -> None:
    environ = {
        # `eval "$(ops/stack env)"` and the ops knobs of a developer's shell
        "SCALEPUB_REDIS_URL": "redis://127.0.0.1:6379/0", "SCALEPUB_XMPP_PORT": "5222",
        "DATABASE_URL": "postgres://scalepub:x@127.0.0.1:5432/scalepub",
        "SCALEPUB_REDIS_CLUSTER": "on", "SCALEPUB_POSTGRES": "on",
        # the suite's own knobs and unrelated variables
        **{name: "x" for name in KEPT_VARIABLES}, "PATH": "/usr/bin", "DATABASE": "x",
    }
    assert inherited_settings(environ) == [
        "DATABASE_URL", "SCALEPUB_POSTGRES", "SCALEPUB_REDIS_CLUSTER", "SCALEPUB_REDIS_URL",
        "SCALEPUB_XMPP_PORT"]


def test_this_run_has_none_of_them() -> None:
    assert inherited_settings(os.environ) == []
