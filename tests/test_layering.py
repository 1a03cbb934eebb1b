"""The layering holds at run time: the pool and the CLI load no Django module."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import scalepub

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
import {module}
print(json.dumps(sorted(m for m in sys.modules if m == "django" or m.startswith("django."))))
"""


@pytest.mark.parametrize("module", ["scalepub.shard.pool", "scalepub.shard.worker",
                                    "scalepub.shard.process", "scalepub.cli"])
def test_importing_the_pool_loads_no_django(module: str) -> None:
    # A fresh interpreter: this one has Django loaded by pytest-django.
    done = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(done.stdout) == []


def test_the_probe_sees_django_when_it_is_loaded() -> None:
    """The probe above is not blind: a module that loads Django shows up."""
    done = subprocess.run([sys.executable, "-c", PROBE.format(module="django.db")], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True)
    assert "django.db" in json.loads(done.stdout)


def test_the_core_contract_names_every_module_outside_scalepub_django() -> None:
    """A new core module must join the import-linter contract, or it would go unchecked."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    core = next(c for c in config["contracts"] if c["id"] == "core-without-django")
    modules = {f"scalepub.{m.name}" for m in pkgutil.iter_modules(scalepub.__path__)}
    assert set(core["source_modules"]) == modules - {"scalepub.django"}
