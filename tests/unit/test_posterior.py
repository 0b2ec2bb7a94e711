"""The GP posterior over the pCTR logit: narrows with data, wide for new rows, forgets, survives
checkpoints and snapshots exactly, and is what the trainer publishes and replay writes."""

from __future__ import annotations

import io
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ctrloop.core.errors import ConfigError, SnapshotError
from ctrloop.core.events import Event, Impression, parse_event
from ctrloop.core.features import FeatureSpec, Field
from ctrloop.core.joining import JoinerConfig
from ctrloop.core.learner import LearnerConfig, OnlineLearner
from ctrloop.core.models import build_model
from ctrloop.core.posterior import LogitPosterior, PosteriorConfig
from ctrloop.core.snapshot import build_from_snapshot, decode_snapshot, encode_snapshot
from ctrloop.io.registry import InMemoryRegistry
from ctrloop.sim import WorldConfig, generate, parsed_events, write_files
from ctrloop.trainer.pipeline import Pipeline, PipelineConfig
from ctrloop.trainer.replay import outputs_for, replay
from ctrloop.trainer.streaming import RegistryPublisher

SPEC = FeatureSpec((
    Field("user.segment", "categorical", "user", 8),
    Field("ad.id", "categorical", "ad", 16),
))
CFG = PosteriorConfig(prior_var=2.0, field_prior_var={"ad.id": 0.5}, scale=1.5,
                      half_life_s=100.0)


def rows(*pairs: tuple[int, int]) -> torch.Tensor:
    """Global rows from (segment bucket, ad bucket) pairs."""
    off = SPEC.offsets
    return torch.tensor([[off[0] + a, off[1] + b] for a, b in pairs])


def test_untouched_rows_keep_the_prior_times_the_scale() -> None:
    post = LogitPosterior(SPEC, CFG)
    x = rows((1, 1), (2, 5))
    assert torch.equal(post.row_variance(x), torch.tensor([[3.0, 0.75], [3.0, 0.75]]))
    assert post.row_variance(x).dtype == torch.float32
    assert torch.equal(post.variance(x), post.row_variance(x).sum(1))


def test_variance_table_gives_row_variance_exactly_for_every_row() -> None:
    # The service gathers from this table instead of calling row_variance per request.
    post = LogitPosterior(SPEC, CFG)
    g = torch.Generator().manual_seed(3)
    x = rows(*((int(a), int(b)) for a, b in zip(torch.randint(0, 8, (200,), generator=g),
                                                  torch.randint(0, 16, (200,), generator=g),
                                                  strict=True)))
    post.advance(0.0)
    post.update(x, torch.rand(200, generator=g))
    post.advance(37.0)  # a faded posterior (decay != 1) too
    for _ in range(2):
        every = torch.stack([torch.arange(SPEC.offsets[0], SPEC.offsets[1]),
                             torch.arange(SPEC.offsets[1], SPEC.offsets[1] + 8)], 1)
        assert torch.equal(post.variance_table()[every], post.row_variance(every))
        assert torch.equal(post.variance_table()[x], post.row_variance(x))
        post.advance(1e9)  # renormalized


def test_variance_falls_as_samples_touch_a_row_and_only_that_row() -> None:
    post = LogitPosterior(SPEC, CFG)
    seen, new = rows((1, 3)), rows((2, 4))
    before = post.row_variance(torch.cat([seen, new]))
    history = []
    for _ in range(5):
        post.update(seen.repeat(10, 1), torch.full((10,), 0.2))
        history.append(float(post.variance(seen)[0]))
    assert all(a > b for a, b in itertools.pairwise(history))
    after = post.row_variance(torch.cat([seen, new]))
    # 50 samples of curvature 0.2 * 0.8 on each of the seen rows: precision 1/s^2 + 8.
    expected = torch.tensor([1.5 / (0.5 + 8.0), 1.5 / (2.0 + 8.0)])
    assert torch.allclose(after[0], expected)
    assert torch.equal(after[1], before[1])  # the new ad and segment: still the prior


def test_curvature_is_largest_at_even_odds_and_weights_scale_it() -> None:
    a, b, c = (LogitPosterior(SPEC, CFG) for _ in range(3))
    x = rows((1, 1))
    a.update(x, torch.tensor([0.5]))
    b.update(x, torch.tensor([0.01]))
    c.update(x, torch.tensor([0.5]), torch.tensor([3.0]))
    assert a.variance(x) < b.variance(x)
    assert torch.allclose(c.evidence(x), 3 * a.evidence(x))


