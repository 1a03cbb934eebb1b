"""Load-test scenarios: file validation, the producer plan, CPU placement, and the tiny scenario
end to end (Locust BOSH and WebSocket subscribers against a real ejabberd, run as a subprocess:
0 lost entries), also with a starved generator, whose latency must be marked NOT VALID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Set as AbstractSet
from pathlib import Path

import psutil
import pytest

from loadtest.headroom import Usage, judge
from loadtest.pinning import PinningError, Placement, Quota, affinity, affinity_of
from loadtest.run import producer_plan
from loadtest.scenario import ScenarioError, from_mapping, load, nodes_for

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = REPO / "loadtest" / "scenarios"


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_scenario_is_valid(path: Path) -> None:
    assert load(path).name == path.stem


@pytest.mark.parametrize("data, message", [
    ({"name": "x", "rate": 0}, "'rate' is out of range"),
    ({"name": "x", "subscriber": 3}, "unknown key(s) subscriber"),
    ({"name": "x", "batch_max_entries": [250, "1"]}, "'batch_max_entries' must be"),
    ({"name": "x", "shards": True}, "'shards' must be int"),
    ({"rate": 5}, "'name' is required"),
    ({"name": "x", "hot_share": 0, "authors_per_subscriber": 0}, "follow nothing"),
])
def test_a_bad_scenario_names_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ScenarioError) as info:
        from_mapping(data, "f.toml")
    assert message in str(info.value) and "f.toml" in str(info.value)


def test_subscribers_follow_the_hot_node_and_rotate_over_authors() -> None:
    authors = [f"/a{i}" for i in range(4)]
    assert nodes_for(0, "/hot", authors, 2) == ["/hot", "/a0", "/a1"]
    assert nodes_for(1, "/hot", authors, 2) == ["/hot", "/a2", "/a3"]
    assert nodes_for(2, None, authors, 2) == ["/a0", "/a1"]
    covered = {n for u in range(2) for n in nodes_for(u, None, authors, 2)}
    assert covered == set(authors)


def test_producer_plan_splits_the_rate_and_staggers_the_ramp() -> None:
    s = from_mapping({"name": "x", "rate": 1000, "hot_share": 0.2, "producers": 3,
                      "hot_producers": 2, "duration_s": 20, "ramp_s": 10})
    plan = producer_plan(s, [Path(f"db{i}") for i in range(5)])
    assert [(p.prefix, p.authors, p.rate) for p in plan] == [
        ("hot", 1, 100), ("hot", 1, 100), ("user", 10, 800 / 3), ("user", 10, 800 / 3),
        ("user", 10, 800 / 3)]
    assert [p.start_s for p in plan] == [0, 2, 4, 6, 8]
    assert [p.count for p in plan] == [2000, 1800, round(800 / 3 * 16), 3733, round(800 / 3 * 12)]
    assert len({p.db for p in plan}) == 5  # one database each: no shared SQLite write lock


def test_all_on_the_hot_node_needs_no_author_producers() -> None:
    s = from_mapping({"name": "x", "rate": 900, "hot_share": 1.0, "producers": 0,
                      "hot_producers": 3, "authors_per_subscriber": 0})
    assert [(p.prefix, p.rate) for p in producer_plan(s, [Path("a"), Path("b"), Path("c")])] == [
        ("hot", 300)] * 3


@pytest.mark.stack
@pytest.mark.timeout(240)
def test_tiny_scenario_delivers_every_entry_to_every_subscriber(tmp_path: Path) -> None:
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.run", str(SCENARIOS / "smoke.toml"), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=220, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [r] = json.loads((out / "summary.json").read_text())["results"]
    assert r["subscribers_ready"] == r["subscribers"] == 8  # 4 BOSH + 4 WebSocket
    assert r["saved"] == 200 and r["appended"] == 200 and r["outbox_left"] == 0
    assert r["lost"] == 0 and r["drained"] and r["ok"]
    # Every subscriber got every entry of every node it follows: hot (40) + 2 authors (40 each).
    assert r["delivered"] == 8 * (40 + 40 + 40)
    assert r["latency_ms"]["p50"] is not None and r["latency_ms"]["p50"] > 0
    by = r["latency_by_transport"]
    assert by["bosh"]["entries"] == by["websocket"]["entries"] == 4 * 120
    assert {row["Name"] for row in r["locust_entry_stats"]} == {"hot", "author"}
    assert sum(int(row["Request Count"]) for row in r["locust_entry_stats"]) == 4 * 120
    # The generator is measured, had CPU to spare, and (on 2+ CPUs) ran apart from the server.
    gen = r["generator"]
    assert set(gen["groups"]) == {"locust", "websocket"} and gen["valid"], gen
    assert all(g["cpu_us_per_delivery"] for g in gen["groups"].values())
    seen = r["placement"]["affinity"]
    if len(os.sched_getaffinity(0)) >= 2:
        assert not set(seen["ejabberd"] + seen["pool"]) & set(seen["locust"] + seen["websocket"])
    assert set(r["hops_ms"]) >= {"commit_to_append", "append_to_read", "read_to_send",
                                 "send_to_result"}
    variant = out / "batch-250-linger-0"
    for name in ("latency", "deliveries", "backlog", "cpu"):
        assert (variant / f"{name}.png").stat().st_size > 5000
    for name in ("results.json", "timeline.csv", "latency_per_second.csv", "locust_stats.csv"):
        assert (variant / name).exists()
    summary = (out / "summary.md").read_text()
    assert "| batch 250, linger 0 ms |" in summary and "NOT VALID" not in summary


@pytest.mark.stack
@pytest.mark.timeout(240)
def test_a_starved_generator_marks_the_latency_not_valid(tmp_path: Path) -> None:
    # 1 % of a core for the subscriber processes while the producers save: they fall behind,
    # so the latency they measure is their own queue, not the server's.
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.run", str(SCENARIOS / "smoke.toml"), "--out", str(out),
         "--set", "generator_cpu_quota=0.01", "--set", "target_p50_ms=1000"],
        cwd=REPO, capture_output=True, text=True, timeout=220, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr  # every entry still arrived
    [r] = json.loads((out / "summary.json").read_text())["results"]
    assert r["lost"] == 0 and r["ok"]
    assert not r["valid"] and r["generator"]["max_cpu_share"] > 0.9, r["generator"]
    assert r["targets"]["e2e p50 ms"]["met"] is None  # neither met nor missed
    assert "NOT VALID" in done.stdout and "NOT VALID" in (out / "summary.md").read_text()


@pytest.mark.stack
@pytest.mark.timeout(180)
def test_an_interrupted_run_stops_everything_it_started(tmp_path: Path) -> None:
    out = tmp_path / "report"
    runner = subprocess.Popen(
        [sys.executable, "-u", "-m", "loadtest.run", str(SCENARIOS / "smoke.toml"), "--out",
         str(out), "--set", "duration_s=60"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert runner.stdout is not None
        for line in runner.stdout:
            if line.startswith("producing"):
                break
        time.sleep(2)  # producers saving, subscribers receiving
        runner.send_signal(signal.SIGINT)
        rest = runner.communicate(timeout=120)[0]
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 2, rest
    assert "stopped" in rest
    started = json.loads((out / "batch-250-linger-0" / "pids.json").read_text())
    groups = ("ejabberd", "redis", "pool", "locust", "websocket", "producers")
    assert set(started) >= set(groups)
    assert all(started[g] for g in groups)
    alive = [pid for pids in started.values() for pid in pids if _alive(pid)]
    assert alive == [], f"still running: {alive}"


def _alive(pid: int) -> bool:
    try:
        alive: bool = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # psutil is untyped
        return alive
    except psutil.NoSuchProcess:
        return False


def test_variants_skip_the_linger_of_unbatched_runs() -> None:
    s = from_mapping({"name": "x", "batch_max_entries": [250, 1], "linger_ms": [5, 50]})
    assert [v.name for v in s.variants()] == [
        "batch-250-linger-5", "batch-250-linger-50", "batch-1-linger-5"]


def test_lost_is_counted_against_the_saved_rows_not_against_what_arrived() -> None:
    from loadtest.report import _delivery

    dumps = [{"tracks": [
        # got 1..10 of 10: nothing lost
        {"user": 0, "node": "/a", "next": 11, "received": 11, "duplicates": 1, "missing": 0},
        # got 1..8 with 4 missing: 4 and 9..10 lost
        {"user": 1, "node": "/a", "next": 9, "received": 7, "duplicates": 0, "missing": 1},
        # subscribed, got nothing: all 5 lost
        {"user": 1, "node": "/b", "next": 0, "received": 0, "duplicates": 0, "missing": 0},
    ], "per_second": {"100": {"10": 9}, "101": {"20": 8}}}]
    d = _delivery(dumps, {"/a": 10, "/b": 5}, (99.5, 101.5))
    assert d["lost"] == 0 + 3 + 5
    assert d["delivered"] == 10 + 7 and d["duplicates"] == 1
    assert d["deliveries_per_s"] == 8.5 and d["peak_deliveries_per_s"] == 9
    assert d["deliveries_per_s_while_saving"] == 9  # only second 100 lies wholly inside


def test_a_rate_sweep_runs_every_batching_at_every_rate() -> None:
    s = from_mapping({"name": "x", "rates": [100, 500], "batch_max_entries": [250, 1]})
    assert [v.name for v in s.variants()] == [
        "rate-100-batch-250-linger-0", "rate-100-batch-1-linger-0",
        "rate-500-batch-250-linger-0", "rate-500-batch-1-linger-0"]
    assert s.variants()[2].label == "500 saves/s, batch 250, linger 0 ms"


def test_overrides_keep_the_rest_of_the_scenario() -> None:
    from loadtest.run import _with_overrides

    s = _with_overrides(load(SCENARIOS / "steady.toml"), ["rate=100", 'delivery="direct"'])
    assert (s.rate, s.delivery, s.subscribers, s.rates) == (100, "direct", 200, ())
    with pytest.raises(ScenarioError, match="batch_max_entries"):
        _with_overrides(s, ["batch_max_entries=[]"])


@pytest.mark.parametrize("cpus, sut, generator, app", [
    ({0}, set(), set(), set()),  # one CPU: nothing to keep apart
    ({0, 1}, {0}, {1}, {1}),
    ({0, 1, 2, 3}, {0, 1}, {3}, {2}),
    (set(range(8)), set(range(4)), {6, 7}, {4, 5}),
])
def test_auto_placement_keeps_the_server_apart(cpus: set[int], sut: AbstractSet[int],
                                              generator: AbstractSet[int],
                                              app: AbstractSet[int]) -> None:
    place = Placement.parse("auto", cpus)
    assert (place.sut, place.generator, place.app) == (sut, generator, app)
    assert not place.sut & (place.generator | place.app)


def test_explicit_placement_and_its_errors_name_the_setting() -> None:
    place = Placement.parse("sut=0-2 generator=3 app=3", {0, 1, 2, 3})
    assert place.sut == {0, 1, 2} and "CPU 0,1,2" in place.describe()
    assert not Placement.parse("off", {0, 1}).pinned
    for spec, message in (("sut=9", "not available"), ("db=0", "ROLE=CPUS"),
                          ("sut=x", "CPU list")):
        with pytest.raises(PinningError, match=message) as info:
            Placement.parse(spec, {0, 1})
        assert str(info.value).startswith("pin:")
    with pytest.raises(ScenarioError, match=r"f\.toml: pin:"):
        from_mapping({"name": "x", "pin": "generator=99"}, "f.toml")


def test_processes_started_inside_affinity_inherit_it() -> None:
    before = os.sched_getaffinity(0)
    cpu = max(before)
    with affinity(frozenset({cpu})):
        child = subprocess.Popen(["sleep", "5"])
    try:
        assert affinity_of(child.pid) == {cpu}
        assert os.sched_getaffinity(0) == before  # the runner itself is back where it was
    finally:
        child.kill()
        child.wait()


def test_the_generator_is_the_bottleneck_above_90_percent_of_its_capacity() -> None:
    def usage(cpu: float, wait: float) -> dict[str, dict[int, Usage]]:
        return {"locust": {1: Usage(cpu, wait)}, "websocket": {2: Usage(cpu / 4, 0.0)}}

    start = usage(0.0, 0.0)
    idle = judge(start, usage(5.0, 1.0), 10.0, 1.0, {"locust": 10_000, "websocket": 2_000},
                 total_capacity=2.0)
    assert idle["valid"] and idle["max_cpu_share"] == 0.5
    assert idle["groups"]["locust"]["cpu_us_per_delivery"] == 500.0
    busy = judge(start, usage(9.5, 0.0), 10.0, 1.0, {})
    assert not busy["valid"] and "95%" in busy["why_not_valid"]
    starved = judge(start, usage(3.0, 6.5), 10.0, 1.0, {})  # waiting for a CPU most of the time
    assert not starved["valid"] and "running or waiting" in starved["why_not_valid"]
    capped = judge(start, usage(0.1, 0.0), 10.0, 0.01, {})  # 1 % of a core, all of it used
    assert not capped["valid"] and capped["max_cpu_share"] >= 1.0
    # Two processes sharing a 2 % quota, 1 % each: each used half of what it could, together
    # all of it.
    shared = {"locust": {1: Usage(0.1, 0.0)}, "websocket": {2: Usage(0.1, 0.0)}}
    assert not judge(start, shared, 10.0, 0.02, {}, total_capacity=0.02)["valid"]
    assert judge(start, shared, 10.0, 0.02, {}, total_capacity=1.0)["valid"]


@pytest.mark.parametrize("method", ["signals", "auto"])
def test_a_quota_caps_a_spinning_process(method: str) -> None:
    # "auto" is a cgroup where this machine lets us make one, the duty cycle elsewhere; a
    # process that wants a whole core gets about a tenth of one (bound: a third, the box is
    # shared and a stop or a period boundary may fall late).
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    quota = Quota(0.1, method=method, name=f"scalepub-loadtest-test-{os.getpid()}")
    try:
        quota.apply([spinner.pid])
        proc = psutil.Process(spinner.pid)
        before, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
        time.sleep(2.0)
        used = (sum(proc.cpu_times()[:2]) - before) / (time.monotonic() - t0)
        assert used < 0.33, (quota.how, used)
        quota.lift()  # no longer capped, and not left stopped by the duty cycle
        assert proc.status() != psutil.STATUS_STOPPED
    finally:
        quota.remove()
        spinner.kill()
        spinner.wait()
