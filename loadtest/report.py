"""The report of a load-test run: results per variant, ``summary.md``, JSON/CSV and PNG plots.

"Lost" is counted against the truth, not against what subscribers saw: the rows committed per
node in the producers' databases. The entries appended per node in Redis (the per-node seq
counters) are a second count: a row committed but never appended is "not enqueued".
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtest import headroom
from loadtest.bench_latency import bucket_quantile
from loadtest.entries import Histogram
from loadtest.scenario import Scenario, Variant

GROUPS = ("ejabberd", "pool", "producers", "locust", "websocket", "redis", "runner")
PERCENTILES = (50, 95, 99, 99.9)
HOPS = ("commit_to_append", "append_to_read", "read_to_send", "send_to_result")
GROUP_OF_TRANSPORT = {"bosh": "locust", "websocket": "websocket"}  # subscriber process group
UsageRow = tuple[float, dict[str, dict[int, headroom.Usage]]]


def variant_results(*, scenario: Scenario, variant: Variant, out: Path, ready: int,
                    window: tuple[float, float], drained: bool, truth: dict[str, Any],
                    timeline: list[dict[str, Any]], subscription: Callable[[int], list[str]],
                    placement: dict[str, Any] | None = None,
                    hops: tuple[dict[str, Any], dict[str, Any]] = ({}, {}),
                    usage: list[UsageRow] | None = None, capacity: float = 1.0,
                    total_capacity: float | None = None,
                    quota: str = "") -> dict[str, Any]:
    """Everything measured for one batch size, checked against the truth; also saved as JSON."""
    dumps = [json.loads(p.read_text()) for p in sorted(out.glob("subscribers-*.json"))]
    saved = truth["saved"]
    delivery = _delivery(dumps, saved, (truth["first_commit"], truth["last_commit"]))
    overall, per_second = _latency(dumps)
    t0, t1 = window
    saving = (truth["first_commit"], truth["last_commit"]) if truth["saved"] else window
    generator = _generator(usage or [], saving, (capacity, total_capacity), dumps)
    results: dict[str, Any] = {
        "scenario": scenario.name, "variant": variant.label, "out": str(out),
        "batch_max_entries": variant.batch_max_entries, "linger_ms": variant.linger_ms,
        "rate": scenario.rate,
        "subscribers": scenario.all_subscribers, "subscribers_ready": ready, "drained": drained,
        "bosh_subscribers": scenario.subscribers, "ws_subscribers": scenario.ws_subscribers,
        "placement": {**(placement or {}), "generator_quota": quota},
        "generator": generator, "valid": generator["valid"],
        "latency_by_transport": _latency_by_transport(dumps),
        "production_s": round(t1 - t0, 2),
        "saved": sum(saved.values()), "appended": sum(truth["appended"].values()),
        "not_enqueued": sum(max(0, n - truth["appended"].get(node, 0))
                            for node, n in saved.items()),
        "outbox_left": truth.get("outbox_left", 0),
        # Between the first and the last commit (the producers' start-up is not saving time).
        "saves_per_s": round(sum(saved.values()) / max(truth["saving_s"], 1e-9), 1),
        **delivery,
        "latency_ms": {f"p{p:g}": _round(overall.percentile(p)) for p in PERCENTILES},
        "locust_entry_stats": _locust_stats(out / "locust_stats.csv"),
        "locust_sample": scenario.locust_sample,
        "bosh_requests": _bosh_requests(out / "locust_stats.csv"),
        # Between the first and the last commit: the producers' start-up (Django, ~1 s of CPU
        # each) is not part of what a save costs.
        "cpu_cores": _cpu(timeline, truth["first_commit"], truth["last_commit"]),
        "max_backlog": _max_backlog(timeline),
        "reconnects": sum(int(d.get("reconnects", 0)) for d in dumps),
        "expected_subscriptions": sum(len(subscription(u))
                                      for u in range(scenario.all_subscribers)),
    }
    results["latency_ms"]["max"] = _round(_max_latency(overall))
    results["hops_ms"] = _hops(*hops, results["latency_ms"]["p50"])
    results["ok"] = (results["lost"] == 0 and ready == scenario.all_subscribers and drained
                     and results["not_enqueued"] == 0 and results["subscriptions"]
                     == results["expected_subscriptions"])
    results["targets"] = _targets(scenario, results)
    results["series"] = _series(per_second, timeline, t0)
    _write_raw(out, results, timeline)
    return results


def _delivery(dumps: list[dict[str, Any]], saved: dict[str, int],
              saving: tuple[float, float]) -> dict[str, Any]:
    lost = delivered = duplicates = received = 0
    for dump in dumps:
        for t in dump["tracks"]:
            truth = saved.get(t["node"], 0)
            highest = max(t["next"] - 1, 0)
            lost += t["missing"] + max(0, truth - highest)
            distinct = t["received"] - t["duplicates"]
            delivered += distinct
            duplicates += t["duplicates"]
            received += t["received"]
    seconds: dict[int, int] = {}
    for dump in dumps:
        for second, hist in dump["per_second"].items():
            seconds[int(second)] = seconds.get(int(second), 0) + sum(hist.values())
    span = (max(seconds) - min(seconds) + 1) if seconds else 1
    first, last = int(saving[0]) + 1, int(saving[1])  # whole seconds while saving
    while_saving = [seconds.get(t, 0) for t in range(first, last)]
    return {
        "deliveries_per_s_while_saving": round(sum(while_saving) / max(len(while_saving), 1), 1),
        "subscriptions": sum(len(d["tracks"]) for d in dumps),
        "delivered": delivered, "received": received, "lost": lost, "duplicates": duplicates,
        "deliveries_per_s": round(delivered / span, 1),
        "peak_deliveries_per_s": max(seconds.values(), default=0),
    }


def _latency(dumps: list[dict[str, Any]]) -> tuple[Histogram, dict[int, Histogram]]:
    overall = Histogram()
    per_second: dict[int, Histogram] = {}
    for dump in dumps:
        for second, data in dump["per_second"].items():
            hist = Histogram.from_json(data)
            overall.merge(hist)
            per_second.setdefault(int(second), Histogram()).merge(hist)
    return overall, per_second


def _latency_by_transport(dumps: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """e2e percentiles per subscriber transport (``bosh``, ``websocket``)."""
    out = {}
    for transport in sorted({d.get("transport", "bosh") for d in dumps}):
        hist, _ = _latency([d for d in dumps if d.get("transport", "bosh") == transport])
        out[transport] = {f"p{p:g}": _round(hist.percentile(p)) for p in PERCENTILES}
        out[transport]["entries"] = hist.total
    return out


def _generator(usage: list[UsageRow], saving: tuple[float, float],
               capacity: tuple[float, float | None],
               dumps: list[dict[str, Any]]) -> dict[str, Any]:
    """The generator's CPU between the samples around the first and the last save (the
    producers' start-up, with nothing to deliver yet, is not in it)."""
    inside = [row for row in usage if saving[0] <= row[0] <= saving[1]]
    if len(inside) < 2:  # a very short saving window: the samples around it
        before = [row for row in usage if row[0] <= saving[0]][-1:]
        after = [row for row in usage if row[0] >= saving[1]][:1]
        inside = before + after
    if len(inside) < 2:
        return {"groups": {}, "max_cpu_share": 0.0, "max_busy_share": 0.0, "valid": True,
                "capacity_cores": capacity[0], "window_s": 0.0,
                "why_not_valid": "", "note": "not sampled"}
    (t0, first), (t1, last) = inside[0], inside[-1]
    return headroom.judge(first, last, max(t1 - t0, 1e-9), capacity[0],
                          _deliveries_by_group(dumps, (t0, t1)), capacity[1])


def _deliveries_by_group(dumps: list[dict[str, Any]], window: tuple[float, float]
                         ) -> dict[str, float]:
    """Entry-deliveries per subscriber process group in the whole seconds of the window."""
    first, last = int(window[0]), int(window[1])
    out: dict[str, float] = {}
    for dump in dumps:
        group = GROUP_OF_TRANSPORT[dump.get("transport", "bosh")]
        n = sum(sum(h.values()) for sec, h in dump["per_second"].items()
                if first <= int(sec) < last)
        out[group] = out.get(group, 0) + n
    return out


def _hops(before: dict[str, Any], after: dict[str, Any],
          e2e_p50: float | None) -> dict[str, dict[str, float | None]]:
    """The pool's hops over the production window (ms, p50 / p99, interpolated in buckets),
    and result → delivery estimated as the e2e p50 minus the hops' p50s."""
    out: dict[str, dict[str, float | None]] = {}
    for hop in HOPS:
        if hop in after:
            out[hop] = {f"p{q}": _round(bucket_quantile(before.get(hop, []), after[hop],
                                                        q / 100) * 1e3) for q in (50, 99)}
    known = [h["p50"] for h in out.values() if h["p50"] is not None]
    if out and e2e_p50 is not None:
        out["result_to_delivery_est"] = {"p50": round(e2e_p50 - sum(known), 1), "p99": None}
    return out


