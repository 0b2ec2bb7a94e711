"""The live dashboard (GET /dashboard, service/routes/dashboard.py) and the operators' view
(Prometheus and Grafana in docker-compose.yml, deploy/grafana/, deploy/prometheus/).

- The page and its assets are served from the package with the right types, and nothing in
  them points at another host: the page works offline.
- Its feed is what /metrics exposes, summed over every worker in multiprocess mode, and it
  includes the simulator's status file as `ctrloop stack` writes it.
- The page's arithmetic (dashboard-math.js) matches PromQL's rate() and histogram_quantile(),
  run in node when node is installed.
- Every metric name, label name and matched label value the Grafana dashboard queries exists
  on the service's /metrics, built in-process with every labelled series exercised (the trainer
  exports no metrics of its own: its numbers reach Prometheus through the service's).
- The compose services and provisioning files point at one another, and the Kubernetes pods
  that serve /metrics carry the scrape annotations.

The real browser test is tests/integration/test_dashboard_browser.py.
"""

from __future__ import annotations

import fnmatch
import io
import json
import math
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from service_fakes import RecordingSink

from ctrloop.dev.stack import Stack, StackConfig, _Urls, write_sim_status
from ctrloop.io.registry import InMemoryRegistry
from ctrloop.service.app import create_app
from ctrloop.service.metrics import Metrics, render
from ctrloop.service.routes import dashboard
from ctrloop.service.settings import ServiceSettings
from ctrloop.sim.live import DriverStats, Served

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "service" / "static" / "dashboard"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD_JSON = GRAFANA / "dashboards" / "ctrloop.json"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
URL = re.compile(r"\b(?:https?|wss?)://[^\s\"'<>)]+")
OWN_ASSETS = ("dashboard.js", "dashboard-math.js", "dashboard.css")


@pytest.fixture(autouse=True)
def _single_process_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv(dashboard.SIM_STATUS_ENV, raising=False)


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = create_app(ServiceSettings(), registry=InMemoryRegistry(), sink=RecordingSink())  # type: ignore[arg-type]
    with TestClient(app) as c:
        yield c


