"""The wire format of one stream entry: a versioned msgpack map (see docs/protocol.md).

Version 2 (what producers write) carries the entry's XML as it goes into the pubsub item,
but for the node, seq and stream id in front (``w``, built by scalepub.xmpp.batch), so the
shard only splices those in. Version 1 (entries written before) is read as well.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from scalepub.xmpp.batch import entry_tail, payload_of_tail

VERSION = 2  # what encode() and split_encode() write
VERSIONS = (1, 2)  # what the readers accept

# Map keys, short because they repeat in every entry. Version 2 has "w" instead of "payload".
_FIELDS = ("v", "seq", "node", "ts", "model", "pk", "fmt", "payload")
_FIELDS_2 = ("v", "seq", "node", "ts", "model", "pk", "fmt", "w")
_INT_FIELDS = ("seq", "ts")
_TEXT_FIELDS = ("node", "model", "pk", "fmt")

# What decode_fields returns: node, seq, ts_ns, model, pk, fmt, payload; text as UTF-8 bytes.
Fields = tuple[bytes, int, int, bytes, bytes, bytes, bytes]
# What decode_wire returns: node, seq, ts_ns, the entry's XML after its stream id.
Wire = tuple[bytes, int, int, bytes]
_unpackb = msgpack.unpackb  # a module global: one lookup less per entry on the hot path
# What precedes the seq in every envelope of a version: the map's header, "v", the version,
# the key "seq".
_HEADS = {v: msgpack.Packer().pack_map_header(len(_FIELDS)) + msgpack.packb("v") +
          msgpack.packb(v) + msgpack.packb("seq") for v in VERSIONS}


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
    fmt: str  # one of scalepub.settings.PAYLOAD_FORMATS
    payload: bytes  # the serialized instance, embedded verbatim by the shard


class EntryFields(Protocol):
    """What the encoders read of an entry (``producer.PendingEntry`` has these)."""

    @property
    def node(self) -> str: ...
    @property
    def ts_ns(self) -> int: ...
    @property
    def model(self) -> str: ...
    @property
    def pk(self) -> str: ...
    @property
    def fmt(self) -> str: ...
    @property
    def payload(self) -> bytes: ...


def split_encode(
    node: str, *, ts_ns: int, model: str, pk: str, fmt: str, payload: bytes,
    version: int = VERSION,
) -> tuple[bytes, bytes]:
    """Encode everything but the seq: ``head + msgpack(seq) + tail`` is the full envelope.

    Redis assigns the per-node seq inside the append script, so the producer hands it the two
    halves and the script splices the packed counter in between. ``version`` 1 writes the
    payload as it is (for readers older than version 2, and the tests).
    """
    _check_version(version)
    return _HEADS[version], _tail(_packer().pack, node, ts_ns, model, pk, fmt, payload, version)


def split_encode_many(entries: Iterable[EntryFields],
                      version: int = VERSION) -> tuple[bytes, list[bytes]]:
    """``split_encode`` of each entry: the head they share and each one's tail.

    One Packer packs them all: ``msgpack.packb`` makes a Packer per call, 1.2 of the 6 us
    an entry took here (the relay encodes every row it moves, holding the GIL).
    """
    _check_version(version)
    pack = _packer().pack
    return _HEADS[version], [_tail(pack, e.node, e.ts_ns, e.model, e.pk, e.fmt, e.payload,
                                   version) for e in entries]


def _packer() -> msgpack.Packer:
    # a Packer is not thread-safe (it reuses its buffer): one per call
    return msgpack.Packer(use_bin_type=True)


def _check_version(version: int) -> None:
    if version not in VERSIONS:
        raise ValueError(f"envelope version {version!r}: this writer knows {VERSIONS}")


def _tail(pack: Callable[..., bytes], node: str, ts_ns: int, model: str, pk: str, fmt: str,
          payload: bytes, version: int) -> bytes:
    if version == 1:
        last, value = "payload", payload
    else:
        last, value = "w", entry_tail(ts_ns=ts_ns, model=model.encode(), pk=pk.encode(),
                                      fmt=fmt.encode(), payload=payload)
    # One C call for the pairs after the seq: a 12-item list packs as its one-byte header
    # and then the items, keys and values in turn, as a map's pairs (a Packer and a pack per
    # item took ~26 us an entry here, most of the relay's per-row CPU).
    return pack(["node", node, "ts", ts_ns, "model", model, "pk", pk, "fmt", fmt, last,
                 value])[1:]


def encode(env: Envelope, version: int = VERSION) -> bytes:
    """The full envelope bytes (what the stream holds)."""
    head, tail = split_encode(
        env.node, ts_ns=env.ts_ns, model=env.model, pk=env.pk, fmt=env.fmt, payload=env.payload,
        version=version,
    )
    seq: bytes = msgpack.packb(env.seq)
    return head + seq + tail


def decode(data: bytes) -> Envelope:
    """Parse envelope bytes; raise EnvelopeError for anything malformed or of another version."""
    # The payload is not checked for UTF-8 here (the shard does that): history and tools
    # show whatever a broken producer wrote.
    raw = _checked(data, utf8_payload=False)
    return Envelope(node=raw[b"node"].decode(), seq=raw[b"seq"], ts_ns=raw[b"ts"],
                    model=raw[b"model"].decode(), pk=raw[b"pk"].decode(),
                    fmt=raw[b"fmt"].decode(), payload=_payload(raw))


def decode_fields(data: bytes) -> Fields:
    """The envelope's fields with text left as UTF-8 bytes (a version 2 payload unwrapped).

    Raises EnvelopeError saying what is wrong: not msgpack, another version, a missing field,
    a field of the wrong type, text that is not UTF-8.
    """
    try:
        fields = _fields_1(_unpackb(data, raw=True))
        if fields is not None:
            return fields
    except Exception:  # anything odd (or version 2) takes the checked path
        pass
    raw = _checked(data)
    return (raw[b"node"], raw[b"seq"], raw[b"ts"], raw[b"model"], raw[b"pk"], raw[b"fmt"],
            _payload(raw))


def decode_wire(data: bytes) -> Wire:
    """Node, seq, ts and the entry's XML after its stream id: the shard's hot path.

    A version 2 envelope carries that XML as is (a few us an entry matter at 100k
    entries/s); a version 1 envelope's is built from its fields. Raises EnvelopeError like
    decode_fields.
    """
    try:
        d = _unpackb(data, raw=True)
        if d[b"v"] == 2:
            wire = node, seq, ts, tail = d[b"node"], d[b"seq"], d[b"ts"], d[b"w"]
            # isascii() exists on bytes only (raw=True gives no str): a type check and, when
            # True, a UTF-8 check that allocates nothing; ``|`` works on ints only.
            if (tail.isascii() and node.isascii() and (seq | ts) >= 0) or _utf8_text(wire):
                return wire
        elif (fields := _fields_1(d)) is not None:  # written before version 2
            node, seq, ts, model, pk, fmt, payload = fields
            return node, seq, ts, entry_tail(ts_ns=ts, model=model, pk=pk, fmt=fmt,
                                             payload=payload)
    except Exception:  # anything odd takes the checked path, which says what it is
        pass
    raw = _checked(data)
    if raw[b"v"] == 1:
        tail = entry_tail(ts_ns=raw[b"ts"], model=raw[b"model"], pk=raw[b"pk"],
                          fmt=raw[b"fmt"], payload=raw[b"payload"])
    else:
        tail = raw[b"w"]
    return raw[b"node"], raw[b"seq"], raw[b"ts"], tail


def _fields_1(d: Any) -> Fields | None:
    """A version 1 map's fields if they are of the right types, else None (or raises)."""
    fields = node, seq, ts, model, pk, fmt, payload = (
        d[b"node"], d[b"seq"], d[b"ts"], d[b"model"], d[b"pk"], d[b"fmt"], d[b"payload"])
    if d[b"v"] != 1:
        return None
    if (payload.isascii() and node.isascii() and model.isascii() and pk.isascii()
            and fmt.isascii() and (seq | ts) >= 0):
        return fields
    return fields if _utf8_text(fields) else None


