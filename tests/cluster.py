"""A stack with a Redis Cluster (ops/stack up --redis-cluster) on free ports, and its nodes."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.stack import Stack, running

CLUSTER_NODES = 6
BUS_OFFSET = 10_000  # ops/lib/redis-cluster.sh: bus port = port + 10000


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port() -> int:
    """A first port P such that P..P+5 and their bus ports P+10000.. are free now."""
    for _ in range(200):
        base = random.randrange(20_000, 55_000 - BUS_OFFSET)
        ports = [base + i for i in range(CLUSTER_NODES)]
        if all(_free(p) and _free(p + BUS_OFFSET) for p in ports):
            return base
    raise RuntimeError("no free range of ports for a Redis Cluster")


def cluster_running() -> Iterator[Stack]:
    """A stack whose SCALEPUB_REDIS_URL is a 3+3 Redis Cluster: the body of a fixture."""
    yield from running(SCALEPUB_REDIS_CLUSTER="on",
                       SCALEPUB_REDIS_CLUSTER_PORT=str(free_cluster_port()))


@dataclass(frozen=True)
class Node:
    """One node of the stack's cluster as `redis-cli cluster nodes` shows it."""

    port: int
    node_id: str
    master: bool
    master_id: str  # "-" for a master
    slots: str
    failed: bool


def cluster_port(stack: Stack) -> int:
    """The first node's port."""
    return int(stack.control["SCALEPUB_REDIS_CLUSTER_PORT"])


def cli(port: int, *args: str, timeout: float = 30) -> str:
    """``redis-cli -p PORT ARGS`` output (raises if it fails)."""
    return subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                          capture_output=True, text=True, check=True, timeout=timeout).stdout


def nodes(stack: Stack, ask: int | None = None) -> list[Node]:
    """The cluster's nodes as seen by node ``ask`` (default: the first that answers)."""
    ports = [ask] if ask else [cluster_port(stack) + i for i in range(CLUSTER_NODES)]
    for port in ports:
        try:
            text = cli(port, "cluster", "nodes", timeout=5)
        except (subprocess.SubprocessError, OSError):
            continue
        out = []
        for line in text.splitlines():
            f = line.split()
            out.append(Node(int(f[1].split("@")[0].rsplit(":", 1)[1]), f[0], "master" in f[2],
                            f[3], " ".join(f[8:]), "fail" in f[2] and "fail?" not in f[2]))
        return sorted(out, key=lambda n: n.port)
    raise RuntimeError("no cluster node answers")


def master_of_slot(stack: Stack, slot: int) -> Node:
    """The live master serving ``slot``."""
    for node in nodes(stack):
        if node.master and not node.failed and _covers(node.slots, slot):
            return node
    raise LookupError(f"no master serves slot {slot}")


def _covers(slots: str, slot: int) -> bool:
    for part in slots.split():
        if part.startswith("["):  # a slot being migrated/imported
            continue
        lo, _, hi = part.partition("-")
        if int(lo) <= slot <= int(hi or lo):
            return True
    return False


def node_pid(stack: Stack, port: int) -> int:
    """The redis-server pid of the node on ``port``."""
    return int(Path(stack.state_dir, "redis-cluster", str(port), "redis.pid").read_text())


def kill_node(stack: Stack, port: int) -> int:
    """kill -9 the node on ``port``; returns its pid."""
    pid = node_pid(stack, port)
    os.kill(pid, signal.SIGKILL)
    return pid


def restart_node(stack: Stack, port: int) -> None:
    """Start a killed node again from its config (it rejoins as a replica)."""
    conf = Path(stack.state_dir, "redis-cluster", str(port), "redis.conf")
    subprocess.run(["redis-server", str(conf)], check=True, capture_output=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if cli(port, "ping", timeout=2).strip() == "PONG":
                return
        except subprocess.SubprocessError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"node {port} did not come back")