def _assets(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


# ---------------------------------------------------------------------------- the page

def test_page_and_assets_are_served_with_their_types(client: TestClient) -> None:
    r = client.get("/dashboard")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    links = [a for a in _assets(r.text) if not a.startswith("data:")]
    scripts = [a for a in links if a.endswith(".js")]
    assert scripts == ["/static/dashboard/uPlot.iife.min.js",
                       "/static/dashboard/dashboard-math.js", "/static/dashboard/dashboard.js"]
    types = {".js": "javascript", ".css": "text/css"}
    for link in links:
        got = client.get(link)
        assert got.status_code == 200, link
        suffix = Path(link).suffix
        if suffix in types:
            assert types[suffix] in got.headers["content-type"], (link, got.headers)
            assert len(got.content) > 100, link
    assert 'id="panels"' in r.text and 'data-feed="/dashboard/data"' in r.text


def test_nothing_on_the_page_points_at_another_host(client: TestClient) -> None:
    html = client.get("/dashboard").text
    assert URL.findall(html) == []
    assert all(a.startswith(("/", "data:")) for a in _assets(html)), _assets(html)
    for name in OWN_ASSETS:
        assert URL.findall((STATIC / name).read_text(encoding="utf-8")) == [], name
    # The vendored uPlot names its home page in its banner comment, and nowhere else.
    lib = (STATIC / "uPlot.iife.min.js").read_text(encoding="utf-8")
    banner, _, code = lib.partition("*/")
    assert banner.startswith("/*!") and URL.findall(code) == []
    assert URL.findall((STATIC / "uPlot.min.css").read_text(encoding="utf-8")) == []
    assert "@import" not in (STATIC / "uPlot.min.css").read_text(encoding="utf-8")


def test_page_behind_a_proxy_prefix_links_under_it() -> None:
    app = create_app(ServiceSettings(), registry=InMemoryRegistry(), sink=RecordingSink())  # type: ignore[arg-type]
    with TestClient(app, root_path="/ctr") as c:
        html = c.get("/dashboard").text
    local = [a for a in _assets(html) if not a.startswith("data:")]
    assert local and all(a.startswith("/ctr/") for a in local), local
    assert 'data-feed="/ctr/dashboard/data"' in html


def test_polling_the_page_is_not_counted_as_traffic_nor_documented(client: TestClient) -> None:
    for _ in range(3):
        assert client.get("/dashboard/data").status_code == 200
    assert "dashboard" not in client.get("/metrics").text
    assert not any("dashboard" in p for p in client.get("/openapi.json").json()["paths"])


def test_vendored_uplot_is_the_version_the_readme_names_and_is_packaged() -> None:
    readme = (STATIC / "README.md").read_text(encoding="utf-8")
    version = re.search(r"\(v(\d+\.\d+\.\d+)\)", (STATIC / "uPlot.iife.min.js").read_text(
        encoding="utf-8")[:200])
    assert version, "uPlot's banner names no version"
    assert f"uplot@{version.group(1)}" in readme and "MIT" in readme
    assert "MIT License" in (STATIC / "uPlot.LICENSE").read_text(encoding="utf-8")
    assert f"uPlot {version.group(1)}" in dashboard.__doc__  # type: ignore[operator]
    # The wheel (the Docker image installs one) must carry every file of the page.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    globs = pyproject["tool"]["setuptools"]["package-data"]["ctrloop.service"]
    for f in STATIC.iterdir():
        rel = f"static/dashboard/{f.name}"
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not package data"


# ---------------------------------------------------------------------------- the feed

def test_feed_is_what_metrics_exposes(client: TestClient) -> None:
    body = {"user_id": "u", "candidates": [{"ad_id": "a", "advertiser_id": "b"}]}
    assert client.post("/v1/score", json=body).status_code == 200
    feed = client.get("/dashboard/data")
    assert feed.headers["content-type"] == "application/json"
    data = feed.json()
    assert data["metrics"] == _reference_samples(client.get("/metrics").text)
    score = [v for labels, v in data["metrics"]["ctrloop_requests_total"]
             if labels == {"route": "/v1/score", "status": "2xx"}]
    assert score == [1.0]
    assert data["worker"]["status"] == "prior" and data["worker"]["pid"] > 0
    assert data["sim"] is None and data["sim_expected"] is False
    assert abs(data["now"] - client.app.state.service.started_at) < 60  # type: ignore[attr-defined]


_WORKER = """
from ctrloop.service.metrics import Metrics
m = Metrics()
m.requests.labels("/v1/score", "2xx").inc({n})
m.request_seconds.labels("/v1/score").observe({latency})
m.model_version.set({version})
"""


def test_feed_sums_every_worker_in_multiprocess_mode(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Two worker processes count into the multiprocess directory; whichever process answers
    the poll, its feed is the sum (and the newest version), as /metrics is."""
    for n, latency, version in ((3, 0.004, 5), (4, 0.2, 7)):
        code = _WORKER.format(n=n, latency=latency, version=version)
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                       env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin"})
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    app = create_app(ServiceSettings(), registry=InMemoryRegistry(), sink=RecordingSink())  # type: ignore[arg-type]
    feed = dashboard.feed(app.state.service)
    m = feed["metrics"]

    def value(name: str, **labels: str) -> float:
        return sum(v for lab, v in m[name] if all(lab.get(k) == x for k, x in labels.items()))

    assert value("ctrloop_requests_total", route="/v1/score", status="2xx") == 7
    assert value("ctrloop_request_seconds_count", route="/v1/score") == 2
    assert value("ctrloop_request_seconds_bucket", route="/v1/score", le="0.005") == 1
    assert value("ctrloop_model_version") == 7
    assert m == _reference_samples(render(Metrics()).decode())


def _status(path: Path) -> dict[str, Any]:
    stats = DriverStats(started_at=1_000.0, bucket_s=10.0)
    for k in range(25):
        ts = 1_000.0 + k
        stats.record_request(ts, [Served(ts, 0.03, 0.04, 0.05, k % 5 == 0, "trained", "3")],
                             oracle_sum=0.06, random_sum=0.02, latency_s=0.01)
    snap = stats.snapshot(now=1_025.0)
    fresh = [{"t": 1_020.0, **stats.served_auc()},
             {"t": 1_025.0, **stats.served_auc(statuses=("pinned",))}]  # none: NaN AUCs
    write_sim_status(path, stats, snap, fresh)
    return dict(json.loads(path.read_text()))


def test_sim_status_file_reaches_the_feed(client: TestClient, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sim-status.json"
    monkeypatch.setenv(dashboard.SIM_STATUS_ENV, str(path))
    early = client.get("/dashboard/data").json()
    assert early["sim"] is None and early["sim_expected"] is True  # not written yet
    status = _status(path)
    sim = client.get("/dashboard/data").json()["sim"]
    assert sim["status"] == status and 0 <= sim["age_s"] < 60
    assert status["timeline"][0]["expected_ctr"] == pytest.approx(0.04)
    assert status["timeline"][0]["oracle_ctr"] == pytest.approx(0.06)
    assert status["fresh_auc"][0]["auc_ad_appeal"] == pytest.approx(0.5)  # constant scores
    # Strict JSON: an AUC over no impressions is NaN in Python, null in the file.
    assert status["fresh_auc"][1]["n"] == 0 and status["fresh_auc"][1]["auc_true_ctr"] is None
    assert not list(tmp_path.glob("*.tmp"))  # written aside, then renamed over


def test_sim_status_problems_are_reported_not_raised(tmp_path: Path) -> None:
    assert dashboard.read_sim_status(None, 0.0) is None
    assert dashboard.read_sim_status(str(tmp_path / "none.json"), 0.0) is None
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "cannot read" in dashboard.read_sim_status(str(bad), 0.0)["error"]  # type: ignore[index]
    bad.write_text("[1, 2]")
    assert "no JSON object" in dashboard.read_sim_status(str(bad), 0.0)["error"]  # type: ignore[index]
    bad.write_text(" " * (dashboard.MAX_SIM_STATUS_BYTES + 1))
    assert "bytes" in dashboard.read_sim_status(str(bad), 0.0)["error"]  # type: ignore[index]


def test_the_page_reads_only_fields_the_stack_writes(tmp_path: Path) -> None:
    """dashboard.js reads the status by name; a renamed field would leave a panel empty."""
    status = _status(tmp_path / "s.json")
    js = (STATIC / "dashboard.js").read_text(encoding="utf-8")
    sim_js = js[js.index("function updateSim"):js.index("// ---", js.index("function updateSim"))]
    assert set(re.findall(r"\bs\.(\w+)", sim_js)) <= set(status), "status fields"
    bucket = set(status["timeline"][0])
    assert set(re.findall(r'col\("(\w+)"\)', sim_js)) <= bucket
    assert set(re.findall(r"\bb\.(\w+)", sim_js)) <= bucket
    assert set(re.findall(r"\blb\.(\w+)", sim_js)) <= bucket
    fresh = set(status["fresh_auc"][0])
    assert set(re.findall(r"\b(?:r|lf)\.(\w+)", sim_js)) <= fresh


def test_the_stack_prints_the_dashboard_first() -> None:
    lines = _Urls("http://127.0.0.1:8123", "127.0.0.1:1", "redis://127.0.0.1:2/0").lines()
    assert lines[0].split() == ["dashboard", "http://127.0.0.1:8123/dashboard"]


@pytest.mark.parametrize("simulator", [True, False])
def test_the_stack_tells_its_service_where_the_simulator_writes(tmp_path: Path,
                                                                 simulator: bool) -> None:
    """Only with the simulator: without it the page would wait for a status forever."""
    stack = Stack(StackConfig(workdir=tmp_path, simulator=simulator), io.StringIO())
    stack.kafka = SimpleNamespace(bootstrap="127.0.0.1:1")  # type: ignore[assignment]
    stack.redis = SimpleNamespace(url="redis://127.0.0.1:2/0")  # type: ignore[assignment]
    env = stack._child_env(8123)
    if simulator:
        assert env[dashboard.SIM_STATUS_ENV] == str(tmp_path / "sim-status.json")
    else:
        assert dashboard.SIM_STATUS_ENV not in env


# ---------------------------------------------------------------------------- the arithmetic

def prom_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile (promql/quantile.go, bucketQuantile) on cumulative
    (upper bound, count) pairs sorted by bound, the last one +Inf."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    b = next(i for i in range(len(buckets)) if i == len(buckets) - 1 or buckets[i][1] >= rank)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    start, prior = (0.0, 0.0) if b == 0 else buckets[b - 1]
    end, count = buckets[b]
    return start + (end - start) * ((rank - prior) / (count - prior))


def _cases() -> list[dict[str, Any]]:
    bounds = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, math.inf]
    cases = []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        counts = np.cumsum(rng.integers(0, 20, len(bounds)) * (rng.random(len(bounds)) < 0.7))
        q = float(rng.choice([0.5, 0.9, 0.99, 0.999, rng.random()]))
        cases.append({"q": q, "buckets": [[b, int(c)] for b, c in zip(bounds, counts,
                                                                       strict=True)]})
    return cases


_NODE = """
const M = require(process.argv[1]);
const cases = JSON.parse(require("fs").readFileSync(0, "utf8"));
const inf = (b) => b.map(([le, c]) => [le === null ? Infinity : le, c]);
const feed = (now, rows) => ({now, metrics: {x_total: rows,
  h_bucket: [[{le: "0.1", r: "a"}, rows[0][1]], [{le: "+Inf", r: "a"}, rows[0][1] + 1],
             [{le: "0.1", r: "b"}, 2], [{le: "+Inf", r: "b"}, 3]]}});
const a = feed(10, [[{r: "a"}, 5], [{r: "b"}, 7]]);
const b = feed(12, [[{r: "a"}, 9], [{r: "b"}, 2]]);
const c = feed(14, [[{r: "a"}, 9], [{r: "b"}, 2], [{r: "c"}, 3]]);
console.log(JSON.stringify({
  quantiles: cases.map((c) => M.histogramQuantile(c.q, inf(c.buckets))),
  rate_all: M.rate(a, b, "x_total"), rate_a: M.rate(a, b, "x_total", {r: "a"}),
  rate_missing: M.rate(a, b, "y_total"), increase_reset: M.increase(7, 2),
  rate_new: M.rate(b, c, "x_total"),
  buckets: M.bucketIncrease(a, b, "h", {}).map(([le, c]) => [String(le), c]),
  share_none: M.share(0, 0),
}));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_page_arithmetic_matches_promql() -> None:
    cases = _cases()
    wire = [{"q": c["q"], "buckets": [[None if math.isinf(le) else le, n]
                                      for le, n in c["buckets"]]} for c in cases]
    out = subprocess.run(["node", "-e", _NODE, str(STATIC / "dashboard-math.js")],
                         input=json.dumps(wire), capture_output=True, text=True, timeout=60,
                         check=True).stdout
    got = json.loads(out)
    for c, q in zip(cases, got["quantiles"], strict=True):
        want = prom_quantile(c["q"], [(le, n) for le, n in c["buckets"]])
        assert (q is None) == (want is None), c
        if want is not None:
            assert q == pytest.approx(want, rel=1e-12), c
    # Over 2 s: a's counter went 5 -> 9, b's was reset (7 -> 2): its new value is its increase.
    # Per series, then summed (sum(rate())): (4 + 2) / 2, not the sum's 12 -> 11.
    assert got["rate_a"] == pytest.approx(2.0)
    assert got["rate_all"] == pytest.approx(3.0)
    assert got["rate_new"] == pytest.approx(1.5)  # a series born in between: all of it is new
    assert got["rate_missing"] is None and got["share_none"] is None
    assert got["increase_reset"] == 2
    assert got["buckets"] == [["0.1", 4], ["Infinity", 4]]  # summed over label r


# ---------------------------------------------------------------------------- Grafana

def _panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def _exprs() -> list[str]:
    dash = json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))
    return [t["expr"] for p in _panels(dash) for t in p.get("targets", [])]


