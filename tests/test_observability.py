"""Observability: the Prometheus config and alert rules (ops/prometheus) and the Grafana
dashboard (ops/grafana), checked with promtool and against a real Prometheus scraping a real
pool under load, plus the Django side's default registry.

Every dashboard query must return data there (no panel may reference a metric that does not
exist), and every metric an alert rule reads must exist.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
import redis
from prometheus_client import REGISTRY, make_wsgi_app
from twitter.models import Tweet

from scalepub.django.announce import NodeError
from scalepub.producer import PendingEntry, StreamProducer
from scalepub.settings import Settings
from scalepub.sharding import ENTRY_FIELD, Keys, shard_for
from tests.e2e import PoolProcess, create_nodes, wait_until
from tests.stack import REPO, Stack, free_port
from tests.streams import produce, row

PROMETHEUS_DIR = REPO / "ops" / "prometheus"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
DASHBOARD = REPO / "ops" / "grafana" / "scalepub-dashboard.json"
POOL_TARGET = "127.0.0.1:9464"  # the targets of the shipped config, replaced when rendered
DJANGO_TARGET = "127.0.0.1:8000"

# Grafana's built-in variables, as a dashboard would have them for a short time range.
GRAFANA_BUILTINS = {"__rate_interval": "30s", "__interval": "15s", "__range": "5m",
                    "__range_s": "300", "__interval_ms": "15000"}
# The dashboard's own variables, with "All" selected.
DASHBOARD_VARIABLES = {"shard": ".*"}
VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def tool(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    if not Path(path).exists():
        pytest.fail(f"{name} not installed: run `make packages` (Debian package prometheus)")
    return path


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True,
                          timeout=60, check=False, cwd=cwd)


def substitute(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced as Grafana would (All selected)."""
    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        known = {**GRAFANA_BUILTINS, **DASHBOARD_VARIABLES}
        assert name in known, f"unknown variable ${name} in {expr}"
        return known[name]
    return VARIABLE.sub(value, expr)


def dashboard() -> dict[str, Any]:
    return cast(dict[str, Any], json.loads(DASHBOARD.read_text()))


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep theirs inside


def dashboard_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, query with variables substituted) of every target."""
    return [(p["title"], substitute(t["expr"])) for p in panels(board)
            for t in p.get("targets", [])]


def render_config(directory: Path, pool_port: int, django_port: int) -> Path:
    """The shipped prometheus.yml with its targets on the test's ports, every interval 1 s,
    and its rule file next to it."""
    text = CONFIG.read_text()
    for old, port in ((POOL_TARGET, pool_port), (DJANGO_TARGET, django_port)):
        quoted = f'"{old}"'
        assert text.count(quoted) == 1, f"{CONFIG}: expected one target {quoted}"
        text = text.replace(quoted, f'"127.0.0.1:{port}"')
    text = re.sub(r"(scrape_interval|evaluation_interval|scrape_timeout): \d+[smh]", r"\1: 1s",
                  text)
    shutil.copy(ALERTS, directory / ALERTS.name)
    path = directory / "prometheus.yml"
    path.write_text(text)
    return path


class Prometheus:
    """The real Prometheus server on a free port, its data and log in ``directory``."""

    def __init__(self, directory: Path, config: Path) -> None:
        self.port = free_port()
        self.log_path = directory / "prometheus.log"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={config}",
             f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=self._log, cwd=directory,
        )
        if not wait_until(self._ready, 30):
            self.stop()
            pytest.fail(f"prometheus not ready in 30 s:\n{self.output()[-3000:]}")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, f"prometheus exited:\n{self.output()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                return True
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        """``data`` of a successful API answer; fails the test with the error otherwise."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        return data["result"] if data["resultType"] == "vector" else [data["result"]]

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()



def rule_config(directory: Path) -> Path:
    """A Prometheus config that only loads alerts.yml (JSON is YAML)."""
    path = directory / "rules-only.yml"
    path.write_text(json.dumps({"global": {"evaluation_interval": "1s"},
                                "rule_files": [str(ALERTS)]}))
    return path


