"""Where a load test's processes run: the system under test on CPUs apart from the generator.

A latency figure is only about the system under test when the load generator (the
subscribers) had CPU to spare. So the run places ejabberd, Redis and the shard pool (the
*sut*) on some CPUs, and the subscriber processes (the *generator*) and the example project's
producers (the *app*) on others, with ``sched_setaffinity`` (inherited by every child and
thread started afterwards), and can cap the generator with a CPU quota (cgroups, v2 or v1;
where neither is writable, by stopping and continuing it on a duty cycle) to show what a
starved generator looks like. ``Placement.parse`` reads the scenario's ``pin`` setting.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROLES = ("sut", "generator", "app")
CGROUP_V2 = Path("/sys/fs/cgroup")
CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")
QUOTA_PERIOD_US = 100_000


class PinningError(ValueError):
    """The ``pin`` setting cannot be applied on this machine; the message names it."""


@dataclass(frozen=True)
class Placement:
    """CPU sets per role; an empty set means: not pinned (any CPU)."""

    sut: frozenset[int] = frozenset()
    generator: frozenset[int] = frozenset()
    app: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, spec: str, available: set[int] | None = None) -> Placement:
        """``auto``, ``off``, or e.g. ``sut=0 generator=1 app=1`` (CPU lists like ``0-2,5``)."""
        cpus = set(os.sched_getaffinity(0)) if available is None else set(available)
        if spec == "off":
            return cls()
        if spec == "auto":
            return cls.auto(cpus)
        sets: dict[str, frozenset[int]] = {}
        for part in spec.split():
            role, _, listed = part.partition("=")
            if role not in ROLES or not listed:
                raise PinningError(f"pin: {part!r} is not ROLE=CPUS with ROLE one of "
                                   f"{', '.join(ROLES)} (or say 'auto' / 'off')")
            sets[role] = _cpu_list(listed)
            if not sets[role] <= cpus:
                raise PinningError(f"pin: {role} CPUs {sorted(sets[role] - cpus)} are not "
                                   f"available here (available: {sorted(cpus)})")
        return cls(**sets)

    @classmethod
    def auto(cls, cpus: set[int]) -> Placement:
        """One CPU (a quarter on bigger boxes) each for generator and app, the rest for the sut;
        on two CPUs generator and app share the second; on one CPU nothing is pinned."""
        ordered = sorted(cpus)
        if len(ordered) < 2:
            return cls()
        if len(ordered) == 2:
            return cls(frozenset(ordered[:1]), frozenset(ordered[1:]), frozenset(ordered[1:]))
        share = max(1, len(ordered) // 4)
        generator, app = ordered[-share:], ordered[-2 * share:-share]
        return cls(frozenset(ordered[:-2 * share]), frozenset(generator), frozenset(app))

    @property
    def pinned(self) -> bool:
        """Whether anything is pinned."""
        return bool(self.sut or self.generator or self.app)

    def cpus(self, role: str) -> frozenset[int]:
        """The CPU set of a role (empty: unpinned)."""
        return frozenset(getattr(self, role))

    def describe(self) -> str:
        """E.g. ``sut (ejabberd, Redis, pool) on CPU 0; generator ... on CPU 1``."""
        if not self.pinned:
            return "nothing pinned (every process on any CPU)"
        names = {"sut": "system under test (ejabberd, Redis, shard pool)",
                 "generator": "load generator (subscribers)", "app": "app (producers)"}
        return "; ".join(f"{names[r]} on CPU {_fmt(self.cpus(r))}" if self.cpus(r)
                         else f"{names[r]} unpinned" for r in ROLES)


def _cpu_list(text: str) -> frozenset[int]:
    out: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            out.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise PinningError(f"pin: {text!r} is not a CPU list like 0-2,5") from None
    return frozenset(out)


def _fmt(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


@contextlib.contextmanager
def affinity(cpus: frozenset[int]) -> Iterator[None]:
    """Run the block with this thread on ``cpus``: processes it starts inherit them."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def pin_tree(pid: int, cpus: frozenset[int]) -> list[int]:
    """Every thread of ``pid`` and of its descendants onto ``cpus``; returns the pids moved.

    For processes started elsewhere (ejabberd's node is started by ``ejabberdctl``, which
    may have been given threads before the runner could choose)."""
    if not cpus:
        return []
    moved = []
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error, OSError):
                for thread in proc.threads():
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(thread.id, cpus)
                moved.append(proc.pid)
    return moved


