"""Pubsub node names: the default per model, and what a valid name looks like."""

from __future__ import annotations

import re

MAX_NODE_BYTES = 255
# Path-like names (the seed's "/twitter/Tweet"); a conservative alphabet that is safe in XML
# attributes, in URLs of a history endpoint, and on every XMPP server.
_SEGMENT = r"[A-Za-z0-9_.@:~+=-]+"
# \Z, not $: "$" also matches before a trailing newline, which the XML attribute the name
# goes into would turn into a space (another node on the server).
NODE_RE = re.compile(rf"/{_SEGMENT}(?:/{_SEGMENT})*\Z")


class InvalidNodeName(ValueError):
    """A node name scalepub will not publish to."""


def default_node(app_label: str, model_name: str) -> str:
    """``/<app_label>/<ModelName>``, as django-pubsub named it."""
    return f"/{app_label}/{model_name}"


def validate_node(node: object) -> str:
    """Return ``node`` if valid, else raise InvalidNodeName saying why."""
    if not isinstance(node, str):
        raise InvalidNodeName(f"node name must be a str, got {type(node).__name__}: {node!r}")
    if not NODE_RE.match(node):
        shown = repr(node) if len(node) <= 80 else f"{node[:80]!r}..."
        raise InvalidNodeName(
            f"invalid node name {shown}: must look like /app/Model or /app/Model/key, "
            "segments of letters, digits and _ . @ : ~ + = -"
        )
    if len(node) > MAX_NODE_BYTES:  # ASCII only by now: characters are bytes
        raise InvalidNodeName(f"node name longer than {MAX_NODE_BYTES} bytes: {node[:40]!r}...")
    return node