def _targets(s: Scenario, r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target of the scenario: wanted, measured, met (None: not valid, see generator)."""
    lat = r["latency_ms"]
    checks = {
        "saves/s": (s.target_saves_per_s, r["saves_per_s"], True),
        "e2e p50 ms": (s.target_p50_ms, lat["p50"], False),
        "e2e p99 ms": (s.target_p99_ms, lat["p99"], False),
        "entry-deliveries/s (peak 1 s)": (s.target_deliveries_per_s,
                                          r["peak_deliveries_per_s"], True),
        "entry-deliveries/s (mean while saving)": (s.target_deliveries_per_s,
                                                   r["deliveries_per_s_while_saving"], True),
        "lost": (0, r["lost"], False),
    }
    out = {}
    for name, (wanted, got, higher) in checks.items():
        if wanted or name == "lost":
            met = got is not None and (got >= wanted if higher else got <= wanted)
            if name.startswith("e2e") and not r["valid"]:
                met = None  # the generator set the pace: the figure says nothing of the server
            out[name] = {"wanted": wanted, "measured": got, "met": met}
    return out


def _max_latency(hist: Histogram) -> float:
    return (max(hist.counts) + 1) * 0.1 if hist.counts else float("nan")


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 1)


def _locust_stats(path: Path) -> list[dict[str, str]]:
    """Locust's own figures for the ``entry`` requests (its percentiles are rounded)."""
    if not path.exists():
        return []
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("Type") == "entry"]
    keep = ("Name", "Request Count", "Median Response Time", "95%", "99%", "Max Response Time")
    return [{k: r.get(k, "") for k in keep} for r in rows]


def _bosh_requests(path: Path) -> int:
    """HTTP requests the subscribers made (long polls, logins, subscribes)."""
    if not path.exists():
        return 0
    with path.open() as f:
        return sum(int(r["Request Count"]) for r in csv.DictReader(f)
                   if r.get("Type") == "POST" and r.get("Name") == "bosh")


def _cpu(timeline: list[dict[str, Any]], t0: float, t1: float) -> dict[str, float]:
    """Average cores used per group over the production window (cumulative CPU deltas)."""
    inside = [r for r in timeline if t0 <= r["t"] <= t1]
    if len(inside) < 2:
        return {}
    first, last = inside[0], inside[-1]
    dt = last["t"] - first["t"]
    cores = {g: round((last.get(f"cpu_{g}_s", 0) - first.get(f"cpu_{g}_s", 0)) / dt, 2)
             for g in GROUPS}
    machine = (last["cpu_machine_s"] - first["cpu_machine_s"]) / dt
    cores["machine"] = round(machine, 2)
    cores["others"] = round(max(0.0, machine - sum(cores[g] for g in GROUPS)), 2)
    for key in last:  # each CPU's busy share (all processes on it, ours and others')
        if key.startswith("cpu") and key.endswith("_busy_s") and key in first:
            cores[key.removesuffix("_busy_s")] = round((last[key] - first[key]) / dt, 2)
    return cores


def _role_busy(r: dict[str, Any], role: str) -> float | None:
    """Busy share of a role's pinned CPUs (1.0: full), whoever ran on them."""
    cpus = r.get("placement", {}).get(role) or []
    shares = [r["cpu_cores"].get(f"cpu{c}") for c in cpus]
    known = [s for s in shares if s is not None]
    return round(sum(known) / len(known), 2) if known else None


