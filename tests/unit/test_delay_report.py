"""Per-advertiser delay observability: the monitor, the bounded report, and where it is shown
(pipeline, published pCVR record, the service's /metrics, `ctrloop delay-report`)."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from service_fakes import RecordingSink

from ctrloop.cli import main
from ctrloop.core.delay_report import (
    OTHER,
    TOTAL,
    CvrMonitor,
    MonitorConfig,
    delay_report,
    render_report,
)
from ctrloop.core.delays import PolicyConfig, VariancePolicy, build_policy
from ctrloop.core.errors import ConfigError
from ctrloop.core.events import Event, Impression
from ctrloop.core.features import FeatureSpec, Field
from ctrloop.core.models import build_model
from ctrloop.core.snapshot import encode_snapshot
from ctrloop.io.registry import InMemoryRegistry
from ctrloop.service.app import create_app
from ctrloop.service.settings import ServiceSettings
from ctrloop.sim import parsed_events
from ctrloop.trainer.checkpoint import load_checkpoint, save_checkpoint
from ctrloop.trainer.pipeline import Pipeline, PipelineConfig
from ctrloop.trainer.streaming import RegistryPublisher

T0 = 1767225600.0
HOUR = 3600.0
MON = MonitorConfig(mature_s=2 * HOUR, bucket_s=HOUR, half_life_s=1e9)


def through_torch(state: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --- the monitor ----------------------------------------------------------------------------

def test_matured_clicks_give_observed_cvr_and_calibration() -> None:
    m = CvrMonitor(MON)
    for i in range(10):
        m.add_click(f"c{i}", 7, T0 + i)
        m.add_pcvr(7, T0 + i, 0.3)
    for i in range(2):
        m.add_conversion(f"c{i}", T0 + 1000.0)
    m.add_conversion("c0", T0 + 1100.0)  # a second report of the same click
    m.add_conversion("nobody", T0 + 1100.0)
    # The click hour [T0, T0 + 1 h) matures at T0 + 1 h + 2 h, not a second before.
    m.advance(T0 + 3 * HOUR - 1.0)
    assert m.view(7)["matured_clicks"] == 0.0
    m.add_conversion("c2", T0 + 3 * HOUR - 1.0)  # still counted: the click is not mature yet
    m.advance(T0 + 3 * HOUR)
    v = m.view(7)
    assert (v["matured_clicks"], v["matured_conversions"]) == (10.0, 3.0)
    assert v["recent_pcvr"] == pytest.approx(3.0)
    m.add_conversion("c3", T0 + 3 * HOUR + 5.0)  # after maturity: not counted
    assert m.view(7)["matured_conversions"] == 3.0
    assert (m.stats.duplicate_conversions, m.stats.unmatched, m.stats.after_maturity) \
        == (1, 2, 0)  # c3's click was forgotten at maturity: unmatched
    r = delay_report(build_policy("fixed:60"), m, top_n=5)
    [row] = r["advertisers"]
    assert row["observed_cvr"] == row["history_cvr"] == pytest.approx(0.3)
    assert row["calibration"] == pytest.approx(1.0)  # sum pCVR 3.0 / 3 conversions
    assert row["wait_s"] == 60.0 and row["dispersion"] is None


def test_recent_totals_decay_and_history_does_not() -> None:
    m = CvrMonitor(MonitorConfig(mature_s=0.0, bucket_s=HOUR, half_life_s=HOUR))
    m.add_click("a", 1, T0)
    m.add_conversion("a", T0 + 1.0)
    m.add_click("b", 1, T0 + HOUR)
    m.advance(T0 + 2 * HOUR)  # both hours mature, one hour apart
    v = m.view(1)
    assert (v["matured_clicks"], v["matured_conversions"]) == (2.0, 1.0)
    assert v["recent_clicks"] == pytest.approx(1.5) and v["recent_conversions"] \
        == pytest.approx(0.5)  # the older hour weighs half


def test_the_click_cap_forgets_the_oldest() -> None:
    m = CvrMonitor(replace(MON, max_clicks=2))
    for i in range(3):
        m.add_click(f"c{i}", 1, T0 + i)
    assert m.stats.forgotten_at_cap == 1
    m.add_conversion("c0", T0 + 10.0)
    assert m.stats.unmatched == 1
    with pytest.raises(ConfigError):
        MonitorConfig(max_clicks=0)


MonOp = tuple[str, int, float]
mon_ops = st.lists(st.tuples(st.sampled_from(["click", "pcvr", "conv", "advance"]),
                             st.integers(0, 15), st.floats(0.0, 2000.0)), max_size=60)


def run_monitor(m: CvrMonitor, ops: list[MonOp], clock: list[float]) -> None:
    for kind, i, dt in ops:
        clock[0] += dt
        t = clock[0]
        if kind == "click":
            m.add_click(f"c{i}", i % 4, t)
        elif kind == "pcvr":
            m.add_pcvr(i % 4, t - dt, 0.1 * (i % 7))
        elif kind == "conv":
            m.add_conversion(f"c{i}", t)
        else:
            m.advance(t - 100.0)


@settings(max_examples=50, deadline=None)
@given(ops=mon_ops, cut=st.floats(0.0, 1.0))
def test_monitor_restart_in_the_middle_equals_no_restart(ops: list[MonOp], cut: float) -> None:
    cfg = MonitorConfig(mature_s=3000.0, bucket_s=500.0, half_life_s=2000.0, max_clicks=8)
    plain = CvrMonitor(cfg)
    run_monitor(plain, ops, [T0])
    k = int(cut * len(ops))
    first, clock = CvrMonitor(cfg), [T0]
    run_monitor(first, ops[:k], clock)
    second = CvrMonitor(cfg)
    second.restore(through_torch(first.state()))
    run_monitor(second, ops[k:], clock)
    assert second.state() == plain.state()
    # Every click is counted once, whatever happened to its conversions.
    assert sum(plain.view(k)["clicks"] for k in plain.stat_keys()) == plain.stats.clicks


# --- the bounded report -----------------------------------------------------------------------

def busy_monitor(n_keys: int) -> CvrMonitor:
    m = CvrMonitor(MON)
    for k in range(n_keys):
        for i in range(k + 1):  # key k has k + 1 clicks: a strict ranking
            m.add_click(f"{k}/{i}", k, T0 + i)
            m.add_pcvr(k, T0 + i, 0.1)
        m.add_conversion(f"{k}/0", T0 + 50.0)
    m.advance(T0 + 4 * HOUR)
    return m


@pytest.mark.parametrize(("n_keys", "top_n"), [(0, 5), (3, 5), (30, 5), (30, 0), (30, 30)])
def test_report_is_bounded_and_sums_up(n_keys: int, top_n: int) -> None:
    m = busy_monitor(n_keys)
    r = delay_report(build_policy("naive"), m, lambda k: f"adv{k}", top_n)
    json.dumps(r, allow_nan=False)  # strict JSON: NaN would break Prometheus and the CLI
    assert len(r["advertisers"]) == min(n_keys, top_n)
    assert [a["advertiser"] for a in r["advertisers"]] == \
        [f"adv{k}" for k in range(n_keys - 1, n_keys - 1 - min(n_keys, top_n), -1)]
    assert r["other"]["advertiser"] == OTHER and r["total"]["advertiser"] == TOTAL
    assert r["other"]["advertisers"] == n_keys - min(n_keys, top_n)
    shown = sum(a["clicks"] for a in r["advertisers"])
    assert shown + r["other"]["clicks"] == r["total"]["clicks"] == m.stats.clicks
    if n_keys:
        assert r["total"]["matured_conversions"] == n_keys
    with pytest.raises(ConfigError):
        delay_report(build_policy("naive"), m, top_n=-1)


def test_variance_view_has_no_side_effects_and_shows_the_statistic() -> None:
    p = VariancePolicy(PolicyConfig(bucket_s=HOUR, window_buckets=4))
    m = CvrMonitor(MON)
    # Key 1 reports in one burst of 12 (bursty), key 2 one report an hour (streaming).
    for i in range(12):
        p.add_click(f"b{i}", 1, T0 + i, [1])
        m.add_click(f"b{i}", 1, T0 + i)
    for i in range(4):
        p.add_click(f"s{i}", 2, T0 + i * HOUR, [1])
        p.add_conversion(f"s{i}", T0 + i * HOUR + 60.0)
    for i in range(12):
        p.add_conversion(f"b{i}", T0 + 2 * HOUR)
    p.advance(T0 + 4 * HOUR)
    before = p.state()
    assert p.key_view("never-seen")["wait_s"] == p.wait_for(p.shrunk_dispersion("never-seen"))
    r = delay_report(p, m, top_n=10)
    assert p.state() == before and "never-seen" not in p.stat_keys()
    rows = {a["advertiser"]: a for a in r["advertisers"]}
    assert rows["1"]["dispersion"] > 8.0 > 1.0 >= rows["2"]["dispersion"]
    assert rows["1"]["window_reports"] == 12 and rows["2"]["window_reports"] == 4
    assert rows["1"]["dispersion_shrunk"] == pytest.approx(p.shrunk_dispersion(1), rel=1e-5)
    assert r["pool"]["dispersion"] == pytest.approx(p._pool_dispersion, rel=1e-5)
    table = render_report(r)
    assert "pool dispersion" in table and table.count("\n") == len(r["advertisers"]) + 3


# --- through the pipeline, the checkpoint and the publisher -----------------------------------

def _events() -> list[Event]:
    from test_conversions_pipeline import FAST

    return list(parsed_events(FAST, 3000))


@pytest.fixture(scope="module")
def events() -> list[Event]:
    return _events()


@pytest.fixture(scope="module")
def spec(events: list[Event]) -> FeatureSpec:
    return FeatureSpec.infer([e for e in events if isinstance(e, Impression)])


def cfg(policy: str = "variance") -> PipelineConfig:
    from test_conversions_pipeline import config

    return replace(config(policy), monitor=MonitorConfig(mature_s=40.0, bucket_s=10.0))


def test_pipeline_report_counts_every_click_with_its_served_pcvr(
        events: list[Event], spec: FeatureSpec) -> None:
    pipe = Pipeline(spec, cfg())
    for e in events:
        pipe.process(e)
    pipe.finish()
    r = pipe.delay_report(top_n=3)
    json.dumps(r, allow_nan=False)
    assert r["policy"] == "variance" and len(r["advertisers"]) == 3
    assert r["total"]["clicks"] == pipe.cvr_policy.stats.clicks
    assert all(a["advertiser"].startswith("adv") for a in r["advertisers"])  # names, not keys
    tot = r["total"]
    assert tot["matured_clicks"] > 0.5 * tot["clicks"] and tot["matured_conversions"] > 0
    # Calibration is sum pCVR / conversions: positive and finite once something converted.
    assert 0 < tot["calibration"] < 50
    assert pipe.summary()["cvr"]["delays"]["total"]["clicks"] == tot["clicks"]


@settings(max_examples=4, deadline=None)
@given(cut=st.floats(0.1, 0.9))
def test_restart_through_a_checkpoint_file_gives_the_same_report(
        events: list[Event], spec: FeatureSpec, tmp_path_factory: pytest.TempPathFactory,
        cut: float) -> None:
    plain = Pipeline(spec, cfg())
    for e in events:
        plain.process(e)
    plain.finish()
    first = Pipeline(spec, cfg())
    k = int(cut * len(events))
    for e in events[:k]:
        first.process(e)
    d = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(d, {"spec": spec.to_dict(), "pipeline": first.state(), "offsets": {}})
    second = Pipeline(spec, cfg(), seed=123)
    loaded = load_checkpoint(d)
    assert loaded is not None
    second.restore(loaded["pipeline"])
    for e in events[k:]:
        second.process(e)
    second.finish()
    assert second.cvr_monitor.state() == plain.cvr_monitor.state()
    assert second.delay_report() == plain.delay_report()
    assert second.cvr_policy.stats == plain.cvr_policy.stats
    assert second.stats == plain.stats


def test_the_published_pcvr_record_carries_a_small_report(events: list[Event],
                                                          spec: FeatureSpec) -> None:
    registry = InMemoryRegistry()
    publisher = RegistryPublisher(registry, min_interval_s=0.0)
    pipe = Pipeline(spec, cfg(), publisher=publisher)
    for e in events[:2000]:
        pipe.process(e)
    publisher(pipe, pipe.tracker.clock)  # publish now, so the record is the current state
    rec = registry.head("pcvr").current()
    assert rec is not None and rec.version == registry.current().version  # type: ignore
    report = rec.meta["delays"]
    assert rec.meta["head"] == "pcvr" and rec.meta["delay_policy"] == "variance"
    assert len(report["advertisers"]) <= 20
    assert len(rec.to_json()) < 16_000  # bounded whatever the number of advertisers
    assert report == json.loads(json.dumps(pipe.delay_report()))
    assert report["total"]["clicks"] == pipe.cvr_monitor.stats.clicks


# --- the service's /metrics -----------------------------------------------------------------

SPEC = FeatureSpec((Field("user.id", "categorical", "user", 256),
                    Field("ad.id", "categorical", "ad", 256),
                    Field("ad.advertiser_id", "categorical", "ad", 64)))


def _publish(registry: InMemoryRegistry, report: dict[str, Any] | None) -> int:
    v = registry.next_version()
    meta: dict[str, Any] = {"head": "pcvr"}
    if report is not None:
        meta["delays"] = report
    registry.head("pcvr").publish(v, encode_snapshot(build_model("lr", SPEC), v, {}), meta)
    registry.publish(v, encode_snapshot(build_model("lr", SPEC), v, {}), {})
    return v


def _gauges(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            label = line.split('advertiser="', 1)[1].split('"', 1)[0]
            out[label] = float(line.rsplit(" ", 1)[1])
    return out


def test_metrics_export_the_served_report_per_advertiser_bounded() -> None:
    registry = InMemoryRegistry()
    app = create_app(ServiceSettings(), registry=registry, sink=RecordingSink())  # type: ignore[arg-type]
    with TestClient(app) as c:
        first = delay_report(build_policy("fixed:300"), busy_monitor(12),
                             lambda k: f"adv{k}", top_n=3)
        _publish(registry, first)
        app.state.service.reloader.check()
        text = c.get("/metrics").text
        waits = _gauges(text, "ctrloop_delay_wait_seconds")
        assert waits == {"adv11": 300.0, "adv10": 300.0, "adv9": 300.0, OTHER: 300.0,
                         TOTAL: 300.0}
        cal = _gauges(text, "ctrloop_pcvr_calibration")
        assert cal["adv11"] == pytest.approx(first["advertisers"][0]["calibration"])
        assert _gauges(text, "ctrloop_cvr_history")["adv9"] == pytest.approx(1 / 10)
        assert _gauges(text, "ctrloop_delay_dispersion") == {}  # fixed: no statistic, no NaN
        # A new version with other advertisers replaces the labels instead of adding to them.
        m = busy_monitor(2)
        _publish(registry, delay_report(build_policy("fixed:60"), m, lambda k: f"new{k}", 3))
        app.state.service.reloader.check()
        waits = _gauges(c.get("/metrics").text, "ctrloop_delay_wait_seconds")
        # Nobody outside the top 3: `_other` has no wait to show.
        assert waits == {"new1": 60.0, "new0": 60.0, TOTAL: 60.0}
        # A version without a report clears them.
        _publish(registry, None)
        app.state.service.reloader.check()
        assert "ctrloop_delay_wait_seconds{" not in c.get("/metrics").text


# --- the CLI ----------------------------------------------------------------------------------

def test_cli_reads_the_trainer_checkpoint(events: list[Event], spec: FeatureSpec,
                                          tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    pipe = Pipeline(spec, cfg())
    for e in events:
        pipe.process(e)
    save_checkpoint(tmp_path, {"spec": spec.to_dict(), "pipeline": pipe.state(),
                               "offsets": {}})
    assert main(["delay-report", "--checkpoint-dir", str(tmp_path), "--json", "--top",
                 "4"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r == json.loads(json.dumps(pipe.delay_report(top_n=4)))
    assert main(["delay-report", "--checkpoint-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert table.startswith("delay policy variance") and OTHER in table
    assert r["advertisers"][0]["advertiser"] in table


def test_cli_reads_the_registry(monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    from ctrloop.io.registry import RedisRegistry

    registry = InMemoryRegistry()
    monkeypatch.setattr(RedisRegistry, "from_url", classmethod(lambda cls, *a: registry))
    assert main(["delay-report", "--redis-url", "redis://x"]) == 2
    assert "no pCVR model" in capsys.readouterr().err
    _publish(registry, delay_report(build_policy("naive"), busy_monitor(6), top_n=5))
    assert main(["delay-report", "--redis-url", "redis://x", "--json", "--top", "2"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert len(r["advertisers"]) == 2 and r["version"] == 1


@pytest.mark.parametrize("argv", [["delay-report"],
                                  ["delay-report", "--checkpoint-dir", "x", "--redis-url", "y"]])
def test_cli_needs_exactly_one_source(argv: list[str],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "one source" in capsys.readouterr().err


def test_cli_without_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["delay-report", "--checkpoint-dir", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
