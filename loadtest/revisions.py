"""An older commit's ``scalepub`` package beside the checkout, for A/B benchmarks against it."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def package_tree(rev: str, parent: Path | None = None) -> Path:
    """A new directory (under ``parent``, else the system's temporary one) holding the
    ``scalepub`` package of ``rev``, from ``git archive``: put it first on PYTHONPATH. The
    checkout is left alone."""
    tree = Path(tempfile.mkdtemp(prefix=f"rev-{rev.replace('/', '_')}-", dir=parent))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "scalepub"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree
