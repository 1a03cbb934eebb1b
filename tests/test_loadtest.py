"""Load-test scenarios: file validation, the producer plan, and the tiny scenario end to end
(Locust BOSH subscribers against a real ejabberd, run as a subprocess: 0 lost entries)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

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
def test_a_bad_scenario_names_the_key(data: dict, message: str) -> None:
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
    assert r["subscribers_ready"] == r["subscribers"] == 4
    assert r["saved"] == 200 and r["appended"] == 200 and r["outbox_left"] == 0
    assert r["lost"] == 0 and r["drained"] and r["ok"]
    # Every subscriber got every entry of every node it follows: hot (40) + 2 authors (40 each).
    assert r["delivered"] == 4 * (40 + 40 + 40)
    assert r["latency_ms"]["p50"] is not None and r["latency_ms"]["p50"] > 0
    assert {row["Name"] for row in r["locust_entry_stats"]} == {"hot", "author"}
    assert sum(int(row["Request Count"]) for row in r["locust_entry_stats"]) == r["delivered"]
    variant = out / "batch-250-linger-5"
    for name in ("latency", "deliveries", "backlog", "cpu"):
        assert (variant / f"{name}.png").stat().st_size > 5000
    for name in ("results.json", "timeline.csv", "latency_per_second.csv", "locust_stats.csv"):
        assert (variant / name).exists()
    assert "| batch 250, linger 5 ms |" in (out / "summary.md").read_text()


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
    started = json.loads((out / "batch-250-linger-5" / "pids.json").read_text())
    assert set(started) >= {"ejabberd", "redis", "pool", "locust", "producers"}
    assert all(started[g] for g in ("ejabberd", "redis", "pool", "locust", "producers"))
    alive = [pid for pids in started.values() for pid in pids if _alive(pid)]
    assert alive == [], f"still running: {alive}"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
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
        "rate-100-batch-250-linger-5", "rate-100-batch-1-linger-5",
        "rate-500-batch-250-linger-5", "rate-500-batch-1-linger-5"]
    assert s.variants()[2].label == "500 saves/s, batch 250, linger 5 ms"


def test_overrides_keep_the_rest_of_the_scenario() -> None:
    from loadtest.run import _with_overrides

    s = _with_overrides(load(SCENARIOS / "steady.toml"), ["rate=100", 'delivery="direct"'])
    assert (s.rate, s.delivery, s.subscribers, s.rates) == (100, "direct", 200, ())
    with pytest.raises(ScenarioError, match="batch_max_entries"):
        _with_overrides(s, ["batch_max_entries=[]"])