def test_a_retraction_takes_evidence_back_but_never_below_the_prior() -> None:
    post = LogitPosterior(SPEC, CFG)
    x = rows((1, 1))
    prior = post.row_variance(x)
    post.update(x, torch.tensor([0.5]))
    post.update(x, torch.tensor([0.5]), torch.tensor([-1.0]))
    assert torch.equal(post.row_variance(x), prior)
    post.update(x, torch.tensor([0.5]), torch.tensor([-5.0]))
    assert torch.equal(post.row_variance(x), prior)


def test_evidence_halves_every_half_life_of_event_time() -> None:
    post = LogitPosterior(SPEC, CFG)
    x = rows((1, 1))
    post.advance(1000.0)
    post.update(x, torch.tensor([0.5]), torch.tensor([40.0]))  # evidence 10
    post.advance(1100.0)
    assert torch.allclose(post.evidence(x), torch.tensor([[5.0, 5.0]]))
    post.advance(1050.0)  # time never goes back
    post.advance(math.inf)
    assert torch.allclose(post.evidence(x), torch.tensor([[5.0, 5.0]]))
    post.advance(1300.0)
    assert torch.allclose(post.evidence(x), torch.tensor([[1.25, 1.25]]))
    # Long enough that the stored evidence is folded back: same values, no overflow.
    post.update(x, torch.tensor([0.5]), torch.tensor([4.0]))
    post.advance(1300.0 + 100 * 45)
    expected = (1.25 + 1.0) * 2.0 ** -45
    assert torch.allclose(post.evidence(x), torch.tensor([[expected, expected]]), rtol=1e-5)
    post.advance(1300.0 + 100 * 5000)
    assert torch.equal(post.row_variance(x), LogitPosterior(SPEC, CFG).row_variance(x))


def test_without_a_half_life_nothing_is_forgotten() -> None:
    post = LogitPosterior(SPEC, PosteriorConfig(half_life_s=math.inf))
    x = rows((1, 1))
    post.advance(0.0)
    post.update(x, torch.tensor([0.5]))
    post.advance(1e9)
    assert torch.equal(post.evidence(x), torch.tensor([[0.25, 0.25]]))


@pytest.mark.parametrize("kwargs", [{"prior_var": 0.0}, {"field_prior_var": {"ad.id": -1.0}},
                                    {"scale": math.nan}, {"half_life_s": 0.0}])
def test_bad_configs_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        PosteriorConfig(**kwargs)


def test_state_round_trip_continues_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)

    def feed(post: LogitPosterior, t0: float) -> None:
        for k in range(20):
            post.advance(t0 + 37.0 * k)
            x = torch.stack([torch.randint(0, 8, (64,), generator=g),
                             torch.randint(8, 24, (64,), generator=g)], 1)
            post.update(x, torch.rand(64, generator=g))

    a = LogitPosterior(SPEC, CFG)
    feed(a, 0.0)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = LogitPosterior(SPEC, CFG)
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    state = g.get_state()
    feed(a, 5000.0)
    g.set_state(state)
    feed(b, 5000.0)
    everything = torch.arange(SPEC.total_buckets).reshape(-1, 1).expand(-1, 2)
    assert torch.equal(a.row_variance(everything), b.row_variance(everything))
    with pytest.raises(ConfigError):
        LogitPosterior(SPEC, CFG).load_state_dict({"evidence": torch.zeros(3), "decay": 1.0,
                                                   "clock": 0.0})


# --- snapshots ------------------------------------------------------------------------------

def trained_with_posterior() -> tuple[Any, LogitPosterior]:
    torch.manual_seed(0)
    model = build_model("fwfm", SPEC, dim=4)
    post = LogitPosterior(SPEC, CFG)
    learner = OnlineLearner(model, LearnerConfig(hparams={"dim": 4}, batch_size=32), post)
    rng = np.random.default_rng(0)
    idx = np.stack([rng.integers(0, 8, 500), 8 + rng.integers(0, 10, 500)], 1)
    post.advance(10.0)
    learner.learn(idx, (rng.random(500) < 0.3).astype(np.float32))
    post.advance(70.0)  # fade, so the snapshot must fold the decay into what it stores
    return model.eval(), post


@pytest.mark.parametrize("inference", [False, True])
def test_snapshot_round_trip_preserves_every_variance_exactly(inference: bool) -> None:
    model, post = trained_with_posterior()
    snap = decode_snapshot(encode_snapshot(model, 3))
    served = build_from_snapshot(snap, inference=inference)
    assert served.posterior is not None
    everything = torch.arange(SPEC.total_buckets).reshape(-1, 1).expand(-1, 2)
    assert torch.equal(served.posterior.row_variance(everything), post.row_variance(everything))
    assert served.posterior.scale == post.scale
    assert set(snap.tensors) == set(model.state_dict())  # the posterior is not a weight
    # Wide where nothing was learned (ad buckets 10..15), narrow where much was.
    var = served.posterior.row_variance(everything)[:, 1]
    assert var[SPEC.offsets[1] + 12] == pytest.approx(1.5 * 0.5)
    assert var[SPEC.offsets[1] + 2] < 0.8 * var[SPEC.offsets[1] + 12]


