"""The batch payload: many entries of one node in one ``<batch xmlns="urn:scalepub:1">``.

XEP-0060 allows one item per publish and one payload element per item, so a batch is that
single element. Its content is one CDATA section holding an XML fragment of ``<entry>``
elements. ejabberd's CPU per publish grows with the XML elements and entities it parses:
measured here (docs/benchmarks.md), 100 Django-XML entries as elements cost it 8.0 ms, as
escaped text 2.3 ms, as CDATA 1.7 ms. Subscribers parse the fragment, which they must do
anyway. The batch is built from the already serialized rows by concatenation: the shard
never parses or re-serializes a payload on the normal path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from xml.parsers import expat

NS_BATCH = "urn:scalepub:1"
NS_PUBSUB = "http://jabber.org/protocol/pubsub"

_ESCAPES = ((b"&", b"&amp;"), (b"<", b"&lt;"), (b">", b"&gt;"))
_ATTR_SPECIAL = re.compile(rb'[&"<\x00-\x1f]|\xef\xbf[\xbe\xbf]')
# In an attribute a parser turns tab, LF and CR into spaces unless they are references; the
# rest of these XML 1.0 cannot carry at all: a text pk holding them gets U+FFFD instead.
_ATTR_CHARS = re.compile(rb"[\x00-\x1f]|\xef\xbf[\xbe\xbf]")
_ATTR_REFS = {b"\t": b"&#9;", b"\n": b"&#10;", b"\r": b"&#13;"}
# An entry: head (node, seq, stream id: known only once Redis appended it) + tail (the rest).
_ENTRY_HEAD = b'<entry node="%s" seq="%d" id="%s%s'
_ENTRY_TAIL = b'" ts="%d" model="%s" pk="%s" fmt="%s">%s</entry>'
_ENTRY_END = b"</entry>"
_CDATA_END = b"]]>"
_CDATA_END_SPLIT = b"]]]]><![CDATA[>"  # "]]>" inside a CDATA section, split in two
_BATCH_HEAD = b'<batch xmlns="%s" node="%s" first="%d" last="%d" count="%d"><![CDATA['
_PUBLISH_HEAD = (b'<iq type="set" id="%s" to="%s"><pubsub xmlns="%s">'
                 b'<publish node="%s"><item id="%s">')
# A shard sees few distinct nodes many times: each is escaped once, then looked up (a plain
# dict: half the cost of functools.lru_cache on this path).
_NODE_CACHE = 65536
_node_attrs: dict[bytes, bytes] = {}
# Python's share of an entry held in memory besides its part: the Entry object, its stream
# id, seq and ts ints, the part's bytes header, list slots (tracemalloc, rounded up).
ENTRY_OVERHEAD_BYTES = 250
# Model labels repeat: each is escaped once (bounded like the node names).
_model_attrs: dict[bytes, bytes] = {}


@dataclass(slots=True)
class Entry:
    """One stream entry as the shard keeps it until the server confirmed it."""

    stream_id: bytes
    node: str
    seq: int
    ts_ns: int
    part: bytes  # the <entry> element, ready to go inside the batch's CDATA section
    # The envelope as read. The shard does not keep it (b""): a third of an entry's memory
    # for the rare dead letter, which reads it back from the stream by id (streams.py).
    raw: bytes = b""

    @property
    def held(self) -> int:
        """Bytes of memory this entry takes while the shard holds it (roughly)."""
        return len(self.part) + len(self.raw) + ENTRY_OVERHEAD_BYTES


def entry_part(*, node: bytes, seq: int, stream_id: bytes, ts_ns: int, model: bytes,
               pk: bytes, fmt: bytes, payload: bytes) -> bytes:
    """``<entry ...>payload</entry>``: XML payloads kept as they are, JSON escaped as text."""
    return entry_from_tail(node, seq, stream_id, entry_tail(ts_ns=ts_ns, model=model, pk=pk,
                                                            fmt=fmt, payload=payload))


def entry_tail(*, ts_ns: int, model: bytes, pk: bytes, fmt: bytes, payload: bytes) -> bytes:
    """The part of an ``<entry>`` after its ``id`` value: what the producer stores (envelope
    version 2), so the shard only splices node, seq and stream id in front of it."""
    body = payload if fmt == b"xml" else escape(payload)
    model_attr = _model_attrs.get(model) or _model_attr(model)
    pk_attr = pk if pk.isalnum() else _attr(pk)  # digits or letters (pure ASCII): as is
    tail = _ENTRY_TAIL % (ts_ns, model_attr, pk_attr, fmt, body)
    if _has_cdata_end(tail):
        tail = tail.replace(_CDATA_END, _CDATA_END_SPLIT)
    return tail


def _has_cdata_end(xml: bytes) -> bool:
    # find(), not ``in``: bytes' ``in`` first tries its operand as an int and clears the
    # TypeError (0.85 against 0.3 us on an entry here, once per entry on the relay and the
    # shard). "]" alone is one memchr and rare in XML payloads; a JSON payload always holds
    # one, and then the two finds cost about what ``in`` did.
    return xml.find(b"]") >= 0 and xml.find(_CDATA_END) >= 0


def entry_from_tail(node: bytes, seq: int, stream_id: bytes, tail: bytes) -> bytes:
    """The whole ``<entry>`` element: the shard's per-entry work on a version 2 envelope."""
    attr = _node_attrs.get(node) or node_attr(node)  # inline lookup: the per-entry path
    part = _ENTRY_HEAD % (attr, seq, stream_id, tail)
    # "]]>" must not end the batch's CDATA section early. entry_tail split the tail's; a node
    # name may hold one too, and so may a tail some other Redis writer made. Rare: undo the
    # tail's splits and split the whole element once.
    if _has_cdata_end(part):
        part = part.replace(_CDATA_END_SPLIT, _CDATA_END).replace(_CDATA_END, _CDATA_END_SPLIT)
    return part


