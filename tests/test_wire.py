"""The shard hash and the envelope format (node names: tests/test_nodes.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from scalepub.envelope import (
    Envelope,
    EnvelopeError,
    decode,
    encode,
    split_encode,
    split_encode_many,
)
from scalepub.sharding import Keys, shard_for


def test_shard_hash_is_stable_across_processes() -> None:
    code = "from scalepub.sharding import shard_for; print([shard_for(f'/n/{i}', 8) for i in range(50)])"
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    assert outs == {str([shard_for(f"/n/{i}", 8) for i in range(50)]) + "\n"}
    assert shard_for("/twitter/Tweet", 8) == 2  # crc32("/twitter/Tweet") % 8, pinned for ever


def test_shard_keys_share_one_hash_tag() -> None:
    k = Keys("sp")
    tags = {key.split("{")[1].split("}")[0] for key in (k.stream(3), k.seqs(3), k.meta(3), k.dead(3))}
    assert tags == {"3"}


envelopes = st.builds(
    Envelope, node=st.text(min_size=1), seq=st.integers(1, 2**63 - 1),
    ts_ns=st.integers(0, 2**63 - 1), model=st.text(), pk=st.text(),
    fmt=st.sampled_from(["xml", "json"]), payload=st.binary(),
)
versions = st.sampled_from([1, 2])


@given(envelopes, versions)
def test_envelope_round_trip(env: Envelope, version: int) -> None:
    assert decode(encode(env, version)) == env


@given(envelopes, versions)
def test_split_encoding_splices_the_seq(env: Envelope, version: int) -> None:
    head, tail = split_encode(env.node, ts_ns=env.ts_ns, model=env.model, pk=env.pk,
                              fmt=env.fmt, payload=env.payload, version=version)
    assert decode(head + msgpack.packb(env.seq) + tail) == env


@given(st.lists(envelopes, max_size=5), versions)
def test_one_packer_encodes_many_as_one_at_a_time(envs: list[Envelope], version: int) -> None:
    # the relay's batch encoder shares a Packer between entries: nothing may carry over
    head, tails = split_encode_many(envs, version)
    decoded = [decode(head + msgpack.packb(env.seq) + tail)
               for env, tail in zip(envs, tails, strict=True)]
    assert decoded == envs
    with pytest.raises(ValueError, match="version 3"):
        split_encode_many(envs, 3)


def test_producers_write_version_2_with_the_entry_xml() -> None:
    env = Envelope("/a", 3, 5, "a.b", "7", "json", b'{"x": "<&>"}')
    raw = msgpack.unpackb(encode(env))
    assert raw["v"] == 2 and "payload" not in raw
    assert raw["w"] == b'" ts="5" model="a.b" pk="7" fmt="json">{"x": "&lt;&amp;&gt;"}</entry>'


def test_decode_rejects_other_versions_and_garbage() -> None:
    with pytest.raises(EnvelopeError, match="version 3"):
        decode(msgpack.packb({"v": 3}))
    with pytest.raises(EnvelopeError):
        decode(b"\xc1")
    with pytest.raises(EnvelopeError, match="lacks field"):
        decode(msgpack.packb({"v": 1, "seq": 1}))
    with pytest.raises(EnvelopeError, match="lacks field 'w'"):
        decode(msgpack.packb({"v": 2, "seq": 1, "node": "/a", "ts": 1, "model": "a.b",
                              "pk": "1", "fmt": "xml", "payload": b"<p/>"}))
    with pytest.raises(EnvelopeError, match="does not match its fields"):
        decode(msgpack.packb({"v": 2, "seq": 1, "node": "/a", "ts": 1, "model": "a.b",
                              "pk": "1", "fmt": "xml", "w": b'" ts="2" model="a.b">x</entry>'}))