@pytest.fixture(scope="module")
def exposition() -> str:
    """The service's /metrics with every labelled series the code can export exercised."""
    from test_delay_report import busy_monitor
    from test_service_app import SPEC, score_request
    from test_service_explore import explorable_model

    from ctrloop.core.analysis import CollapseWatch
    from ctrloop.core.delay_report import delay_report
    from ctrloop.core.delays import build_policy
    from ctrloop.core.models import build_model
    from ctrloop.core.snapshot import encode_snapshot

    mp = pytest.MonkeyPatch()
    mp.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    registry = InMemoryRegistry()
    app = create_app(ServiceSettings(explore_temperature=1.0), registry=registry,
                     sink=RecordingSink())  # type: ignore[arg-type]
    try:
        with TestClient(app) as c:
            v = registry.next_version()
            report = delay_report(build_policy("variance"), busy_monitor(12),
                                  lambda k: f"adv{k}", top_n=3)
            # Each head's record as the trainer writes it: the IA per field ("collapse").
            cvr, ctr = build_model("fwfm", SPEC, dim=4), explorable_model()
            cvr_meta = {"head": "pcvr", "delays": report, **CollapseWatch().update(cvr)}
            ctr_meta = {"samples_seen": 10, **CollapseWatch().update(ctr)}
            registry.head("pcvr").publish(v, encode_snapshot(cvr, v, {}), cvr_meta)
            registry.publish(v, encode_snapshot(ctr, v, ctr_meta), ctr_meta)
            state = app.state.service
            assert state.reloader.check()
            for seed in range(20):
                r = c.post("/v1/score", json=score_request(explore=True, seed=seed))
                assert r.status_code == 200, r.text
            c.post("/v1/score", json=score_request())  # not asked to explore
            assert c.post("/v1/score", json={"user_id": "u"}).status_code == 422
            assert c.post("/v1/events", json={"events": [
                {"type": "click", "impression_id": "i", "ts": 1767225600.0}]}).status_code == 202
            assert c.post("/v1/events", json={"events": [{"type": "nope"}]}).status_code == 422
            bad = registry.next_version()
            registry.publish(bad, b"garbage", {})
            state.reloader.check()  # refused: a reload failure
            with torch.no_grad():  # a poisoned row: a non-finite prediction, answered the prior
                for param in state.holder.served.model.parameters():
                    param.fill_(float("nan"))
            c.post("/v1/score", json=score_request())
            text: str = c.get("/metrics").text
    finally:
        mp.undo()
    return text


