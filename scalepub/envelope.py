"""The wire format of one stream entry: a versioned msgpack map (see docs/protocol.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

VERSION = 1
FORMATS = ("xml", "json")

# Map keys, short because they repeat in every entry.
_FIELDS = ("v", "seq", "node", "ts", "model", "pk", "fmt", "payload")


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
