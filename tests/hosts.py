"""Hosts simulated with network namespaces, for the scale-out tests (issue 14 §4).

Each host is a network namespace with one veth link to a bridge that lives in a namespace of
its own, so every address (10.77.0.0/24) exists only inside namespaces this module made and
no packet leaves them. The server host runs Redis and ejabberd (``ops/stack up`` inside its
namespace, then both moved onto the host's address); supervisors run in hosts of their own;
the test process itself works from a ``client`` host (producer, subscriber, lease log).

A process joins a host by being started while the calling thread is inside it: ``enter``
switches the calling thread's network namespace (setns(2)); children and threads started
meanwhile inherit it. A host's link is cut at the bridge (``ip link set ... down``): its
packets are dropped, its sockets are not told.

Where namespaces cannot be made (not root, no ``ip``, a container without CAP_SYS_ADMIN)
``network()`` gives a ``Loopback`` with the same interface: plain processes on 127.0.0.1,
each host reaching the server through its own cuttable TCP relays (a cut then resets
connections instead of dropping packets). ``describe()`` says which one runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import subprocess
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import redis

from tests.e2e import CuttableRelay
from tests.stack import Stack, new_stack

CLONE_NEWNET = 0x40000000
SUBNET = "10.77.0"
NETNS_DIR = Path("/run/netns")
IP = "ip"


def _ip(*args: str) -> None:
    subprocess.run([IP, *args], check=True, capture_output=True, text=True, timeout=30)


def netns_unavailable() -> str:
    """Why namespaces cannot be used here ('' if they can): tried by making one."""
    if os.geteuid() != 0:
        return "not root"
    name = f"spprobe{os.getpid()}"
    try:
        _ip("netns", "add", name)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        return f"`ip netns add` failed: {detail.strip()}"
    _ip("netns", "del", name)
    return ""


def _setns(path: Path | str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class Hosts(Protocol):
    """What the tests use of a simulated network."""

    def add(self, name: str) -> str: ...
    def enter(self, name: str) -> contextlib.AbstractContextManager[None]: ...
    def runs_in(self, pid: int, name: str) -> bool: ...
    def cut(self, name: str) -> None: ...
    def restore(self, name: str) -> None: ...
    def server_address(self, host: str, port: int) -> tuple[str, int]: ...
    def describe(self) -> str: ...
    def close(self) -> None: ...


class Namespaces:
    """Hosts as network namespaces linked by a bridge in a namespace of its own."""

    def __init__(self) -> None:
        self.tag = f"sp{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.switch = f"{self.tag}-sw"
        self.hosts: dict[str, str] = {}  # name -> address
        self._made: list[str] = []
        self._lock = threading.Lock()
        self._make(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def _make(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def ns(self, name: str) -> str:
        """The namespace of host ``name``."""
        return f"{self.tag}-{name}"

    def add(self, name: str) -> str:
        """A new host on the bridge; its address (the first host gets .1)."""
        address = f"{SUBNET}.{len(self.hosts) + 1}"
        ns = self.ns(name)
        self._make(ns)
        _ip("-n", self.switch, "link", "add", f"v-{name}", "type", "veth", "peer", "name",
            "eth0", "netns", ns)
        _ip("-n", self.switch, "link", "set", f"v-{name}", "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        self.hosts[name] = address
        return address

    @contextlib.contextmanager
    def enter(self, name: str) -> Iterator[None]:
        """The calling thread in host ``name``'s namespace; back where it was after."""
        back = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
        try:
            _setns(NETNS_DIR / self.ns(name))
            yield
        finally:
            try:
                if ctypes.CDLL(None, use_errno=True).setns(back, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back failed")
            finally:
                os.close(back)

    def runs_in(self, pid: int, name: str) -> bool:
        """Whether process ``pid`` is in host ``name``'s network namespace."""
        mine = os.stat(NETNS_DIR / self.ns(name))
        theirs = os.stat(f"/proc/{pid}/ns/net")
        return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)

    def cut(self, name: str) -> None:
        """Host ``name``'s link down at the bridge: its packets go nowhere."""
        _ip("-n", self.switch, "link", "set", f"v-{name}", "down")

    def restore(self, name: str) -> None:
        """Host ``name``'s link up again."""
        _ip("-n", self.switch, "link", "set", f"v-{name}", "up")

    def server_address(self, host: str, port: int) -> tuple[str, int]:
        """Where host ``host`` reaches the server's ``port``: the server host's address."""
        return self.hosts["server"], port

    def describe(self) -> str:
        """One line for the test output."""
        return (f"network namespaces {self.tag}-*: {len(self.hosts)} hosts on a bridge in "
                f"{self.switch}, {SUBNET}.0/24 inside them only")

    def close(self) -> None:
        """Kill every process left in the namespaces, then delete them (and their links)."""
        for ns in reversed(self._made):
            pids = subprocess.run([IP, "netns", "pids", ns], capture_output=True, text=True,
                                  check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            subprocess.run([IP, "netns", "del", ns], capture_output=True, check=False)
        self._made.clear()


class Loopback:
    """The fallback: every host is this machine's loopback; each host reaches the server
    through relays of its own, which ``cut`` closes."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.hosts: dict[str, str] = {}
        self._relays: dict[str, dict[int, CuttableRelay]] = {}

    def add(self, name: str) -> str:
        """A new host: 127.0.0.1."""
        self.hosts[name] = "127.0.0.1"
        self._relays[name] = {}
        return "127.0.0.1"

    @contextlib.contextmanager
    def enter(self, name: str) -> Iterator[None]:
        """Nothing to switch."""
        yield

    def runs_in(self, pid: int, name: str) -> bool:
        """Every process is on the one loopback."""
        return True

    def server_address(self, host: str, port: int) -> tuple[str, int]:
        """A relay of host ``host`` to the server's ``port`` (the server itself: the port)."""
        if host == "server":
            return "127.0.0.1", port
        relay = self._relays[host].get(port)
        if relay is None:
            relay = self._relays[host][port] = CuttableRelay(port)
            relay.open()
        return "127.0.0.1", relay.port

    def cut(self, name: str) -> None:
        """Close host ``name``'s relays (connections reset, new ones refused)."""
        for relay in self._relays[name].values():
            relay.cut()

    def restore(self, name: str) -> None:
        """Open host ``name``'s relays again on their ports."""
        for relay in self._relays[name].values():
            relay.open()

    def describe(self) -> str:
        """One line for the test output."""
        return (f"NO network namespaces ({self.reason}): plain processes on 127.0.0.1, "
                "link cuts by closing per-host TCP relays")

    def close(self) -> None:
        """Close every relay."""
        for relays in self._relays.values():
            for relay in relays.values():
                relay.cut()


def network(loopback: bool = False) -> Namespaces | Loopback:
    """Namespaces where they can be made (unless ``loopback``), else the loopback fallback."""
    reason = "loopback asked for" if loopback else netns_unavailable()
    return Loopback(reason) if reason else Namespaces()


class Server:
    """Redis and ejabberd on the ``server`` host, reachable from the other hosts."""

    def __init__(self, hosts: Namespaces | Loopback) -> None:
        self.hosts = hosts
        self.address = hosts.add("server")
        self.stack: Stack = new_stack(SCALEPUB_POSTGRES="off")
        with hosts.enter("server"):
            self.stack.up()
            if isinstance(hosts, Namespaces):
                self._listen_on(self.address)

    def _listen_on(self, address: str) -> None:
        """Move Redis and ejabberd from the namespace's loopback onto ``address``."""
        port = int(self.stack.env["SCALEPUB_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
        client = redis.Redis(host="127.0.0.1", port=port)
        client.config_set("bind", f"{address} 127.0.0.1")
        client.config_set("protected-mode", "no")  # the namespace is the protection
        client.close()
        etc = self.stack.state_dir / "ejabberd" / "etc"
        yml = etc / "ejabberd.yml"
        yml.write_text(yml.read_text().replace('ip: "127.0.0.1"', f'ip: "{address}"'))
        ejctl = ["ejabberdctl", "--ctl-config", str(etc / "ejabberdctl.cfg"), "--config-dir",
                 str(etc), "--config", str(yml), "--spool",
                 str(self.stack.state_dir / "ejabberd" / "spool"), "--logs",
                 str(self.stack.state_dir / "ejabberd" / "log"),
                 "--node", self.stack.control["SCALEPUB_EJABBERD_NODE"]]
        subprocess.run([*ejctl, "reload_config"], check=True, capture_output=True, timeout=60)

    def env_for(self, host: str) -> dict[str, str]:
        """The stack's SCALEPUB_* variables as host ``host`` reaches the server."""
        env = dict(self.stack.env)
        redis_port = int(env["SCALEPUB_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
        r_host, r_port = self.hosts.server_address(host, redis_port)
        x_host, x_port = self.hosts.server_address(host, int(env["SCALEPUB_XMPP_PORT"]))
        env["SCALEPUB_REDIS_URL"] = f"redis://{r_host}:{r_port}/0"
        env["SCALEPUB_XMPP_HOST"] = x_host
        env["SCALEPUB_XMPP_PORT"] = str(x_port)
        if x_host != "127.0.0.1":
            env["SCALEPUB_XMPP_TLS"] = "off"  # plain TCP inside the test's own namespaces
        for name in ("SCALEPUB_BOSH_URL", "SCALEPUB_WS_URL"):
            env[name] = re.sub(r"127\.0\.0\.1", self.address, env[name])
        return env

    def close(self) -> None:
        """``ops/stack down`` inside the server host."""
        with self.hosts.enter("server"):
            self.stack.down()


@contextlib.contextmanager
def simulated_hosts(*names: str, loopback: bool = False,
                    ) -> Iterator[tuple[Namespaces | Loopback, Server]]:
    """A network with a server host (Redis + ejabberd) and hosts ``names``; everything made
    is removed after, also when the body fails. ``loopback``: the fallback even where
    namespaces work (to test the fallback)."""
    hosts = network(loopback)
    server: Server | None = None
    try:
        server = Server(hosts)
        for name in names:
            hosts.add(name)
        print(f"\nhosts: {hosts.describe()}")
        if isinstance(hosts, Loopback) and not loopback:  # in the summary, not only with -s
            warnings.warn(f"scale-out hosts: {hosts.describe()}", stacklevel=3)
        yield hosts, server
    finally:
        try:
            if server is not None:
                server.close()
        finally:
            hosts.close()
