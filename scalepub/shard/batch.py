"""The batch payload: many entries of one node in one ``<batch xmlns="urn:scalepub:1">``.

XEP-0060 allows one item per publish and one payload element per item, so a batch is that
single element. It is assembled from the already serialized rows by byte concatenation: the
shard never parses or re-serializes a payload on the normal path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from xml.parsers import expat

NS_BATCH = "urn:scalepub:1"
NS_PUBSUB = "http://jabber.org/protocol/pubsub"

_ESCAPES = ((b"&", b"&amp;"), (b"<", b"&lt;"), (b">", b"&gt;"))


@dataclass(slots=True)
class Entry:
    """One stream entry as the shard keeps it until the server confirmed it."""

    stream_id: bytes
    node: str
    seq: int
    ts_ns: int
    model: str
    pk: str
    fmt: str
    payload: bytes
    raw: bytes  # the envelope as read, for the dead-letter stream

    def xml(self) -> bytes:
        """``<entry ...>payload</entry>``; JSON payloads are escaped as text, XML kept as is."""
        body = self.payload if self.fmt == "xml" else escape(self.payload)
        head = (
            f'<entry node="{self.node}" seq="{self.seq}" id="{self.stream_id.decode()}" '
            f'ts="{self.ts_ns}" model="{_attr(self.model)}" pk="{_attr(self.pk)}" '
            f'fmt="{self.fmt}">'
        )
        return head.encode() + body + b"</entry>"


@dataclass(slots=True)
class Batch:
    """Consecutive entries of one node, published as one pubsub item."""

    node: str
    shard: int
    entries: list[Entry] = field(default_factory=list)
    size: int = 0  # bytes of the entries' XML
    parts: list[bytes] = field(default_factory=list)
    resends: int = 0  # times it was in flight when the connection dropped

    def add(self, entry: Entry, part: bytes | None = None) -> None:
        """Append an entry (same node, next seq); ``part`` is its XML if already built."""
        part = entry.xml() if part is None else part
        self.entries.append(entry)
        self.parts.append(part)
        self.size += len(part)

    @property
    def item_id(self) -> str:
        """Unique per node and stable across resends: the seq range it carries."""
        return f"{self.entries[0].seq}-{self.entries[-1].seq}"

    def payload(self) -> bytes:
        """The single payload element of the item."""
        first, last = self.entries[0].seq, self.entries[-1].seq
        head = (
            f'<batch xmlns="{NS_BATCH}" node="{self.node}" first="{first}" last="{last}" '
            f'count="{len(self.entries)}">'
        )
        return head.encode() + b"".join(self.parts) + b"</batch>"

    def split(self) -> tuple[Batch, Batch]:
        """Two halves, in order, to isolate an entry the server refuses."""
        mid = len(self.entries) // 2
        halves = (Batch(self.node, self.shard), Batch(self.node, self.shard))
        for i, entry in enumerate(self.entries):
            halves[i >= mid].add(entry)
        return halves


def publish_iq(iq_id: str, service: str, batch: Batch) -> bytes:
    """The raw publish IQ for ``batch``, built without an XML tree."""
    head = (
        f'<iq type="set" id="{iq_id}" to="{service}"><pubsub xmlns="{NS_PUBSUB}">'
        f'<publish node="{batch.node}"><item id="{batch.item_id}">'
    )
    return head.encode() + batch.payload() + b"</item></publish></pubsub></iq>"


def escape(data: bytes) -> bytes:
    """XML text escaping on bytes."""
    for raw, escaped in _ESCAPES:
        data = data.replace(raw, escaped)
    return data


def _attr(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


def well_formed(entry: Entry) -> str | None:
    """None if the entry's XML parses, else the parser's complaint (the slow, rare path)."""
    parser = expat.ParserCreate()
    try:
        parser.Parse(entry.xml(), True)
    except expat.ExpatError as exc:
        return f"not well-formed XML: {exc}"
    return None
