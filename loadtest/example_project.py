"""The example Django project, set up in a benchmark's own process (one place for it)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def use_example_project(db_path: Path | None = None, **env: str) -> None:
    """Make ``exampleproject`` importable and configure it, DEBUG off: its SQLite file
    ``db_path`` (if given) and ``SCALEPUB_*`` variables from ``env``. Then ``django.setup()``."""
    for path in (REPO / "example", REPO):
        sys.path.insert(0, str(path))
    os.environ["DJANGO_SETTINGS_MODULE"] = "exampleproject.settings"
    os.environ["DJANGO_DEBUG"] = "0"
    if db_path is not None:
        os.environ["EXAMPLE_DB"] = str(db_path)
    os.environ.update(env)
    import django

    django.setup()
