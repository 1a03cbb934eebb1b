"""PNG plots of one variant: latency percentiles, deliveries, shard backlog, CPU per group."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

GROUPS = ("ejabberd", "pool", "producers", "locust", "websocket", "redis", "runner")
HOPS = ("commit_to_append", "append_to_read", "read_to_send", "send_to_result",
        "result_to_delivery_est")


def variant(out: Path, r: dict[str, Any]) -> None:
    """Write latency.png, deliveries.png, backlog.png and cpu.png into ``out``."""
    series = r["series"]
    title = f"{r['scenario']}, {r['variant']}"
    timeline = _timeline(out)
    _plot(out / "latency.png", f"{title}: e2e latency per second",
          "latency (ms, log)", series["second"],
          {f"p{p}": series[f"p{p}"] for p in (50, 95, 99)}, log=True)
    _plot(out / "deliveries.png", f"{title}: entries per second", "entries/s",
          series["second"], {"entry-deliveries/s": series["deliveries"]},
          extra=_saves(timeline))
    _plot(out / "backlog.png", f"{title}: stream backlog (lag + pending) per shard",
          "entries", timeline.get("t", []), _backlog(timeline))
    _plot(out / "cpu.png", f"{title}: CPU per process group", "cores", timeline.get("t", [])[1:],
          _cores(timeline))


def _timeline(out: Path) -> dict[str, list[float]]:
    import csv
    import json

    path = out / "timeline.csv"
    if not path.exists():
        return {}
    with path.open() as f:
        rows = list(csv.DictReader(f))
    t0 = json.loads((out / "results.json").read_text())["series"]["t"]
    cols: dict[str, list[float]] = {k: [float(r[k] or "nan") for r in rows] for k in rows[0]}
    cols["t"] = t0
    return cols


def _rate(values: list[float], t: list[float]) -> list[float]:
    return [(values[i] - values[i - 1]) / max(t[i] - t[i - 1], 1e-9) for i in range(1, len(t))]


def _saves(tl: dict[str, list[float]]) -> dict[str, tuple[list[float], list[float]]]:
    shards = [k for k in tl if k.startswith("xlen_")]
    if not shards or len(tl["t"]) < 2:
        return {}
    total = [sum(tl[k][i] for k in shards) for i in range(len(tl["t"]))]
    return {"saves/s (appended)": (tl["t"][1:], _rate(total, tl["t"]))}


def _backlog(tl: dict[str, list[float]]) -> dict[str, list[float]]:
    shards = sorted({k.split("_")[1] for k in tl if k.startswith("lag_")}, key=int)
    return {f"shard {s}": [a + b for a, b in zip(tl[f"lag_{s}"], tl[f"pending_{s}"],
                                                  strict=True)] for s in shards}


def _cores(tl: dict[str, list[float]]) -> dict[str, list[float]]:
    if len(tl.get("t", [])) < 2:
        return {}
    out = {g: _rate(tl[f"cpu_{g}_s"], tl["t"]) for g in GROUPS if f"cpu_{g}_s" in tl}
    machine = _rate(tl["cpu_machine_s"], tl["t"])
    ours = [sum(v[i] for v in out.values()) for i in range(len(machine))]
    out["others (not this run)"] = [max(0.0, m - o) for m, o in zip(machine, ours, strict=True)]
    return out


Extra = dict[str, tuple[list[float], list[float]]]  # label → (x, y) drawn dashed


def _plot(path: Path, title: str, ylabel: str, x: list[float], lines: dict[str, list[Any]],
          log: bool = False, extra: Extra | None = None) -> None:
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    for label, ys in lines.items():
        ax.plot(x, [float("nan") if y is None else y for y in ys], label=label, linewidth=1.2)
    if extra:  # on its own axis (right): saves/s are ~1/100 of the deliveries
        right = ax.twinx()
        for label, (xs, ys) in extra.items():
            right.plot(xs, ys, label=label, linewidth=1.0, linestyle="--", color="tab:orange")
            right.set_ylabel(label)
        right.legend(fontsize=8, loc="upper right")
    if log:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("seconds since the producers started")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if lines:
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sweep(out: Path, results: list[dict[str, Any]]) -> Path:
    """sweep.png: e2e latency percentiles and deliveries/s against the save rate."""
    rows = sorted(results, key=lambda r: r["rate"])
    rates = [r["rate"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    for p in ("p50", "p95", "p99"):
        ax.plot(rates, [r["latency_ms"][p] for r in rows], marker="o", label=f"e2e {p}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("target saves/s")
    ax.set_ylabel("latency (ms, log)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    right = ax.twinx()
    right.plot(rates, [r["deliveries_per_s_while_saving"] for r in rows], color="tab:gray",
               linestyle="--", marker="s", label="entry-deliveries/s while saving")
    right.set_ylabel("entry-deliveries/s")
    right.legend(fontsize=8, loc="lower right")
    ax.set_title(f"{rows[0]['scenario']}: latency and deliveries against the save rate",
                 fontsize=10)
    fig.tight_layout()
    path = out / "sweep.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def sweep_hops(out: Path, results: list[dict[str, Any]]) -> Path:
    """sweep_hops.png: each hop's p50 and the e2e p50/p99 against the save rate (top), and
    the CPU of each process group (bottom): where the curve bends, and which process ran out."""
    rows = sorted(results, key=lambda r: r["rate"])
    rates = [r["rate"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 8), dpi=100, sharex=True)
    for hop in HOPS:
        values = [r.get("hops_ms", {}).get(hop, {}).get("p50") for r in rows]
        top.plot(rates, [_positive(v) for v in values], marker="o", linewidth=1.2,
                 label=f"{hop} p50")
    for p, style in (("p50", "-"), ("p99", "--")):
        top.plot(rates, [_positive(r["latency_ms"][p]) for r in rows], color="black",
                 linestyle=style, marker="s", label=f"e2e {p}")
    invalid = [r["rate"] for r in rows if not r.get("valid", True)]
    for rate in invalid:
        top.axvline(rate, color="red", alpha=0.3, linewidth=6)
    top.set_xscale("log")
    top.set_yscale("log")
    top.set_ylabel("latency (ms, log)")
    top.grid(True, alpha=0.3)
    top.legend(fontsize=7, loc="upper left")
    top.set_title(f"{rows[0]['scenario']}: latency per hop against the save rate"
                  + (" (red: generator-bound, NOT VALID)" if invalid else ""), fontsize=10)
    for group in (*GROUPS, "others"):
        values = [r.get("cpu_cores", {}).get(group, 0.0) for r in rows]
        if any(values):
            bottom.plot(rates, values, marker="o", linewidth=1.2, label=group)
    for role, style in (("sut", "-."), ("generator", ":")):
        cpus = rows[0].get("placement", {}).get(role) or []
        if cpus:  # the pinned CPUs' busy share, whoever ran on them (others' work included)
            busy = [sum(r["cpu_cores"].get(f"cpu{c}", 0.0) for c in cpus) / len(cpus)
                    for r in rows]
            bottom.plot(rates, busy, color="black", linestyle=style, linewidth=1.5,
                        label=f"{role} CPU(s) {cpus} busy (share)")
    bottom.axhline(1.0, color="gray", linestyle=":", linewidth=1, label="one core")
    bottom.set_xlabel("target saves/s")
    bottom.set_ylabel("CPU (cores) while saving")
    bottom.grid(True, alpha=0.3)
    bottom.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    path = out / "sweep_hops.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _positive(value: float | None) -> float:
    # A log axis cannot show 0 or less (an estimated hop can come out negative): left out.
    return float("nan") if value is None or value <= 0 else value