def _utf8_text(fields: Fields | Wire) -> bool:
    """Whether the text fields are UTF-8 and seq and ts ints (raises on other types)."""
    for text in (fields[0], *fields[3:]):
        text.decode("utf-8")
    return isinstance(fields[1], int) and isinstance(fields[2], int)


def _payload(raw: dict[bytes, Any]) -> bytes:
    """The payload of a checked envelope: as is (version 1) or out of its XML (version 2)."""
    if raw[b"v"] == 1:
        payload: bytes = raw[b"payload"]
        return payload
    try:
        return payload_of_tail(raw[b"w"], ts_ns=raw[b"ts"], model=raw[b"model"],
                               pk=raw[b"pk"], fmt=raw[b"fmt"])
    except ValueError as exc:
        raise EnvelopeError(f"envelope field 'w': {exc}") from None


def _checked(data: bytes, utf8_payload: bool = True) -> dict[bytes, Any]:
    """The envelope's map, or an EnvelopeError saying what is wrong with it."""
    try:
        raw: Any = msgpack.unpackb(data, raw=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            TypeError) as exc:  # TypeError: an unhashable map key
        raise EnvelopeError(f"not msgpack: {exc or type(exc).__name__}") from exc
    if not isinstance(raw, dict):
        raise EnvelopeError(f"envelope is not a map: {type(raw).__name__}")
    version = raw.get(b"v")
    if version not in VERSIONS:
        raise EnvelopeError(
            f"unsupported envelope version {version!r} (this reader: "
            f"{', '.join(map(str, VERSIONS))})")
    names = _FIELDS if version == 1 else _FIELDS_2
    for name in names:
        if name.encode() not in raw:
            raise EnvelopeError(f"envelope lacks field {name!r}")
    for name in _INT_FIELDS:
        if not isinstance(raw[name.encode()], int):  # bool too, as on the fast path
            raise EnvelopeError(f"envelope field {name!r} is not an int: "
                                f"{type(raw[name.encode()]).__name__}")
    for name in _TEXT_FIELDS:
        _check_utf8(name, raw[name.encode()])
    _check_utf8(names[-1], raw[names[-1].encode()], utf8_payload)
    return raw


def _check_utf8(name: str, value: object, utf8: bool = True) -> None:
    what = "payload" if name == "payload" else f"envelope field {name!r}"
    if not isinstance(value, bytes):
        raise EnvelopeError(f"{what} is not text: {type(value).__name__}")
    if not utf8:
        return
    try:
        value.decode("utf-8")  # invalid UTF-8 would break the XMPP stream
    except UnicodeDecodeError as exc:
        raise EnvelopeError(f"{what} is not UTF-8: {exc}") from None