def test_snapshot_grows_by_one_float_per_row() -> None:
    model, _ = trained_with_posterior()
    with_post = len(encode_snapshot(model, 3))
    model.posterior = None
    without = len(encode_snapshot(model, 3))
    assert 4 * SPEC.total_buckets <= with_post - without <= 4 * SPEC.total_buckets + 400


def test_a_snapshot_without_a_posterior_still_loads() -> None:
    model, _ = trained_with_posterior()
    model.posterior = None
    for inference in (False, True):
        served = build_from_snapshot(decode_snapshot(encode_snapshot(model, 1)), inference)
        assert served.posterior is None


def _edited(model: Any, edit: Any) -> bytes:
    data = encode_snapshot(model, 3)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(json.loads(data[8:8 + n])["__metadata__"]["ctrloop"])
    tensors = st_load(data)
    edit(header, tensors)
    return st_save(tensors, metadata={"ctrloop": json.dumps(header)})


@pytest.mark.parametrize("name,edit", [
    ("negative", lambda h, t: t["posterior.evidence"].__setitem__(0, -1.0)),
    ("nan", lambda h, t: t["posterior.evidence"].__setitem__(0, math.nan)),
    ("short", lambda h, t: t.__setitem__("posterior.evidence", t["posterior.evidence"][:-1])),
    ("float64", lambda h, t: t.__setitem__("posterior.evidence",
                                           t["posterior.evidence"].double())),
    ("prior count", lambda h, t: h["posterior"].__setitem__("prior_var", [1.0])),
    ("prior sign", lambda h, t: h["posterior"].__setitem__("prior_var", [1.0, -1.0])),
    ("no header", lambda h, t: h.pop("posterior")),
    ("no tensor", lambda h, t: t.pop("posterior.evidence")),
    ("not an object", lambda h, t: h.__setitem__("posterior", "wide")),
])
def test_a_malformed_posterior_is_refused(name: str, edit: Any) -> None:
    model, _ = trained_with_posterior()
    with pytest.raises(SnapshotError):
        decode_snapshot(_edited(model, edit))


# --- the learner, the pipeline, the publisher, replay ---------------------------------------

def test_the_learner_adds_the_curvature_of_its_pre_update_predictions() -> None:
    torch.manual_seed(0)
    model = build_model("fwfm", SPEC, dim=4)
    post = LogitPosterior(SPEC, CFG)
    learner = OnlineLearner(model, LearnerConfig(hparams={"dim": 4}, batch_size=8), post)
    assert model.posterior is post
    idx = np.asarray([[1, 9]] * 8 + [[2, 10]] * 8)
    weights = np.asarray([1.0] * 8 + [2.0] * 8, dtype=np.float32)
    preds = learner.learn(idx, np.zeros(16, dtype=np.float32), weights).astype(np.float64)
    h = preds * (1 - preds) * weights
    ev = post.evidence(torch.tensor([[1, 9], [2, 10]]))
    assert ev[0, 0] == pytest.approx(h[:8].sum(), rel=1e-5)
    assert ev[1, 1] == pytest.approx(h[8:].sum(), rel=1e-5)


@pytest.fixture(scope="module")
def events() -> list[Event]:
    return list(parsed_events(WorldConfig(impressions_per_second=30, seed=4, base_ctr=0.1),
                              1500))


@pytest.fixture(scope="module")
def spec(events: list[Event]) -> FeatureSpec:
    return FeatureSpec.infer([e for e in events if isinstance(e, Impression)])


PIPE = PipelineConfig(publish_interval=1.0, allowed_lateness=3.0,
                      joiner=JoinerConfig(click_window=10.0),
                      learner=LearnerConfig(batch_size=64, hparams={"dim": 4}),
                      posterior=PosteriorConfig(prior_var=1.0, field_prior_var={}, scale=1.0))


class VarSink:
    def __init__(self) -> None:
        self.rows: list[tuple[str, np.ndarray]] = []

    def __call__(self, ids: list[str], row_var: np.ndarray, version: str) -> None:
        assert row_var.dtype == np.float32 and row_var.ndim == 2
        self.rows.extend(zip(ids, row_var, strict=True))