@pytest.fixture(scope="module")
def exposed(exposition: str) -> dict[str, list[dict[str, str]]]:
    """{sample name: [labels of each sample]} of `exposition`."""
    return {name: [labels for labels, _ in rows]
            for name, rows in dashboard.metric_samples(exposition).items()}


def _reference_samples(text: str) -> dict[str, list[list[Any]]]:
    out: dict[str, list[list[Any]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append([s.labels, s.value])
    return out


def test_feed_parses_the_exposition_as_prometheus_client_does(exposition: str) -> None:
    registry = CollectorRegistry()
    odd = Gauge("odd_labels", "label values the format escapes", ["v"], registry=registry)
    for value in ['a"b', "back\\slash", "new\nline", "} 5", "", "é ü", "x=\"y\",z"]:
        odd.labels(value).set(1.5)
    Gauge("special_values", "", ["k"], registry=registry).labels("nan").set(math.nan)
    text = exposition + generate_latest(registry).decode()
    got, want = dashboard.metric_samples(text), _reference_samples(text)
    assert got.keys() == want.keys()
    for name in want:
        assert len(got[name]) == len(want[name]), name
        for (gl, gv), (wl, wv) in zip(got[name], want[name], strict=True):
            assert gl == wl and (gv == wv or (math.isnan(gv) and math.isnan(wv))), name
    assert any(lab == {"v": "} 5"} for lab, _ in got["odd_labels"])
    with pytest.raises(ValueError, match="not a Prometheus sample"):
        dashboard.metric_samples("ctrloop_x{broken 1\n")


_SELECTOR = re.compile(r"\b(ctrloop_[a-zA-Z0-9_:]*)\s*(?:\{([^}]*)\})?")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def test_every_metric_and_label_the_grafana_dashboard_queries_exists(
        exposed: dict[str, list[dict[str, str]]]) -> None:
    exprs = _exprs()
    assert len(exprs) >= 20
    problems = []
    for expr in exprs:
        names = []
        for name, matchers in _SELECTOR.findall(expr):
            names.append(name)
            if name not in exposed:
                problems.append(f"{name} is not on /metrics ({expr})")
                continue
            labelled = exposed[name]
            for label, op, value in _MATCHER.findall(matchers):
                values = {lab[label] for lab in labelled if label in lab}
                if not values:
                    problems.append(f"{name} has no label {label!r} ({expr})")
                elif op == "=" and value not in values:
                    problems.append(f"{name}{{{label}={value!r}}} matches nothing: {values}")
                elif op == "=~" and re.fullmatch(r"[\w/.-]+(\|[\w/.-]+)*", value):
                    missing = set(value.split("|")) - values
                    if missing:
                        problems.append(f"{name}{{{label}=~{value!r}}}: no {missing}")
        assert names, f"queries no ctrloop metric: {expr}"
        for group in _GROUPING.findall(expr):
            for label in (x.strip() for x in group.split(",") if x.strip()):
                if not any(label in lab for n in names for lab in exposed.get(n, [])):
                    problems.append(f"grouping by {label!r}, which none of {names} has")
    assert not problems, "\n".join(problems)


def test_the_grafana_dashboard_covers_what_the_service_exports(
        exposed: dict[str, list[dict[str, str]]]) -> None:
    """A metric the service exports but no panel shows is likely a forgotten panel."""
    queried = {n for e in _exprs() for n, _ in _SELECTOR.findall(e)}
    families = {re.sub(r"_(total|bucket|sum|count|created)$", "", n) for n in exposed}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in queried}
    # Diagnostic gauges of the delay policy's statistic: in /metrics for alerting, not graphed.
    not_graphed = {"ctrloop_delay_dispersion", "ctrloop_delay_dispersion_shrunk",
                   "ctrloop_delay_window_reports", "ctrloop_delay_clicks_recent"}
    assert families - shown - not_graphed == set()


def test_the_grafana_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD_JSON.read_text(encoding="utf-8"))
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = list(_panels(dash))
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(set(refs)) == len(refs), p["title"]
        assert all(t["datasource"] == p["datasource"] for t in p["targets"])


