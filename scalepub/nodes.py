"""Pubsub node names: the default per model, and what a valid name looks like.

The readable name is the node id, everywhere: on the XMPP server, in Redis, in the history
URL, in the JS client and in ``scalepub tail``. There is no encoding to undo. ejabberd 23.01
accepts any Unicode text as a node id (tried: letters with accents, spaces, ``%``, quotes,
``&``, ``<``, emoji, empty segments, 100,000 bytes); what it cannot carry is what XML 1.0
cannot, so that, and what a parser would silently change, is refused here
(docs/protocol.md, "Node names").
"""

from __future__ import annotations

import re

MAX_NODE_BYTES = 255
# Noncharacters: U+FDD0..U+FDEF and the last two code points of every plane.
_NONCHARS = "\ufdd0-\ufdef" + "".join(
    f"{chr(plane << 16 | 0xFFFE)}{chr(plane << 16 | 0xFFFF)}" for plane in range(17))
# C0 controls (XML 1.0 has none but tab, LF and CR, and those three become spaces in an
# attribute a client writes them into literally: slixmpp does, so such a node could not be
# subscribed to), DEL and C1 controls (invisible, "discouraged" by XML), lone surrogates (not
# encodable as UTF-8), line and paragraph separators (line breaks to a log or a terminal).
_FORBIDDEN = re.compile(f"[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029{_NONCHARS}]")


class InvalidNodeName(ValueError):
    """A node name scalepub will not publish to."""


def default_node(app_label: str, model_name: str) -> str:
    """``/<app_label>/<ModelName>``, as django-pubsub named it."""
    return f"/{app_label}/{model_name}"


def validate_node(node: object) -> str:
    """Return ``node`` unchanged if valid, else raise InvalidNodeName saying why."""
    if not isinstance(node, str):
        raise InvalidNodeName(f"node name must be a str, got {type(node).__name__}: {_shown(node)}")
    if not node.startswith("/") or node == "/":
        raise InvalidNodeName(
            f"invalid node name {_shown(node)}: must start with / and name something, "
            "e.g. /app/Model or /app/Model/key")
    bad = _FORBIDDEN.search(node)
    if bad is not None:
        raise InvalidNodeName(
            f"invalid node name {_shown(node)}: character U+{ord(bad.group()):04X} at "
            f"position {bad.start()} (a control, separator, surrogate or noncharacter; "
            "XML cannot carry it unchanged)")
    size = len(node.encode("utf-8"))
    if size > MAX_NODE_BYTES:
        raise InvalidNodeName(
            f"node name {_shown(node)} is {size} bytes of UTF-8, more than {MAX_NODE_BYTES}")
    return node


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:80]}..."
