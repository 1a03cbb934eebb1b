"""The wheel ships the browser bundle as the Django static file ``scalepub/scalepub-client.js``
(hatch_build.py), and refuses to build without it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "client" / "js" / "dist" / "scalepub-client.iife.js"
STATIC = "scalepub/django/static/scalepub/scalepub-client.js"
FIND = """
import sys
sys.path.insert(0, sys.argv[1])  # before the editable checkout
import scalepub
from django.conf import settings
settings.configure(INSTALLED_APPS=["django.contrib.staticfiles", "scalepub.django"],
                   STATIC_URL="static/")
import django
django.setup()
from django.contrib.staticfiles import finders
print(scalepub.__file__)
print(finders.find("scalepub/scalepub-client.js"))
"""

pytestmark = pytest.mark.timeout(300)


def build_wheel(source: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                           "-q", "-w", str(out)], capture_output=True, text=True, timeout=240,
                          check=False)


def test_the_wheel_ships_the_bundle_as_a_static_file(tmp_path: Path) -> None:
    if not BUNDLE.exists():
        pytest.fail(f"{BUNDLE.relative_to(REPO)} is missing: run `make client`")
    done = build_wheel(REPO, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    [wheel] = tmp_path.glob("scalepub-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(STATIC) == BUNDLE.read_bytes()
        archive.extractall(tmp_path / "site")
    # Django's finder of an installed scalepub.django app serves it under that name.
    found = subprocess.run([sys.executable, "-c", FIND, str(tmp_path / "site")], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert found.split() == [str(tmp_path / "site" / "scalepub" / "__init__.py"),
                             str(tmp_path / "site" / STATIC)]


def test_no_wheel_without_the_bundle(tmp_path: Path) -> None:
    source = tmp_path / "src"  # the package's sources, without client/js/dist
    shutil.copytree(REPO / "scalepub", source / "scalepub",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "hatch_build.py", "README.md"):
        shutil.copy2(REPO / name, source / name)
    done = build_wheel(source, tmp_path / "out")
    assert done.returncode != 0
    assert "scalepub-client.iife.js is missing: run `make client`" in done.stderr