def _mounts(service: str) -> dict[str, Path]:
    """Bind mounts of a compose service: {container path: host path}."""
    out = {}
    for v in COMPOSE["services"][service].get("volumes", []):
        src, dst, *_ = str(v).split(":")
        if src.startswith("."):
            out[dst] = (ROOT / src).resolve()
    return out


def test_compose_provisions_prometheus_and_grafana(client: TestClient) -> None:
    services = COMPOSE["services"]
    prom, graf = services["prometheus"], services["grafana"]
    # Prometheus reads deploy/prometheus/prometheus.yml and scrapes the compose service.
    mounts = _mounts("prometheus")
    assert mounts["/etc/prometheus/prometheus.yml"] == PROMETHEUS_YML
    config = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    job = jobs["ctrloop-service"]
    assert client.get(job.get("metrics_path", "/metrics")).status_code == 200
    command = services["service"]["command"]
    port = command[command.index("--port") + 1]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"service:{port}"]
    assert prom["depends_on"]["service"]
    # Grafana: the data source is that Prometheus; the dashboard directory is mounted where
    # the provider looks; the home dashboard is the provisioned file.
    mounts = _mounts("grafana")
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning == (GRAFANA / "provisioning").resolve()
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    source = sources["datasources"][0]
    assert source["type"] == "prometheus"
    u = urlsplit(source["url"])
    assert u.hostname == "prometheus" and f"{u.port}:{u.port}" in prom["ports"]
    providers = yaml.safe_load((provisioning / "dashboards" / "ctrloop.yml").read_text())
    path = providers["providers"][0]["options"]["path"]
    assert mounts[path] == DASHBOARD_JSON.parent.resolve()
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounts[str(Path(home).parent)] / Path(home).name == DASHBOARD_JSON.resolve()
    assert graf["depends_on"]["prometheus"]["condition"] == "service_healthy"
    for name in ("prometheus", "grafana"):
        assert services[name]["healthcheck"]["test"], name
        named = [str(v).split(":")[0] for v in services[name]["volumes"]
                 if not str(v).startswith(".")]
        assert set(named) <= set(COMPOSE["volumes"]), name


def test_kubernetes_pods_with_metrics_carry_the_scrape_annotations() -> None:
    docs = [d for p in sorted((ROOT / "deploy").glob("*.yaml"))
            for d in yaml.safe_load_all(p.read_text(encoding="utf-8")) if d]
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    assert {w["metadata"]["name"] for w in workloads} == {"ctrloop-service", "ctrloop-trainer"}
    for w in workloads:
        pod = w["spec"]["template"]
        notes = pod["metadata"].get("annotations", {})
        ports = [p["containerPort"] for c in pod["spec"]["containers"]
                 for p in c.get("ports", [])]
        if w["metadata"]["name"] == "ctrloop-service":
            assert notes["prometheus.io/scrape"] == "true"
            assert int(notes["prometheus.io/port"]) in ports
            assert notes["prometheus.io/path"] == "/metrics"
        else:  # the trainer serves nothing: a scrape annotation would be a target always down
            assert not ports and "prometheus.io/scrape" not in notes
