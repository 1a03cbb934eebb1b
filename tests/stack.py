"""Start and stop a private Redis + ejabberd (via ops/stack) on free loopback ports."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STACK = REPO / "ops" / "stack"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    """A running stack in its own state dir; ``env`` holds its SCALEPUB_* variables."""

    state_dir: Path
    control: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """Run ``ops/stack ARGS`` against this stack's state dir and ports."""
        return subprocess.run(
            [str(STACK), *args], env={**os.environ, **self.control}, text=True,
            capture_output=True, timeout=timeout, check=False,
        )

    def up(self) -> None:
        """Start (or confirm) the stack and read its environment."""
        done = self.run("up")
        if done.returncode:
            raise RuntimeError(f"ops/stack up failed:\n{done.stdout}\n{done.stderr}")
        self.env = parse_exports(self.run("env").stdout)

    def down(self) -> None:
        """Stop what ``up`` started."""
        self.run("down")

    def node_env(self, k: int) -> dict[str, str]:
        """``env`` pointed at ejabberd node ``k`` of a cluster (1: the first, ``env`` itself)."""
        if k == 1:
            return dict(self.env)
        return {**self.env, "SCALEPUB_XMPP_PORT": self.env[f"SCALEPUB_XMPP_PORT_{k}"],
                "SCALEPUB_BOSH_URL": self.env[f"SCALEPUB_BOSH_URL_{k}"],
                "SCALEPUB_WS_URL": self.env[f"SCALEPUB_WS_URL_{k}"]}


def parse_exports(text: str) -> dict[str, str]:
    """``export NAME='value'`` lines → dict."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, _, value = words[1].partition("=")
            env[name] = value
    return env


def new_stack(ejabberd_nodes: int = 1, **extra: str) -> Stack:
    """A stack on free ports in a fresh state dir the ejabberd user can reach.

    ``ejabberd_nodes``: clustered ejabberd nodes (``--ejabberd-nodes``), each on free ports.
    ``extra``: more ops/stack variables, e.g. ``SCALEPUB_XMPP_CERTFILE`` for STARTTLS.
    """
    state_dir = Path(tempfile.mkdtemp(prefix="scalepub-stack-"))
    state_dir.chmod(0o755)
    control = {
        "SCALEPUB_STACK_DIR": str(state_dir),
        "SCALEPUB_REDIS_PORT": str(free_port()),
        "SCALEPUB_XMPP_PORT": str(free_port()),
        "SCALEPUB_HTTP_PORT": str(free_port()),
        "SCALEPUB_EJABBERD_NODE": f"scalepubtest{os.getpid()}x{state_dir.name[-6:]}@localhost",
        # PostgreSQL only where asked for (SCALEPUB_POSTGRES="on", e.g. the session stack):
        # initdb and a start cost every other stack a few seconds.
        "SCALEPUB_POSTGRES": "off",
        "SCALEPUB_PG_PORT": str(free_port()),
        **extra,
    }
    if ejabberd_nodes > 1:
        control["SCALEPUB_EJABBERD_NODES"] = str(ejabberd_nodes)
        for k in range(2, ejabberd_nodes + 1):
            control[f"SCALEPUB_XMPP_PORT_{k}"] = str(free_port())
            control[f"SCALEPUB_HTTP_PORT_{k}"] = str(free_port())
    return Stack(state_dir, control)


def running(ejabberd_nodes: int = 1, **extra: str) -> Iterator[Stack]:
    """A ``new_stack(ejabberd_nodes, **extra)``, up while the generator is suspended and down
    after: the body of a stack fixture (``yield from running()``)."""
    s = new_stack(ejabberd_nodes, **extra)
    try:
        s.up()
        yield s
    finally:
        s.down()
