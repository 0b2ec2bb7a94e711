"""Dimensional collapse watched like latency: the trainer puts each head's IA per field in what it
publishes, and the service exports it on /metrics (ctrloop/core/analysis.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from fastapi.testclient import TestClient
from service_fakes import RecordingSink

from ctrloop.core.analysis import collapse_report, compact
from ctrloop.core.errors import ConfigError
from ctrloop.core.events import Event, Impression
from ctrloop.core.features import FeatureSpec
from ctrloop.core.learner import LearnerConfig
from ctrloop.core.snapshot import build_from_snapshot, decode_snapshot
from ctrloop.io.registry import InMemoryRegistry
from ctrloop.service.app import create_app
from ctrloop.service.settings import ServiceSettings
from ctrloop.sim import WorldConfig, parsed_events
from ctrloop.trainer.pipeline import Pipeline, PipelineConfig
from ctrloop.trainer.streaming import RegistryPublisher

WORLD = WorldConfig(seed=5, impressions_per_second=20.0, base_ctr=0.2)


@pytest.fixture(scope="module")
def events() -> list[Event]:
    return list(parsed_events(WORLD, 2000))


@pytest.fixture(scope="module")
def spec(events: list[Event]) -> FeatureSpec:
    inferred = FeatureSpec.infer([e for e in events if isinstance(e, Impression)])
    # Small tables: each publication encodes the whole model (the ids' 2^18 rows are slow).
    return FeatureSpec(tuple(replace(f, buckets=min(f.buckets, 1024)) for f in inferred.fields))


def config(**kw: object) -> PipelineConfig:
    return PipelineConfig(publish_interval=5.0, allowed_lateness=3.0,
                          learner=LearnerConfig(batch_size=64, hparams={"dim": 4}),
                          **kw)  # type: ignore[arg-type]


def _trained(events: list[Event], spec: FeatureSpec, registry: InMemoryRegistry,
             cfg: PipelineConfig) -> Pipeline:
    pipe = Pipeline(spec, cfg, publisher=RegistryPublisher(registry, min_interval_s=0.0))
    for e in events:
        pipe.process(e)
    pipe.finish()
    return pipe


def test_published_snapshots_and_records_carry_ia_per_field(events: list[Event],
                                                            spec: FeatureSpec) -> None:
    registry = InMemoryRegistry()
    pipe = _trained(events, spec, registry, config(collapse_every=1))
    record = registry.current()
    assert record is not None and pipe.stats.publications > 3
    entry = record.meta["collapse"]
    # The last publication computed it (every 1), from the weights it published.
    assert entry["publication"] == pipe.stats.publications - 1
    snap = decode_snapshot(registry.fetch(record.version))
    assert snap.meta["collapse"] == entry
    served = build_from_snapshot(snap, inference=True)
    assert entry["tables"] == compact(collapse_report(served, entry["max_rows"]))
    fields = entry["tables"]["table"]
    assert set(fields) == set(spec.names)
    assert fields["user.id"]["rows"] > 100 and 1.0 <= fields["user.id"]["ia"] <= 4.0
    cvr = registry.head("pcvr").current()
    assert cvr is not None and set(cvr.meta["collapse"]["tables"]["table"]) == set(spec.names)
    assert entry["seconds"] < 1.0


def test_collapse_every_n_publications_and_off(events: list[Event], spec: FeatureSpec) -> None:
    registry = InMemoryRegistry()
    pipe = _trained(events, spec, registry, config(collapse_every=4))
    record = registry.current()
    assert record is not None
    n = pipe.stats.publications
    assert record.meta["collapse"]["publication"] == (n - 1) // 4 * 4
    assert PipelineConfig().collapse_every == 10  # the default: cheap amortised
    off = InMemoryRegistry()
    _trained(events, spec, off, config(collapse_every=0))
    rec = off.current()
    assert rec is not None and "collapse" not in rec.meta
    assert "collapse" not in decode_snapshot(off.fetch(rec.version)).meta
    with pytest.raises(ConfigError):
        config(collapse_every=-1)
    with pytest.raises(ConfigError):
        replace(config(), collapse_max_rows=0)


def _ia_gauges(text: str) -> dict[tuple[str, str, str], float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("ctrloop_model_information_abundance{"):
            labels = dict(part.split("=", 1) for part in
                          line[line.index("{") + 1:line.index("}")].split(","))
            key = tuple(labels[k].strip('"') for k in ("head", "table", "field"))
            out[key] = float(line.rsplit(" ", 1)[1])
    return out


def test_service_exports_the_served_models_ia_on_metrics(events: list[Event],
                                                         spec: FeatureSpec) -> None:
    registry = InMemoryRegistry()
    app = create_app(ServiceSettings(), registry=registry, sink=RecordingSink())  # type: ignore[arg-type]
    with TestClient(app) as c:
        assert "ctrloop_model_information_abundance{" not in c.get("/metrics").text
        _trained(events, spec, registry, config())
        assert app.state.service.reloader.check()
        text = c.get("/metrics").text
        gauges = _ia_gauges(text)
        record = registry.current()
        assert record is not None
        tables = record.meta["collapse"]["tables"]
        for name, v in tables["table"].items():
            assert gauges[("pctr", "table", name)] == pytest.approx(v["ia"])
        assert ("pcvr", "table", "user.id") in gauges
        assert 'ctrloop_model_embedding_rows_trained{field="user.id",head="pctr"' in text


def test_a_malformed_collapse_entry_does_not_break_the_scrape() -> None:
    from ctrloop.service.metrics import CollapseGauges

    g = CollapseGauges()
    g.update({"pctr": {"tables": {"table": {"a": {"ia": 2.0, "rows": 5}, "b": {"ia": "x"},
                                            "c": None}, "t2": 7}}, "pcvr": None})
    families = list(g.collect())
    assert [s.labels["field"] for s in families[0].samples] == ["a"]