def test_the_pipeline_publishes_its_posterior_and_the_pcvr_head_none(
        events: list[Event], spec: FeatureSpec) -> None:
    registry = InMemoryRegistry()
    pipe = Pipeline(spec, PIPE, publisher=RegistryPublisher(registry, 0.0))
    for e in events:
        pipe.process(e)
    pipe.finish()
    post = pipe.learner.posterior
    assert post is not None and pipe.cvr_learner.posterior is None
    rec = registry.current()
    assert rec is not None
    served = build_from_snapshot(decode_snapshot(registry.fetch(rec.version)), inference=True)
    assert served.posterior is not None
    rows_ = torch.from_numpy(pipe.encoder.encode_many(
        [e for e in events if isinstance(e, Impression)][:200]))
    assert torch.equal(served.posterior.variance(rows_), post.variance(rows_))
    head = decode_snapshot(registry.head("pcvr").fetch(rec.version))
    assert build_from_snapshot(head).posterior is None


def test_new_ads_are_served_wide_and_known_ads_narrow() -> None:
    # A small pool with fast churn: ads get seen often, and new ones keep arriving.
    world = WorldConfig(impressions_per_second=30, seed=4, base_ctr=0.1, ad_pool_size=30,
                        ad_churn_per_hour=40.0)
    events = [parse_event(d, "impression" if t is not None else
                          "conversion" if "conversion_type" in d else "click")
              for d, t in generate(world, 1500)]
    spec = FeatureSpec.infer([e for e in events if isinstance(e, Impression)])
    sink = VarSink()
    pipe = Pipeline(spec, PIPE, served=lambda *a: None, served_var=sink)
    ad_of = {}
    for e in events:
        pipe.process(e)
        if isinstance(e, Impression):
            ad_of[e.impression_id] = e.ad_id
    pipe.finish()
    ad_col = spec.names.index("ad.id")
    prior = pipe.learner.posterior.row_variance(  # type: ignore[union-attr]
        torch.zeros(1, spec.num_fields, dtype=torch.long) + torch.tensor(spec.offsets)
    )[0, ad_col].item()
    seen: dict[str, int] = {}
    first, later = [], []
    for iid, var in sink.rows:
        n = seen.get(ad_of[iid], 0)
        (first if n == 0 else later if n >= 30 else []).append(float(var[ad_col]))
        seen[ad_of[iid]] = n + 1
    assert len(first) > 30 and later  # the initial ads and new ones
    # An ad's first impression is served before anything learned its id row: the prior.
    assert all(v == pytest.approx(prior) for v in first)
    assert np.mean(later) < 0.8 * prior


def test_checkpoint_restore_continues_the_posterior_exactly(events: list[Event],
                                                            spec: FeatureSpec) -> None:
    def fresh() -> Pipeline:
        return Pipeline(spec, PIPE)

    plain = fresh()
    for e in events:
        plain.process(e)
    plain.finish()
    half = fresh()
    split = len(events) // 2
    for e in events[:split]:
        half.process(e)
    buf = io.BytesIO()
    torch.save(half.state(), buf)
    restored = fresh()
    restored.restore(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    for e in events[split:]:
        restored.process(e)
    restored.finish()
    a, b = plain.learner.posterior, restored.learner.posterior
    assert a is not None and b is not None
    everything = torch.arange(spec.total_buckets).reshape(-1, 1).expand(-1, spec.num_fields)
    assert torch.equal(a.row_variance(everything), b.row_variance(everything))
    assert a.clock == b.clock


def test_a_pipeline_without_a_posterior_serves_no_variance(events: list[Event],
                                                           spec: FeatureSpec) -> None:
    sink = VarSink()
    cfg = PipelineConfig(publish_interval=1.0, allowed_lateness=3.0, posterior=None,
                         joiner=PIPE.joiner, learner=PIPE.learner)
    pipe = Pipeline(spec, cfg, served=lambda *a: None, served_var=sink)
    for e in events[:400]:
        pipe.process(e)
    pipe.finish()
    assert pipe.learner.posterior is None and pipe.learner.model.posterior is None
    assert sink.rows == []


def test_replay_writes_the_logit_std_of_the_served_posterior(tmp_path: Path) -> None:
    write_files(WorldConfig(impressions_per_second=40, seed=6), 2000, tmp_path / "ev.jsonl",
                tmp_path / "truth.jsonl")
    out = outputs_for(tmp_path / "pred.jsonl")
    replay(tmp_path / "ev.jsonl", out, config=PIPE)
    preds = [orjson.loads(x) for x in out.predictions.read_bytes().splitlines()]
    spec = FeatureSpec.load(out.spec)
    prior_std = math.sqrt(sum(LogitPosterior(spec, PIPE.posterior).row_variance(
        torch.tensor([spec.offsets]))[0].tolist()))
    assert all(p["pctr_std"] > 0 for p in preds)
    first = [p["pctr_std"] for p in preds if p["model_version"] == "0"]
    assert first and all(s == pytest.approx(prior_std, rel=1e-6) for s in first)
    assert preds[-1]["pctr_std"] < prior_std  # learned rows have narrowed
