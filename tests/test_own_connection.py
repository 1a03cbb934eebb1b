"""A shard read's own Redis connection (connections.OwnConnection): replies in order, error
replies in their place, one deadline per round trip, and a fresh connection after a failure.

The fenced read that rides on it is exercised end to end by tests/test_fenced_read.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio as aredis

from scalepub.connections import OwnConnection, shard_client
from scalepub.settings import Settings


def test_replies_in_order_with_errors_in_their_place(settings_for: Settings) -> None:
    async def scenario() -> None:
        client = shard_client(settings_for)
        own = OwnConnection.of(client)
        assert own is not None
        try:
            replies = await own.execute([("SET", "own:k", "v"), ("INCR", "own:k"),
                                         ("EVALSHA", "0" * 40, 0), ("GET", "own:k")])
            assert replies[0] in (b"OK", True)
            assert isinstance(replies[1], redis.ResponseError)  # not an integer
            assert isinstance(replies[2], redis.exceptions.NoScriptError)
            assert replies[3] == b"v"
            # A blocking wait within the round trip: its own time on top of the deadline.
            started = time.monotonic()
            [woke] = await own.execute([("XREAD", "COUNT", 1, "BLOCK", 300, "STREAMS",
                                         "own:none", "$")], wait_s=0.3)
            assert woke is None and time.monotonic() - started >= 0.25
        finally:
            await own.aclose()
            await client.aclose()

    asyncio.run(scenario())


def test_a_silent_server_times_out_and_the_next_round_trip_reconnects() -> None:
    async def scenario() -> None:
        accepted: list[asyncio.StreamWriter] = []

        async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)  # reads nothing, answers nothing

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = aredis.Redis(host="127.0.0.1", port=port, socket_timeout=0.3)
        own = OwnConnection.of(client)
        assert own is not None
        try:
            started = time.monotonic()
            with pytest.raises(redis.TimeoutError):
                await own.execute([("PING",)])
            assert 0.25 <= time.monotonic() - started < 2.0
            with pytest.raises(redis.TimeoutError):
                await own.execute([("PING",)])
            assert len(accepted) == 2  # the half-read connection was dropped, a new one made
        finally:
            await own.aclose()
            await client.aclose()
            server.close()
            for writer in accepted:
                writer.close()

    asyncio.run(scenario())


def test_a_cluster_client_keeps_its_pipelines() -> None:
    assert OwnConnection.of(object()) is None
