"""Turn a model instance into the bytes a subscriber receives inside its ``<entry>``.

Every payload this returns can be embedded in a batch as is (docs/reliability.md §4):

- ``xml``: characters XML 1.0 cannot carry at all, not even as character references (C0
  controls other than tab, LF and CR; lone surrogates; U+FFFE, U+FFFF) are replaced by
  U+FFFD, the Unicode replacement character, and counted. CR is written as ``&#13;``:
  every XML parser turns a literal CR into LF, so it would not round-trip otherwise.
- ``json``: lossless. JSON escapes control characters itself; lone surrogates, U+FFFE and
  U+FFFF are written as ``\\uXXXX`` escapes (in JSON text they can only occur in strings).
- Either format: a payload larger than the batch byte cap allows (``BATCH_MAX_BYTES`` minus
  ``ENTRY_OVERHEAD_BYTES``) has its longest text fields cut, each ending with the visible
  marker ``…[truncated by scalepub: N characters cut]``. If the text fields alone cannot
  make it fit (a huge binary or JSON field), ``EntryTooLarge`` is raised: the row is logged
  and counted, never sent.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable
from typing import Any

from django.core import serializers
from django.core.serializers import xml_serializer
from django.db.models import Model
from django.utils.xmlutils import SimplerXMLGenerator

from scalepub import metrics
from scalepub.django.rowformat import row_format
from scalepub.django.runtime import runtime

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"
TRUNCATION_MARK = "\u2026[truncated by scalepub: %d characters cut]"
TRUNCATION_RE = re.compile(r"\u2026\[truncated by scalepub: (\d+) characters cut\]\Z")
# Room left for the <entry ...></entry> around a payload: its attributes hold a node of up
# to 255 bytes, a stream id, a timestamp, the model label and the pk.
ENTRY_OVERHEAD_BYTES = 1024
# Rounds of cutting per text field: an estimate that fell short is corrected next round.
CUT_ROUNDS_PER_FIELD = 4

# Not in XML 1.0's Char production: C0 controls but tab/LF/CR, surrogates, U+FFFE/U+FFFF.
NOT_XML_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
# NOT_XML_CHARS or CR: a text without any needs no change at all.
_NOT_XML_OR_CR = re.compile("[\x00-\x08\x0b-\x1f\ud800-\udfff\ufffe\uffff]")
_ASCII_NOT_XML_OR_CR = bytes([*range(0x09), *range(0x0b, 0x20)])
# What json.dumps(ensure_ascii=False) leaves raw although XML cannot carry it.
_NOT_XML_IN_JSON = re.compile("[\ud800-\udfff\ufffe\uffff]")


class EntryTooLarge(ValueError):
    """A row whose payload stays above the limit even with every text field cut."""


def serialize(instance: Model, fmt: str, max_bytes: int | None = None) -> bytes:
    """Django's XML (``<django-objects>``, no XML declaration) or JSON, safe for a batch.

    ``max_bytes`` bounds the payload as the shard will embed it (default: from the
    ``BATCH_MAX_BYTES`` setting). What remains round-trips through
    ``serializers.deserialize(fmt, ...)``, with the transformations in the module docstring.
    """
    limit = payload_limit() if max_bytes is None else max_bytes
    data = _plain_ascii(instance, fmt, limit)
    if data is not None:
        return data
    if _too_long(instance, limit):
        # Cannot fit (a character is at least a byte): skip rendering it whole.
        data, replaced = _cut_to_fit(instance, fmt, limit, dict(_text_fields(instance)))
    else:
        data, replaced = _render(instance, fmt)
        if wire_size(data, fmt) > limit:
            data, replaced = _cut_to_fit(instance, fmt, limit, dict(_text_fields(instance)))
    if replaced:
        metrics.PAYLOADS_ALTERED.labels(reason="xml_chars").inc()
        log.warning("scalepub: %s pk=%s: %d characters XML 1.0 cannot carry replaced by U+FFFD",
                    instance._meta.label, instance.pk, replaced)
    return data


def _plain_ascii(instance: Model, fmt: str, limit: int) -> bytes | None:
    """The payload of the usual row, found in one pass (None: take the full path): a model
    with a prepared serializer, ASCII text needing no change, within ``limit``. Then no field
    can be too long (each is in the text), and the full path would return these very bytes
    (it cost ~15 us more a save here, most of it its layers: loadtest/bench_ingest.py)."""
    prepared = row_format(type(instance))
    if prepared is None:
        return None
    if fmt == "xml":
        data = _ascii_as_is(prepared.xml(instance))
        return data if data is not None and len(data) <= limit else None
    text = prepared.json(instance)
    if text.isascii():  # JSON text in ASCII holds no character XML cannot carry
        data = text.encode("ascii")
        if wire_size(data, fmt) <= limit:
            return data
    return None


def plain_payload(instance: Model, fmt: str) -> bytes | None:
    """What ``serialize`` returns for a row it neither cuts nor alters, without its log and
    metrics; None for any other row (scalepub.django.onestatement, which serializes with a
    stand-in pk, then leaves the row to ``serialize`` with the real one)."""
    limit = payload_limit()
    if any(len(value) > limit for _, value in _text_fields(instance)):
        return None
    data, replaced = _render(instance, fmt)
    return data if not replaced and wire_size(data, fmt) <= limit else None


def payload_limit() -> int:
    """The largest payload the Django side sends: what fits one batch with its entry tag."""
    return max(runtime.settings().batch_max_bytes - ENTRY_OVERHEAD_BYTES, 0)


def wire_size(data: bytes, fmt: str) -> int:
    """Bytes the payload takes inside a batch (the shard escapes JSON as XML text)."""
    if fmt == "xml":
        return len(data)
    return len(data) + 4 * data.count(b"&") + 3 * (data.count(b"<") + data.count(b">"))


def _render(instance: Model, fmt: str) -> tuple[bytes, int]:
    """The payload bytes and how many characters were replaced by U+FFFD."""
    return _clean(instance, fmt, _text(instance, fmt))


def _text(instance: Model, fmt: str) -> str:
    """Django's serialization of the row: the model's prepared serializer, or Django's own."""
    prepared = row_format(type(instance))
    if prepared is None:
        return django_text(instance, fmt)
    return prepared.xml(instance) if fmt == "xml" else prepared.json(instance)