def payload_of_tail(tail: bytes, *, ts_ns: int, model: bytes, pk: bytes, fmt: bytes) -> bytes:
    """The payload inside ``tail`` (entry_tail's inverse); ValueError if it does not hold one."""
    head = entry_tail(ts_ns=ts_ns, model=model, pk=pk, fmt=fmt, payload=b"")
    prefix, suffix = head[: -len(_ENTRY_END)], _ENTRY_END
    if not (tail.startswith(prefix) and tail.endswith(suffix)
            and len(tail) >= len(prefix) + len(suffix)):
        raise ValueError("the entry's XML does not match its fields")
    body = tail[len(prefix): len(tail) - len(suffix)].replace(_CDATA_END_SPLIT, _CDATA_END)
    return body if fmt == b"xml" else unescape(body)


@dataclass(slots=True)
class Batch:
    """Consecutive entries of one node, published as one pubsub item."""

    node: str
    shard: int
    entries: list[Entry] = field(default_factory=list)
    size: int = 0  # bytes of the entries' parts
    resends: int = 0  # times it was in flight when the connection dropped
    retries: int = 0  # times the server answered with a transient error
    read_at: float = 0.0  # time.monotonic() when its first (oldest) entry was read
    sent_at: float = 0.0  # time.monotonic() of the last send

    def add(self, entry: Entry) -> None:
        """Append an entry (same node, next seq)."""
        self.entries.append(entry)
        self.size += len(entry.part)

    @property
    def item_id(self) -> str:
        """Unique per node and stable across resends: the seq range it carries."""
        return f"{self.entries[0].seq}-{self.entries[-1].seq}"

    def payload(self) -> bytes:
        """The single payload element of the item."""
        head = _BATCH_HEAD % (NS_BATCH.encode(), node_attr(self.node.encode()),
                              self.entries[0].seq, self.entries[-1].seq, len(self.entries))
        return head + b"".join(e.part for e in self.entries) + b"]]></batch>"

    def split(self) -> tuple[Batch, Batch]:
        """Two halves, in order, to isolate an entry the server refuses."""
        mid = len(self.entries) // 2
        halves = (Batch(self.node, self.shard, read_at=self.read_at),
                  Batch(self.node, self.shard, read_at=self.read_at))
        for i, entry in enumerate(self.entries):
            halves[i >= mid].add(entry)
        return halves


