"""The wire format of one stream entry: a versioned msgpack map (see docs/protocol.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

VERSION = 1
FORMATS = ("xml", "json")

# Map keys, short because they repeat in every entry.
_FIELDS = ("v", "seq", "node", "ts", "model", "pk", "fmt", "payload")
_INT_FIELDS = ("seq", "ts")
_TEXT_FIELDS = ("node", "model", "pk", "fmt")

# What decode_fields returns: node, seq, ts_ns, model, pk, fmt, payload; text as UTF-8 bytes.
Fields = tuple[bytes, int, int, bytes, bytes, bytes, bytes]
_unpackb = msgpack.unpackb  # a module global: one lookup less per entry on the hot path


class EnvelopeError(ValueError):
    """Bytes that are not a scalepub envelope this version can read."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """One created row, as it travels from the Django side to a shard."""

    node: str
    seq: int
    ts_ns: int  # time.time_ns() at commit: the start of end-to-end latency
    model: str  # "app_label.modelname"
    pk: str
    fmt: str  # "xml" or "json"
    payload: bytes  # the serialized instance, embedded verbatim by the shard


def split_encode(
    node: str, *, ts_ns: int, model: str, pk: str, fmt: str, payload: bytes
) -> tuple[bytes, bytes]:
    """Encode everything but the seq: ``head + msgpack(seq) + tail`` is the full envelope.

    Redis assigns the per-node seq inside the append script, so the producer hands it the two
    halves and the script splices the packed counter in between.
    """
    packer = msgpack.Packer(use_bin_type=True)
    head = packer.pack_map_header(len(_FIELDS)) + packer.pack("v") + packer.pack(VERSION)
    head += packer.pack("seq")
    tail = b"".join(
        packer.pack(k) + packer.pack(v)
        for k, v in (("node", node), ("ts", ts_ns), ("model", model), ("pk", pk), ("fmt", fmt))
    )
    tail += packer.pack("payload") + packer.pack(payload)
    return head, tail


def encode(env: Envelope) -> bytes:
    """The full envelope bytes (what the stream holds)."""
    head, tail = split_encode(
        env.node, ts_ns=env.ts_ns, model=env.model, pk=env.pk, fmt=env.fmt, payload=env.payload
    )
    seq: bytes = msgpack.packb(env.seq)
    return head + seq + tail


def decode(data: bytes) -> Envelope:
    """Parse envelope bytes; raise EnvelopeError for anything malformed or of another version."""
    try:
        raw: Any = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise EnvelopeError(f"not msgpack: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("v") != VERSION:
        version = raw.get("v") if isinstance(raw, dict) else None
        raise EnvelopeError(f"unsupported envelope version {version!r} (this reader: {VERSION})")
    try:
        env = Envelope(
            node=raw["node"], seq=raw["seq"], ts_ns=raw["ts"], model=raw["model"],
            pk=raw["pk"], fmt=raw["fmt"], payload=raw["payload"],
        )
    except KeyError as exc:
        raise EnvelopeError(f"envelope lacks field {exc.args[0]!r}") from None
    types_ok = isinstance(env.payload, bytes) and isinstance(env.seq, int)
    if not (types_ok and isinstance(env.node, str)):
        raise EnvelopeError("envelope field of the wrong type")
    return env


def decode_fields(data: bytes) -> Fields:
    """The envelope's fields with text left as UTF-8 bytes, for the shard's hot path.

    The shard copies them into XML as they are, so it never needs str objects (a few us an
    entry matter at 100k entries/s). Raises EnvelopeError saying what is wrong: not msgpack,
    another version, a missing field, a field of the wrong type, text that is not UTF-8.
    """
    try:
        d = _unpackb(data, raw=True)
        fields = node, seq, ts, model, pk, fmt, payload = (
            d[b"node"], d[b"seq"], d[b"ts"], d[b"model"], d[b"pk"], d[b"fmt"], d[b"payload"])
        if d[b"v"] == VERSION:
            # isascii() exists on bytes only (raw=True gives no str): a type check and, when
            # True, a UTF-8 check that allocates nothing; ``|`` works on ints only.
            if (payload.isascii() and node.isascii() and model.isascii() and pk.isascii()
                    and fmt.isascii() and (seq | ts) >= 0):
                return fields
            if _utf8_text(fields):
                return fields
    except Exception:  # anything odd takes the slow path, which says what it is
        pass
    return _checked_fields(data)


def _utf8_text(fields: Fields) -> bool:
    """Whether the text fields are UTF-8 and seq and ts ints (raises on other types)."""
    for text in (fields[0], *fields[3:]):
        text.decode("utf-8")
    return isinstance(fields[1], int) and isinstance(fields[2], int)


def _checked_fields(data: bytes) -> Fields:
    """The slow path of decode_fields(): an EnvelopeError saying what is wrong."""
    try:
        raw: Any = msgpack.unpackb(data, raw=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            TypeError) as exc:  # TypeError: an unhashable map key
        raise EnvelopeError(f"not msgpack: {exc or type(exc).__name__}") from exc
    if not isinstance(raw, dict):
        raise EnvelopeError(f"envelope is not a map: {type(raw).__name__}")
    if raw.get(b"v") != VERSION:
        raise EnvelopeError(
            f"unsupported envelope version {raw.get(b'v')!r} (this reader: {VERSION})")
    for name in _FIELDS:
        if name.encode() not in raw:
            raise EnvelopeError(f"envelope lacks field {name!r}")
    for name in _INT_FIELDS:
        if not isinstance(raw[name.encode()], int):  # bool too, as on the fast path
            raise EnvelopeError(f"envelope field {name!r} is not an int: "
                                f"{type(raw[name.encode()]).__name__}")
    for name in (*_TEXT_FIELDS, "payload"):
        _check_utf8(name, raw[name.encode()])
    return (raw[b"node"], raw[b"seq"], raw[b"ts"], raw[b"model"], raw[b"pk"], raw[b"fmt"],
            raw[b"payload"])


def _check_utf8(name: str, value: object) -> None:
    what = "payload" if name == "payload" else f"envelope field {name!r}"
    if not isinstance(value, bytes):
        raise EnvelopeError(f"{what} is not text: {type(value).__name__}")
    try:
        value.decode("utf-8")  # invalid UTF-8 would break the XMPP stream
    except UnicodeDecodeError as exc:
        raise EnvelopeError(f"{what} is not UTF-8: {exc}") from None