def django_text(instance: Model, fmt: str) -> str:
    """What Django's serializers write for the row (XML: no declaration, and characters XML
    cannot carry written as they are, for ``_clean``)."""
    if fmt == "xml":
        serializer = _XmlSerializer()
        serializer.serialize([instance])
        return str(serializer.getvalue())
    return str(serializers.serialize(fmt, [instance]))


def _clean(instance: Model, fmt: str, text: str) -> tuple[bytes, int]:
    """The payload bytes of Django's ``text``, safe for a batch (the module docstring)."""
    if fmt == "xml":
        # The usual row needs no change: one fast scan instead of three regex passes.
        if text.isascii():
            data = _ascii_as_is(text)
            if data is not None:
                return data, 0
        elif _NOT_XML_OR_CR.search(text) is None:
            return text.encode("utf-8"), 0
        text, replaced = NOT_XML_CHARS.subn(REPLACEMENT, text)
        # Attribute values come quoted with &#13; already; a raw CR can only be field text.
        return text.replace("\r", "&#13;").encode("utf-8"), replaced
    return _NOT_XML_IN_JSON.sub(_json_escape, text).encode("utf-8"), 0


def _ascii_as_is(text: str) -> bytes | None:
    """ASCII XML text that needs no change, encoded; else None. ASCII can only hold C0
    controls of the characters to change: deleting them is a table lookup per byte, ~5x
    faster than the regex."""
    if not text.isascii():
        return None
    data = text.encode("ascii")
    return data if len(data.translate(None, _ASCII_NOT_XML_OR_CR)) == len(data) else None


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


class _PermissiveXMLGenerator(SimplerXMLGenerator):
    """Writes every character; ``_clean`` replaces what XML cannot carry afterwards."""

    def characters(self, content: Any) -> None:
        # Django's generator raises on control characters; the whole output is cleaned
        # in one pass instead, which also covers attribute values such as a text pk.
        super(SimplerXMLGenerator, self).characters(content)