@pytest.fixture(scope="module")
def bare_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Prometheus with alerts.yml loaded and no targets: parses rules and queries."""
    directory = tmp_path_factory.mktemp("bare-prometheus")
    prometheus = Prometheus(directory, rule_config(directory))
    try:
        yield prometheus
    finally:
        prometheus.stop()


def alert_rules(prometheus: Prometheus) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    wait_until(lambda: bool(prometheus.api("rules")["groups"]), 10)
    for group in prometheus.api("rules")["groups"]:
        rules += [r for r in group["rules"] if r["type"] == "alerting"]
    return rules


# ---------------------------------------------------------------- static checks


def test_alert_rules_pass_promtool() -> None:
    done = promtool("check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr


def test_shipped_and_rendered_configs_pass_promtool(tmp_path: Path) -> None:
    done = promtool("check", "config", str(CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr
    rendered = render_config(tmp_path, free_port(), free_port())
    done = promtool("check", "config", str(rendered))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "scrape_interval: 1s" in rendered.read_text()


def test_dashboard_is_importable_and_every_panel_uses_the_datasource_variable() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    assert board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    shard = variables["shard"]
    assert shard["multi"] and shard["includeAll"] and shard["allValue"] == ".*"
    assert shard["datasource"]["uid"] == "${datasource}"
    assert "label_values(scalepub_entries_published_total, shard)" in json.dumps(shard["query"])
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    queries = 0
    for panel in panels(board):
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert target["expr"].strip(), panel["title"]
            for m in VARIABLE.finditer(target["expr"]):
                name = m.group(1) or m.group(2)
                assert name in GRAFANA_BUILTINS or name in variables, (panel["title"], name)
            queries += 1
    assert queries >= 20


def test_dashboard_queries_are_valid_promql(bare_prometheus: Prometheus) -> None:
    for title, expr in dashboard_queries(dashboard()):
        bare_prometheus.api("query", query=expr)  # a parse error fails here, with the panel
        assert title


def test_alert_rules_fire_when_they_should(bare_prometheus: Prometheus, tmp_path: Path) -> None:
    """promtool unit tests on synthetic series, for the rules as Prometheus loaded them
    (annotations dropped: the tests check when and with which labels an alert fires)."""
    rules = alert_rules(bare_prometheus)
    names = {r["name"] for r in rules}
    assert {"ScalepubStreamLagGrowing", "ScalepubNotPublishing", "ScalepubDeadLetters",
            "ScalepubShardRestartLoop"} <= names
    stripped = [{"alert": r["name"], "expr": r["query"], "for": f"{int(r['duration'])}s",
                 "labels": r["labels"]} for r in rules]
    (tmp_path / "rules.json").write_text(json.dumps({"groups": [{"name": "scalepub",
                                                                 "rules": stripped}]}))
    severity = {r["name"]: r["labels"].get("severity") for r in rules}
    (tmp_path / "tests.json").write_text(json.dumps(synthetic_rule_tests(severity)))
    done = promtool("test", "rules", "tests.json", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


POOL = {"job": "scalepub-pool", "instance": "pool:9464"}
WEB = {"job": "scalepub-django", "instance": "web:8000"}


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    base = WEB if name.startswith("scalepub_enqueue") else POOL if name != "up" else {}
    merged = {**base, **labels}
    selector = ",".join(f'{k}="{v}"' for k, v in merged.items())
    return {"series": f"{name}{{{selector}}}", "values": values}


def synthetic_rule_tests(severity: dict[str, str | None]) -> dict[str, Any]:
    """Shard 0 publishes but falls behind, shard 1 is stuck with a backlog, shard 2 is idle,
    shard 3 keeps up; a dead letter on shard 2, a process restarting in a loop, errors."""
    def alert(name: str, **labels: str) -> dict[str, Any]:
        return {"exp_labels": {**labels, "severity": severity[name]}}

    series = [
        _series("scalepub_stream_lag_entries", "0+200x40", shard="0"),
        _series("scalepub_stream_lag_entries", "5000x40", shard="1"),
        _series("scalepub_stream_lag_entries", "0x40", shard="2"),
        _series("scalepub_stream_lag_entries", "50x40", shard="3"),
        *[_series("scalepub_stream_pending_entries", "0x40", shard=s) for s in "0123"],
        _series("scalepub_entries_published_total", "0+600x40", shard="0"),
        _series("scalepub_entries_published_total", "700x40", shard="1"),
        _series("scalepub_entries_published_total", "900x40", shard="2"),
        _series("scalepub_entries_published_total", "0+3000x40", shard="3"),
        _series("scalepub_dead_letters_total", "0x4 3x40", shard="2"),
        _series("scalepub_dead_letters_total", "0x40", shard="0"),
        _series("scalepub_shard_restarts_total", "0+1x40", shard="1"),
        _series("scalepub_shard_restarts_total", "0 0 0 1x40", shard="3"),
        _series("scalepub_errors_total", "0+30x40", shard="1", kind="connection_lost"),
        _series("scalepub_errors_total", "0+1x40", shard="0", kind="redis"),
        _series("scalepub_ignored_stanzas_total", "0x5 40x40", shard="3", kind="forged_reply"),
        _series("scalepub_ignored_stanzas_total", "0+100x40", shard="0", kind="unexpected"),
        _series("scalepub_e2e_latency_seconds_bucket", "0+10x40", shard="1", le="1.0"),
        _series("scalepub_e2e_latency_seconds_bucket", "0+100x40", shard="1", le="10.0"),
        _series("scalepub_e2e_latency_seconds_bucket", "0+100x40", shard="1", le="+Inf"),
        # Shard 4: reading dominates (300 ms a batch), the other hops take 10 ms each.
        *[_series(f"scalepub_hop_latency_seconds_{part}", values, shard="4", hop=hop)
          for hop in ("commit_to_append", "append_to_read", "read_to_send", "send_to_result")
          for part, values in (("sum", "0+30x40" if hop == "append_to_read" else "0+1x40"),
                               ("count", "0+100x40"))],
        _series("scalepub_enqueue_failures_total", "0x3 5x40", reason="redis"),
        _series("scalepub_enqueue_failures_total", "0x40", reason="node"),
        _series("up", "1x5 0x40", **POOL),
        _series("up", "1x40", **WEB),
    ]
    pool = dict(POOL)
    checks = [
        # 3 min in: lag 600, below the threshold; restarts 3, not more than 3.
        ("3m", "ScalepubStreamLagGrowing", []),
        ("3m", "ScalepubShardRestartLoop", []),
        ("3m", "ScalepubDeadLetters", []),
        ("3m", "ScalepubPoolDown", []),
        ("7m", "ScalepubDeadLetters", [alert("ScalepubDeadLetters", **pool, shard="2")]),
        ("8m", "ScalepubPoolDown", [alert("ScalepubPoolDown", **pool)]),
        ("12m", "ScalepubShardRestartLoop",
         [alert("ScalepubShardRestartLoop", **pool, shard="1")]),
        ("15m", "ScalepubStreamLagGrowing",
         [alert("ScalepubStreamLagGrowing", **pool, shard="0")]),
        ("15m", "ScalepubNotPublishing", [alert("ScalepubNotPublishing", **pool, shard="1")]),
        ("20m", "ScalepubErrors", [alert("ScalepubErrors", **pool, kind="connection_lost")]),
        ("20m", "ScalepubE2ELatencyHigh", [alert("ScalepubE2ELatencyHigh", **pool)]),
        ("6m", "ScalepubEnqueueFailures",
         [alert("ScalepubEnqueueFailures", **WEB, reason="redis")]),
        ("30m", "ScalepubDeadLetters", []),  # nothing new for 10 min: resolved
        ("4m", "ScalepubForgedReplies", []),  # other kinds never fire it
        ("7m", "ScalepubForgedReplies", [alert("ScalepubForgedReplies", **pool, shard="3")]),
        ("30m", "ScalepubForgedReplies", []),
        ("8m", "ScalepubLatencyHopDominates", []),  # not yet for 10 min
        ("25m", "ScalepubLatencyHopDominates",
         [alert("ScalepubLatencyHopDominates", **pool, hop="append_to_read")]),
    ]
    known = set(severity)
    return {
        "rule_files": ["rules.json"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": exp}
                                for at, name, exp in checks if name in known],
        }],
    }


# ---------------------------------------------------------------- against real Prometheus


class Trickle:
    """A few entries every 200 ms on ``nodes`` until stopped, in a thread."""

    def __init__(self, settings: Settings, nodes: list[str]) -> None:
        self.settings = settings
        self.nodes = nodes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Trickle:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        producer = StreamProducer(self.settings)
        i = 0
        while not self._stop.wait(0.2):
            producer.enqueue([PendingEntry(n, time.time_ns(), "t.row", f"trickle{i}", "xml",
                                           row(i, 200)) for n in self.nodes])
            i += 1
        producer.close()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_default_registry(port: int) -> WSGIServer:
    """What a Django site exposing prometheus_client's default registry serves at /metrics."""
    server = make_server("127.0.0.1", port, make_wsgi_app(REGISTRY), handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def metrics_served(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            return b"scalepub_" in reply.read()
    except OSError:
        return False


def poison(settings: Settings, client: redis.Redis, nodes: list[str]) -> None:
    """An unreadable envelope and a row XML cannot carry (both dead letters; the second one
    makes the server drop the connection), and 50 x 6 kB in one batch (refused: larger than
    ejabberd's max_payload_size, so split)."""
    client.xadd(Keys(settings.key_prefix).stream(shard_for(nodes[0], settings.shards)),
                {ENTRY_FIELD: b"\x93not an envelope"})
    producer = StreamProducer(settings)
    producer.enqueue([PendingEntry(nodes[1], time.time_ns(), "t.row", "ctl", "xml",
                                   b"<row>\x01</row>")])
    producer.close()
    produce(settings, [nodes[2]], 50, size=6000)


def tweets(prefix: str, count: int) -> None:
    """Rows of the example project: enqueued by the Django side, one with an invalid node."""
    for i in range(count):
        Tweet.objects.create(author=f"{prefix}a{i % 4}", text=f"tweet {i}")
    with pytest.raises(NodeError):  # an invalid node fails the save, counted reason="node"
        Tweet.objects.create(author="tab\tin a node name", text="counted as a failure")


def missing_data(prometheus: Prometheus, exprs: list[tuple[str, str]]) -> list[str]:
    return [f"{title}: {expr}" for title, expr in exprs if not prometheus.query(expr)]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(scalepub_\w+|up)\s*[{\[]", expr))


@pytest.mark.stack
@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(240)
def test_every_dashboard_and_alert_query_returns_data(
    scalepub_django: Settings, stack: Stack, redis_client: redis.Redis, tmp_path: Path,
) -> None:
    settings = scalepub_django  # 4 shards, a fresh key prefix
    prefix = f"o{uuid.uuid4().hex[:6]}"
    nodes = [f"/obs/{prefix}/n{i}" for i in range(8)]
    create_nodes(stack.env, nodes)
    produce(settings, nodes, 5000)  # 40,000 entries waiting when the pool starts
    poison(settings, redis_client, nodes)
    tweets(prefix, 200)
    pool_port, django_port = free_port(), free_port()
    config = render_config(tmp_path, pool_port, django_port)
    done = promtool("check", "config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr

    django = serve_default_registry(django_port)
    trickle = Trickle(settings, nodes[:4])
    pool = PoolProcess(settings, tmp_path / "pool.log", "--shards", "4", "--metrics-port",
                       str(pool_port), "--batch-max-bytes", "400000")
    prometheus: Prometheus | None = None
    try:
        assert wait_until(lambda: pool.proc.poll() is None and metrics_served(pool_port), 30), (
            f"no metrics on :{pool_port} (exit code {pool.proc.poll()}):\n"
            + pool.output()[-3000:])
        trickle.start()
        prometheus = Prometheus(tmp_path, config)
        # A shard process killed: the supervisor restarts it (scalepub_shard_restarts_total).
        assert wait_until(lambda: len(pool.shard_pids()) == 4, 30), pool.output()[-3000:]
        victim = pool.shard_pids()[0]
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: len(pids := pool.shard_pids()) == 4 and victim not in pids,
                          30), pool.output()[-3000:]

        prom = prometheus
        scraped = "min(sum_over_time(up[5m])) >= 5"  # 5 successful scrapes of each target
        assert wait_until(lambda: bool(prom.query(scraped)), 30), prom.output()[-3000:]

        queries = dashboard_queries(dashboard())
        rules = alert_rules(prom)
        names = sorted(set().union(*(metric_names(r["query"]) for r in rules)))
        checks = queries + [(f"metric of an alert rule: {n}", n) for n in names]
        # Counters of rare events appear once the event happened and was scraped.
        wait_until(lambda: not missing_data(prom, checks), 60, step=1.0)
        missing = missing_data(prom, checks)
        assert not missing, "no data for:\n  " + "\n  ".join(missing) + (
            "\n--- pool log ---\n" + pool.output()[-3000:])

        for rule in rules:
            prom.query(rule["query"])  # evaluates (it need not fire)
        wait_until(lambda: all(r.get("lastEvaluation", "").startswith("2")
                               for r in alert_rules(prom)), 10)
        unhealthy = [(r["name"], r.get("lastError")) for r in alert_rules(prom)
                     if r["health"] != "ok"]
        assert not unhealthy, unhealthy
        trickle.stop()
        assert pool.stop() == 0, pool.output()[-3000:]
    finally:
        trickle.stop()
        if prometheus is not None:
            prometheus.stop()
        pool.kill()
        django.shutdown()
        django.server_close()