def publish_iq(iq_id: str, service: str, batch: Batch, options: bytes = b"") -> bytes:
    """The raw publish IQ for ``batch``, built without an XML tree."""
    head = _PUBLISH_HEAD % (iq_id.encode(), service.encode(), NS_PUBSUB.encode(),
                            node_attr(batch.node.encode()), batch.item_id.encode())
    return head + batch.payload() + b"</item></publish>" + options + b"</pubsub></iq>"


def publish_options(access_model: str) -> bytes:
    """XEP-0060 §7.1.5 publish-options asking for ``access_model`` (none for open).

    Open is ejabberd's default, so open nodes get no options: nothing for it to check.
    Other node options (send_last_published_item) cannot ride here: ejabberd 23.01 refuses a
    publish-options field other than access_model and persist_items. ops/ejabberd forces
    them instead, and ``scalepub configure-nodes`` fixes older nodes (xmpp/nodeconfig.py).
    """
    if access_model == "open":
        return b""
    return (
        b'<publish-options><x xmlns="jabber:x:data" type="submit">'
        b'<field var="FORM_TYPE" type="hidden"><value>'
        b"http://jabber.org/protocol/pubsub#publish-options</value></field>"
        b'<field var="pubsub#access_model"><value>%s</value></field></x></publish-options>'
        % access_model.encode()
    )


def escape(data: bytes) -> bytes:
    """XML text escaping on bytes."""
    for raw, escaped in _ESCAPES:
        data = data.replace(raw, escaped)
    return data


def unescape(data: bytes) -> bytes:
    """escape()'s inverse."""
    return data.replace(b"&lt;", b"<").replace(b"&gt;", b">").replace(b"&amp;", b"&")


def node_attr(node: bytes) -> bytes:
    """A node name (UTF-8) escaped for a double-quoted XML attribute, computed once per node.

    Node names are free text (scalepub.nodes): ``&``, ``<`` and ``"`` are escaped; the
    characters an attribute could not carry unchanged are refused by ``validate_node``.
    """
    attr = _node_attrs.get(node)
    if attr is None:
        if len(_node_attrs) >= _NODE_CACHE:  # bounded: a shard normally sees far fewer
            _node_attrs.clear()
        attr = _node_attrs[node] = _attr(node)
    return attr


def _model_attr(model: bytes) -> bytes:
    if len(_model_attrs) >= _NODE_CACHE:
        _model_attrs.clear()
    attr = _model_attrs[model] = _attr(model)
    return attr


def _attr(text: bytes) -> bytes:
    if not _ATTR_SPECIAL.search(text):  # model labels and pks: almost always
        return text
    text = text.replace(b"&", b"&amp;").replace(b'"', b"&quot;").replace(b"<", b"&lt;")
    return _ATTR_CHARS.sub(lambda m: _ATTR_REFS.get(m.group(), "\ufffd".encode()), text)


def well_formed(entry: Entry) -> str | None:
    """None if the entry's XML parses, else the parser's complaint.

    The slow path, for batches that were in flight when the server dropped the connection:
    expat also refuses the control characters XML 1.0 cannot carry, which would break the
    stream even inside CDATA (Django's serializers never produce them).
    """
    parser = expat.ParserCreate()
    try:
        parser.Parse(entry.part.replace(_CDATA_END_SPLIT, _CDATA_END), True)
    except expat.ExpatError as exc:
        return f"not well-formed XML: {exc}"
    return None