class _XmlSerializer(xml_serializer.Serializer):
    """Django's XML serializer writing through the permissive generator, no declaration."""

    def start_serialization(self) -> None:
        self.xml = _PermissiveXMLGenerator(self.stream, "utf-8")
        self.xml.startElement("django-objects", {"version": "1.0"})


def _cut_to_fit(instance: Model, fmt: str, limit: int,
                texts: dict[str, str]) -> tuple[bytes, int]:
    """Render a copy whose longest text fields are cut, with a marker, until it fits."""
    clone = copy.copy(instance)
    kept = {name: min(len(value), limit) for name, value in texts.items()}
    for field, keep in kept.items():
        if keep < len(texts[field]):
            setattr(clone, field, _truncated(texts[field], keep))
    for _ in range(CUT_ROUNDS_PER_FIELD * len(kept) + 1):
        data, replaced = _render(clone, fmt)
        excess = wire_size(data, fmt) - limit
        if excess <= 0:
            metrics.PAYLOADS_ALTERED.labels(reason="truncated").inc()
            cut = {n: len(texts[n]) - k for n, k in kept.items() if k < len(texts[n])}
            log.warning("scalepub: %s pk=%s: payload above %d bytes, text cut (characters "
                        "cut per field: %s)", instance._meta.label, instance.pk, limit, cut)
            return data, replaced
        name = _longest(kept)
        if name is None:
            break
        kept[name] = _shorter(getattr(clone, name), kept[name], excess)
        setattr(clone, name, _truncated(texts[name], kept[name]))
    raise EntryTooLarge(
        f"payload of {instance._meta.label} pk={instance.pk} stays above {limit} bytes "
        f"with its text fields cut (largest fields: {_largest_fields(instance)}); "
        "raise BATCH_MAX_BYTES or keep such data out of published models"
    )


def _too_long(instance: Model, limit: int) -> bool:
    """Whether a text field alone is longer than ``limit`` characters (a loop, not
    ``_text_fields``' lists: this runs for every row)."""
    prepared = row_format(type(instance))
    if prepared is None:
        return any(len(value) > limit for _, value in _text_fields(instance))
    for name in prepared.cuttable:
        value = getattr(instance, name)
        if isinstance(value, str) and len(value) > limit:
            return True
    return False


def _text_fields(instance: Model) -> list[tuple[str, str]]:
    """Plain text columns that may be cut: not the pk, not a relation, not JSON."""
    prepared = row_format(type(instance))
    if prepared is not None:
        names: Iterable[str] = prepared.cuttable
    else:
        names = [f.attname for f in instance._meta.concrete_fields
                 if f.serialize and not f.is_relation and not f.primary_key
                 and f.get_internal_type() != "JSONField"]
    values = [(name, getattr(instance, name)) for name in names]
    return [(name, value) for name, value in values if isinstance(value, str)]


def _longest(kept: dict[str, int]) -> str | None:
    """The text field with the most characters left (None when all are cut to nothing)."""
    candidates = [(k, name) for name, k in kept.items() if k > 0]
    return max(candidates)[1] if candidates else None


def _shorter(current: str, kept: int, excess: int) -> int:
    """How many original characters to keep so the field shrinks by about ``excess`` bytes.

    Bytes per character vary (UTF-8, escaping); the next round corrects an estimate that
    fell short, so this only has to shrink the field, which it always does.
    """
    # Raw field text: both formats end up escaping & < > (Django's XML, the shard's JSON).
    size = wire_size(current.encode("utf-8", "surrogatepass"), "json")
    marker = len(TRUNCATION_MARK.encode()) + 16
    target = size - excess - marker
    if target <= 0:
        return 0
    return min(kept - 1, kept * target // size)


def _truncated(original: str, keep: int) -> str:
    return original[:keep] + TRUNCATION_MARK % (len(original) - keep)


def _largest_fields(instance: Model) -> str:
    sizes = []
    for f in instance._meta.concrete_fields:
        value = getattr(instance, f.attname)
        if value is not None:
            size = len(value) if isinstance(value, str | bytes | memoryview) else len(str(value))
            sizes.append((size, f.name))
    return ", ".join(f"{name} ({size})" for size, name in sorted(sizes, reverse=True)[:3])
