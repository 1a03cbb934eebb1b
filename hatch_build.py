"""Wheel build hook: ship the browser client's bundle as a Django static file.

``client/js/dist/scalepub-client.iife.js`` (``make client``) goes into the wheel as
``scalepub/django/static/scalepub/scalepub-client.js``, so ``{% static
'scalepub/scalepub-client.js' %}`` works in any project with ``scalepub.django`` installed.
A wheel built without the bundle would lack it silently: the build stops instead. Editable
installs (``pip install -e .``, made before ``make client``) take nothing: a source checkout
serves ``client/js/dist`` itself (README, "In the browser").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

BUNDLE = "client/js/dist/scalepub-client.iife.js"
STATIC = "scalepub/django/static/scalepub/scalepub-client.js"


class ClientBundleHook(BuildHookInterface):
    """Adds the JS bundle to standard wheels; refuses to build one without it."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        """Force-include the bundle (standard wheels only)."""
        if version != "standard":
            return
        bundle = Path(self.root) / BUNDLE
        if not bundle.is_file():
            raise FileNotFoundError(
                f"{BUNDLE} is missing: run `make client` (cd client/js && npm ci && npm run "
                "build) before building the wheel, which ships it as the static file "
                f"{STATIC.split('/static/', 1)[1]}")
        build_data["force_include"][str(bundle)] = STATIC
