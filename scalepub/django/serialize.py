"""Turn a model instance into the bytes a subscriber receives inside its ``<entry>``."""

from __future__ import annotations

from django.core import serializers
from django.db.models import Model

_XML_DECL_END = b"?>\n"


def serialize(instance: Model, fmt: str) -> bytes:
    """Django's XML (``<django-objects>`` without the XML declaration) or JSON serialization.

    The declaration is dropped so the shard can embed the bytes verbatim in a batch element;
    what remains still round-trips through ``serializers.deserialize(fmt, ...)``.
    """
    text: str = serializers.serialize(fmt, [instance])
    data = text.encode("utf-8")
    if fmt == "xml" and data.startswith(b"<?xml"):
        data = data[data.index(_XML_DECL_END) + len(_XML_DECL_END):]
    return data