def affinity_of(pid: int) -> frozenset[int]:
    """The CPUs a process may run on (empty when it is gone)."""
    with contextlib.suppress(psutil.Error):
        return frozenset(psutil.Process(pid).cpu_affinity() or [])
    return frozenset()


# ---------------------------------------------------------------------------- CPU quota


@dataclass
class Quota:
    """A CPU cap (``cores`` of one CPU, e.g. 0.02) on chosen processes while it is on.

    A cgroup when one can be made here (v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``);
    otherwise a thread that stops and continues the processes (SIGSTOP/SIGCONT) on a 100 ms
    duty cycle. ``how`` says which one was used."""

    cores: float
    method: str = "auto"  # "cgroup", "signals" (the duty cycle), or "auto": a cgroup if one can
    name: str = field(default_factory=lambda: f"scalepub-loadtest-{os.getpid()}")
    how: str = ""
    _dir: Path | None = None
    _pids: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def apply(self, pids: list[int]) -> None:
        """Cap these processes (and their present children) from now on."""
        self._pids = _with_children(pids)
        self._dir = None if self.method == "signals" else _make_cgroup(self.name, self.cores)
        if self._dir is None and self.method == "cgroup":
            raise PinningError("generator_cpu_quota: no writable cgroup cpu controller here")
        if self._dir is not None:
            for pid in self._pids:
                with contextlib.suppress(OSError):
                    (self._dir / "cgroup.procs").write_text(str(pid))
            self.how = f"cgroup {self._dir}"
            return
        self.how = "SIGSTOP/SIGCONT duty cycle (no writable cgroup cpu controller)"
        self._thread = threading.Thread(target=self._duty_cycle, name="quota", daemon=True)
        self._thread.start()

    def lift(self) -> None:
        """No cap any more (the processes keep running)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._dir is not None:
            _write_quota(self._dir, None)
        self._signal(signal.SIGCONT)

    def remove(self) -> None:
        """Lift the cap and delete the cgroup (its processes go back to the root group)."""
        self.lift()
        if self._dir is None:
            return
        root = self._dir.parent
        with contextlib.suppress(OSError):
            for pid in (self._dir / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (root / "cgroup.procs").write_text(pid)
        with contextlib.suppress(OSError):
            self._dir.rmdir()

    def _duty_cycle(self) -> None:
        on = QUOTA_PERIOD_US * self.cores / 1e6
        while not self._stop.is_set():
            self._signal(signal.SIGCONT)
            self._stop.wait(on)
            if self._stop.is_set():
                break
            self._signal(signal.SIGSTOP)
            self._stop.wait(QUOTA_PERIOD_US / 1e6 - on)

    def _signal(self, sig: int) -> None:
        for pid in self._pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)


def _with_children(pids: list[int]) -> list[int]:
    out = list(pids)
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            out += [c.pid for c in psutil.Process(pid).children(recursive=True)]
    return out


def _make_cgroup(name: str, cores: float) -> Path | None:
    """A cgroup capped at ``cores``, or None when this machine does not let us make one."""
    v2 = CGROUP_V2 / "cgroup.controllers"
    with contextlib.suppress(OSError):
        if "cpu" in v2.read_text().split():
            with contextlib.suppress(OSError):
                (CGROUP_V2 / "cgroup.subtree_control").write_text("+cpu")
            return _try_cgroup(CGROUP_V2 / name, cores)
    if (CGROUP_V1_CPU / "cpu.cfs_quota_us").exists():
        return _try_cgroup(CGROUP_V1_CPU / name, cores)
    return None


def _try_cgroup(path: Path, cores: float) -> Path | None:
    try:
        path.mkdir(exist_ok=True)
        _write_quota(path, cores)
    except OSError:
        with contextlib.suppress(OSError):
            path.rmdir()
        return None
    return path


def _write_quota(path: Path, cores: float | None) -> None:
    quota = None if cores is None else max(1000, int(QUOTA_PERIOD_US * cores))
    if (path / "cpu.max").exists():
        (path / "cpu.max").write_text(f"{quota or 'max'} {QUOTA_PERIOD_US}")
    else:
        (path / "cpu.cfs_period_us").write_text(str(QUOTA_PERIOD_US))
        (path / "cpu.cfs_quota_us").write_text(str(quota or -1))