def _max_backlog(timeline: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in timeline:
        for key, value in row.items():
            if key.startswith(("lag_", "pending_")):
                shard = key.split("_")[1]
                out[shard] = max(out.get(shard, 0), value)
    return out


def _series(per_second: dict[int, Histogram], timeline: list[dict[str, Any]],
            t0: float) -> dict[str, Any]:
    seconds = sorted(per_second)
    return {
        "second": [s - t0 for s in seconds],
        "deliveries": [per_second[s].total for s in seconds],
        **{f"p{p:g}": [_round(per_second[s].percentile(p)) for s in seconds] for p in (50, 95, 99)},
        "t": [r["t"] - t0 for r in timeline],
    }


def _write_raw(out: Path, results: dict[str, Any], timeline: list[dict[str, Any]]) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if timeline:
        keys = sorted({k for row in timeline for k in row})
        with (out / "timeline.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(timeline)
    with (out / "latency_per_second.csv").open("w", newline="") as f:
        rows = csv.writer(f)
        series = results["series"]
        rows.writerow(["second", "deliveries", "p50_ms", "p95_ms", "p99_ms"])
        rows.writerows(zip(series["second"], series["deliveries"], series["p50"],
                             series["p95"], series["p99"], strict=True))


# ---------------------------------------------------------------------------- summary


def headline(r: dict[str, Any]) -> str:
    """One line: the figures the issue asks for."""
    lat, gen = r["latency_ms"], r.get("generator", {})
    return (f"{r['variant']}: {r['saves_per_s']:.0f} saves/s, "
            f"{r['deliveries_per_s_while_saving']:.0f} entry-deliveries/s while saving "
            f"({r['deliveries_per_s']:.0f} overall, peak {r['peak_deliveries_per_s']}),"
            f" e2e p50 {lat['p50']} ms p95 {lat['p95']} ms p99 {lat['p99']} ms, "
            f"lost {r['lost']}, duplicates {r['duplicates']}, "
            f"subscribers {r['subscribers_ready']}/{r['subscribers']}, "
            f"generator CPU {gen.get('max_cpu_share', 0):.0%} of its capacity"
            f"{'' if r['ok'] else '  [NOT OK]'}"
            f"{'' if r.get('valid', True) else '  [NOT VALID: ' + gen['why_not_valid'] + ']'}")


def write(out: Path, scenario: Scenario, results: list[dict[str, Any]]) -> None:
    """summary.md, summary.json and the plots of every variant."""
    from loadtest import plots  # matplotlib is imported only when a report is written

    for r in results:
        plots.variant(Path(r["out"]), r)
    if scenario.rates and len(results) > 1:
        plots.sweep(out, results)
        plots.sweep_hops(out, results)
    (out / "summary.json").write_text(json.dumps(
        {"scenario": scenario.__dict__, "results": [_without_series(r) for r in results]},
        indent=1, default=list))
    (out / "summary.md").write_text(_markdown(out, scenario, results))


def _without_series(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k != "series"}


def _markdown(out: Path, s: Scenario, results: list[dict[str, Any]]) -> str:
    lines = [f"# Load test `{s.name}`", "", s.description, "",
             f"{s.subscribers} BOSH + {s.ws_subscribers} WebSocket subscribers (each: "
             f"{'the hot node + ' if s.hot_share else ''}"
             f"{s.authors_per_subscriber} of {s.authors} author nodes), "
             f"{', '.join(f'{r:g}' for r in s.rates) if s.rates else f'{s.rate:g}'} saves/s "
             f"({s.hot_share:.0%} on the hot node) by "
             f"{s.producers if s.hot_share < 1 else 0} author + "
             f"{s.hot_producers if s.hot_share else 0} hot-node producer processes (`manage.py "
             f"tweet`, one SQLite file each on tmpfs) for {s.duration_s:g} s "
             f"(ramp {s.ramp_s:g} s), {s.shards} shards, window "
             f"{s.window}. Everything on this machine, shared with other work: see CPU 'others'.",
             "", _table(results), "",
             *(["![sweep](sweep.png)", "", "![hops](sweep_hops.png)", "", _sweep_table(results)]
               if s.rates and len(results) > 1 else []),
             "*lost*: entry-deliveries that had not arrived when the run ended (every subscriber "
             "x every entry saved on its nodes, counted from the producers' databases); "
             "*not enqueued*: rows saved but never appended to Redis (left in the producers' "
             "outbox tables: " + ", ".join(str(r["outbox_left"]) for r in results)
             + "); *max ms*: the slowest delivery.",
             "", _http_line(results), "", _cpu_table(results), ""]
    for r in results:
        rel = Path(r["out"]).relative_to(out)
        lines += [f"## {r['variant']}", "", _verdict(r), "", _targets_line(r), "",
                  _generator_line(r), "", _placement_line(r), "", _hops_line(r), "",
                  f"Locust's own `entry` statistics: {_locust_line(r)}", ""]
        lines += [f"![{name}]({rel}/{name}.png)" for name in
                  ("latency", "deliveries", "backlog", "cpu")]
        lines.append("")
    return "\n".join(lines)


def _table(results: list[dict[str, Any]]) -> str:
    head = ("| batching | saves/s | saved | subscribers | entry-deliveries/s: mean while saving, "
            "overall, peak 1 s | p50 ms | "
            "p95 ms | p99 ms | max ms | lost | duplicates | not enqueued | reconnects |")
    rows = [head, "|" + "---:|" * 13]
    for r in results:
        lat = r["latency_ms"]
        rows.append(
            f"| {r['variant']} | {r['saves_per_s']:,.0f} | {r['saved']:,} | "
            f"{r['subscribers_ready']}/{r['subscribers']} | "
            f"{r['deliveries_per_s_while_saving']:,.0f}, {r['deliveries_per_s']:,.0f}, "
            f"{r['peak_deliveries_per_s']:,} | {lat['p50']} | {lat['p95']} | {lat['p99']} | "
            f"{lat['max']} | {r['lost']} | {r['duplicates']} | {r['not_enqueued']} | "
            f"{r['reconnects']} |")
    return "\n".join(rows)


def _sweep_table(results: list[dict[str, Any]]) -> str:
    """Per rate: e2e and per-hop p50 / p99, the generator's verdict, the busiest groups."""
    hops = [h for h in HOPS if any(h in r.get("hops_ms", {}) for r in results)]
    head = ("| saves/s wanted | reached | e2e p50 / p99 | "
            + " | ".join(f"{h} p50 / p99" for h in hops)
            + " | result→delivery p50 (est.) | generator CPU (max process) | valid "
            "| ejabberd / pool / redis / producers cores | sut CPUs busy | generator CPUs busy |")
    rows = [head, "|" + "---:|" * (len(hops) + 9)]
    for r in sorted(results, key=lambda x: x["rate"]):
        h, cpu, lat = r.get("hops_ms", {}), r["cpu_cores"], r["latency_ms"]
        cells = " | ".join(f"{h.get(k, {}).get('p50')} / {h.get(k, {}).get('p99')}"
                           for k in hops)
        rows.append(
            f"| {r['rate']:g} | {r['saves_per_s']:,.0f} | {lat['p50']} / {lat['p99']} | {cells} "
            f"| {h.get('result_to_delivery_est', {}).get('p50')} "
            f"| {r['generator']['max_cpu_share']:.0%} | {'yes' if r['valid'] else 'NO'} | "
            + " / ".join(f"{cpu.get(g, float('nan')):.2f}"
                         for g in ("ejabberd", "pool", "redis", "producers"))
            + f" | {_role_busy(r, 'sut')} | {_role_busy(r, 'generator')} |")
    return "\n".join(rows) + "\n"


def _http_line(results: list[dict[str, Any]]) -> str:
    # Entries received by the BOSH users only (the WebSocket ones make no HTTP requests).
    parts = [f"{r['variant']}: {r['bosh_requests']:,} requests, "
             f"{_bosh_entries(r) / max(r['bosh_requests'], 1):.1f} entries per response"
             for r in results if r.get("bosh_subscribers", 1)]
    if not parts:
        return "No BOSH subscribers (WebSocket only): no HTTP cycle per answer."
    return ("BOSH HTTP requests of the subscribers (each answer carries what was queued for that "
            "session: the fewer entries per answer, the more the HTTP cycles cost): "
            + "; ".join(parts) + ".")


def _bosh_entries(r: dict[str, Any]) -> int:
    by = r.get("latency_by_transport", {})
    return int(by["bosh"]["entries"]) if "bosh" in by else int(r["received"])


def _cpu_table(results: list[dict[str, Any]]) -> str:
    cols = (*GROUPS, "others", "machine")
    rows = ["CPU, average cores between the first and the last save (2 cores in all):", "",
            "| batching | " + " | ".join(cols) + " |", "|" + "---:|" * (len(cols) + 1)]
    for r in results:
        cpu = r["cpu_cores"]
        rows.append(f"| {r['variant']} | "
                    + " | ".join(f"{cpu.get(c, float('nan')):.2f}" for c in cols) + " |")
    return "\n".join(rows)


def _verdict(r: dict[str, Any]) -> str:
    cpu = {g: r["cpu_cores"].get(g, 0.0) for g in (*GROUPS, "others")}
    top = sorted(cpu.items(), key=lambda kv: -kv[1])[:3]
    machine = r["cpu_cores"].get("machine", 0.0)
    busy = "the machine was saturated" if machine >= 1.8 else "the machine had spare CPU"
    if r["ok"]:
        status = "Every entry reached every subscriber of its node"
    elif not r["drained"]:
        status = (f"NOT OK: {r['lost']:,} entry-deliveries had not arrived when the drain "
                  "deadline passed (a backlog when nothing is missing in between, see lost)")
    else:
        status = "NOT OK (see lost / subscribers)"
    return (f"{headline(r)}. {status}. Busiest while producing: "
            + ", ".join(f"{g} {c:.2f} cores" for g, c in top)
            + f"; {machine:.2f} of 2 cores busy: {busy}.")


def _targets_line(r: dict[str, Any]) -> str:
    verdict = {True: "met", False: "missed", None: "NOT VALID (generator-bound)"}
    parts = [f"{name} {'≥' if name.startswith(('saves', 'entry')) else '≤'} {t['wanted']:g}: "
             f"{t['measured']} **{verdict[t['met']]}**"
             for name, t in r["targets"].items()]
    return "Targets: " + "; ".join(parts) + "."


def _generator_line(r: dict[str, Any]) -> str:
    gen = r["generator"]
    groups = "; ".join(
        f"{g}: {v['cpu_cores']:.2f} cores CPU, {v['wait_cores']:.2f} waiting for a CPU, "
        f"{v['deliveries']:,} deliveries, {v['cpu_us_per_delivery']} us CPU per delivery"
        for g, v in gen["groups"].items())
    verdict = ("valid: the generator had CPU to spare" if gen["valid"]
               else f"**NOT VALID**: {gen['why_not_valid']}")
    return (f"Load generator over the {gen['window_s']} s between the first and the last save "
            f"(capacity {gen['capacity_cores']:g} core per process, "
            f"{gen.get('total_capacity_cores', 0):g} in all): {groups}. CPU: "
            f"{gen['max_cpu_share']:.0%} of its capacity; busiest process running or waiting "
            f"{gen['max_busy_share']:.0%} of the time: {verdict}.")


def _placement_line(r: dict[str, Any]) -> str:
    place = r.get("placement", {})
    seen = ", ".join(f"{g} {cpus}" for g, cpus in place.get("affinity", {}).items())
    quota = f" Generator capped by {place['generator_quota']}." if place.get(
        "generator_quota") else ""
    busy = ", ".join(f"{role} CPUs {_role_busy(r, role):.0%} busy" for role in
                     ("sut", "generator") if _role_busy(r, role) is not None)
    return (f"CPU placement: {place.get('plan', 'n/a')} (allowed CPUs seen: {seen}).{quota}"
            + (f" While saving, whoever ran on them: {busy}." if busy else ""))


def _hops_line(r: dict[str, Any]) -> str:
    hops = r.get("hops_ms", {})
    by = "; ".join(f"{t} p50 {v['p50']} / p99 {v['p99']} ms ({v['entries']:,} entries)"
                   for t, v in r.get("latency_by_transport", {}).items())
    if not hops:
        return f"e2e per transport: {by}. Per hop: no pool metrics."
    return (f"e2e per transport: {by}. Per hop (ms, p50 / p99): "
            + ", ".join(f"{h} {v['p50']} / {v['p99']}" for h, v in hops.items()) + ".")


def _locust_line(r: dict[str, Any]) -> str:
    stats = r["locust_entry_stats"]
    if not stats:
        return "none (locust_sample = 0)"
    every = r.get("locust_sample", 1)
    sampled = f" (every {every}th entry: locust_sample)" if every > 1 else ""
    return "; ".join(f"{s['Name']}: {s['Request Count']} entries, median "
                     f"{s['Median Response Time']} ms, p95 {s['95%']} ms, p99 {s['99%']} ms"
                     for s in stats) + sampled
