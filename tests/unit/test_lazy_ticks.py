"""Lazy ticks (issue 13 A): scoring deferred until the weights change writes byte-identical
predictions and summaries to today's per-tick pipeline (tests/unit/reference_pipeline.py), on a
dense and a sparse stream, for several configurations; and the learning cadence."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from reference_pipeline import Pipeline as ReferencePipeline

from ctrloop.core.errors import ConfigError
from ctrloop.core.features import FeatureSpec
from ctrloop.core.joining import JoinerConfig
from ctrloop.core.learner import LearnerConfig, OnlineLearner
from ctrloop.core.models import build_model
from ctrloop.core.posterior import LogitPosterior, PosteriorConfig
from ctrloop.sim import WorldConfig, write_files
from ctrloop.trainer.pipeline import Pipeline, PipelineConfig
from ctrloop.trainer.replay import PredictionWriter, infer_spec, read_events

N = 2500
BASE = dict(publish_interval=1.0, allowed_lateness=5.0, joiner=JoinerConfig(click_window=20.0))
CONFIGS: dict[str, PipelineConfig] = {
    "fwfm": PipelineConfig(**BASE, learner=LearnerConfig(batch_size=128, hparams={"dim": 4})),
    "lr-no-posterior": PipelineConfig(**BASE, learner=LearnerConfig(model="lr", batch_size=64),
                                      posterior=None),
    "types-fixed": PipelineConfig(**BASE, learner=LearnerConfig(hparams={"dim": 4}),
                                  conversion_types=("signup", "purchase"),
                                  delay_policy="fixed:600"),
}


@pytest.fixture(scope="module")
def streams(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A dense stream (300 impressions per event second) and a sparse one (one every two
    seconds: a tick per impression or two), of the funnel world (two conversion types)."""
    d = tmp_path_factory.mktemp("lazy")
    out = {}
    for name, rate in (("dense", 300.0), ("sparse", 0.5)):
        out[name] = d / f"{name}.jsonl"
        write_files(WorldConfig(seed=4, impressions_per_second=rate, conversion_mix="funnel"),
                    N, out[name], d / f"{name}.truth.jsonl")
    return out


def run(cls: type, events: Path, spec: FeatureSpec, config: PipelineConfig
        ) -> tuple[bytes, str]:
    """What replay writes (predictions) and the pipeline's summary, with pipeline class `cls`."""
    torch.set_num_threads(1)
    f = io.BytesIO()
    writer = PredictionWriter(f, config.conversion_types)
    pipe = cls(spec, config, served=writer, seed=0, served_cvr=writer.pcvr,
               served_var=writer.pctr_var)
    for event in read_events(events):
        pipe.process(event)
    pipe.finish()
    return f.getvalue(), json.dumps(pipe.summary(), sort_keys=True, default=str)


@pytest.mark.parametrize("stream", ["dense", "sparse"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_lazy_pipeline_is_byte_identical_to_per_tick(streams: dict[str, Path], stream: str,
                                                     name: str) -> None:
    events = streams[stream]
    spec = infer_spec(events)
    preds, summary = run(Pipeline, events, spec, CONFIGS[name])
    ref_preds, ref_summary = run(ReferencePipeline, events, spec, CONFIGS[name])
    assert preds.count(b"\n") == N
    assert preds == ref_preds
    assert summary == ref_summary


def parts(n: int, rng: np.random.Generator) -> Iterator[int]:
    while n > 0:
        k = int(min(n, rng.choice([1, 2, 3, 7, 8, 15, 16, 17, 100, 1000])))
        yield k
        n -= k


@pytest.mark.parametrize("model,hparams", [("fwfm", {"dim": 16}), ("fwfm", {"dim": 3}),
                                           ("lr", {}), ("stem", {"tasks": ["a", "b"]})])
def test_predict_parts_is_predict_of_each_part_byte_for_byte(
        streams: dict[str, Path], model: str, hparams: dict[str, Any]) -> None:
    """What lazy scoring rests on: one forward over many ticks' impressions gives each row the
    bytes that a forward over its own tick's impressions gave."""
    torch.set_num_threads(1)
    spec = infer_spec(streams["dense"])
    torch.manual_seed(1)
    m = build_model(model, spec, **hparams)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # away from the initial, nearly equal logits
    learner = OnlineLearner(m, LearnerConfig(model=model))
    rng = np.random.default_rng(0)
    offsets = np.cumsum([0, *[f.buckets for f in spec.fields][:-1]])
    rows = np.stack([rng.integers(0, f.buckets, 4000) for f in spec.fields], 1) + offsets
    sizes = list(parts(len(rows), rng))
    got = learner.predict_parts(rows, sizes)
    start = 0
    for n, g in zip(sizes, got, strict=True):
        want = learner.predict(rows[start:start + n])
        assert g.shape == want.shape and g.dtype == want.dtype
        assert g.tobytes() == want.tobytes()
        start += n
    posterior = LogitPosterior(spec, PosteriorConfig())
    posterior.update(torch.from_numpy(rows[:500]), torch.full((500,), 0.1), None)
    whole = posterior.row_variance(torch.from_numpy(rows)).numpy()
    start = 0
    for n in sizes:
        part = posterior.row_variance(torch.from_numpy(rows[start:start + n])).numpy()
        assert part.tobytes() == whole[start:start + n].tobytes()
        start += n


def test_learning_cadence_learns_everything_in_fewer_steps(streams: dict[str, Path]) -> None:
    events = streams["sparse"]
    spec = infer_spec(events)
    exact = CONFIGS["fwfm"]
    lazy = PipelineConfig(**{**exact.__dict__, "min_learn_samples": 32, "max_learn_wait": 300.0})
    _, s1 = run(Pipeline, events, spec, exact)
    preds, s2 = run(Pipeline, events, spec, lazy)
    a, b = json.loads(s1)["pipeline"], json.loads(s2)["pipeline"]
    # The same samples, learned exactly once each; far fewer publications (= learn steps).
    for key in ("learned", "learned_positives", "learned_digest", "cvr_learned", "cvr_digest"):
        assert a[key] == b[key]
    assert b["publications"] < a["publications"] / 5
    assert preds.count(b"\n") == N


def test_learning_cadence_waits_at_most_max_learn_wait() -> None:
    config = PipelineConfig(min_learn_samples=100, max_learn_wait=10.0)
    pipe = Pipeline(FeatureSpec.infer([]), config)
    head = pipe.ctr
    head.ready = [None] * 3  # type: ignore[list-item]
    assert not pipe._learn_due(head, 100.0)
    head.ready *= 2
    assert not pipe._learn_due(head, 109.0)
    assert pipe._learn_due(head, 110.0)
    assert pipe._waiting_since[head.name] is None
    head.ready *= 20
    assert pipe._learn_due(head, 111.0)
    head.ready = []
    assert not pipe._learn_due(head, 112.0) and pipe._waiting_since[head.name] is None


def test_learning_cadence_is_validated() -> None:
    with pytest.raises(ConfigError):
        PipelineConfig(min_learn_samples=0)
    with pytest.raises(ConfigError):
        PipelineConfig(max_learn_wait=-1.0)


@pytest.mark.parametrize("name", ["fwfm", "types-fixed"])
def test_checkpoint_of_the_per_tick_pipeline_restores_into_heads(
        streams: dict[str, Path], name: str) -> None:
    """A checkpoint written before heads (the reference's keys) goes on exactly as an
    uninterrupted run of the reference."""
    torch.set_num_threads(1)
    events = list(read_events(streams["dense"]))
    spec, config = infer_spec(streams["dense"]), CONFIGS[name]
    whole = ReferencePipeline(spec, config)
    for e in events:
        whole.process(e)
    whole.finish()
    first = ReferencePipeline(spec, config)
    half = len(events) // 2
    for e in events[:half]:
        first.process(e)
    state = first.state()
    second = Pipeline(spec, config)
    second.restore(state)
    for e in events[half:]:
        second.process(e)
    second.finish()
    assert (json.dumps(second.summary(), sort_keys=True, default=str)
            == json.dumps(whole.summary(), sort_keys=True, default=str))


def test_checkpoint_mid_cadence_goes_on_exactly(streams: dict[str, Path]) -> None:
    """Samples waiting for the cadence, and since when, survive a checkpoint (kill -9 exact)."""
    torch.set_num_threads(1)
    events = list(read_events(streams["sparse"]))
    spec = infer_spec(streams["sparse"])
    config = PipelineConfig(**{**CONFIGS["fwfm"].__dict__, "min_learn_samples": 16,
                               "max_learn_wait": 100.0})
    whole = Pipeline(spec, config)
    for e in events:
        whole.process(e)
    whole.finish()
    first = Pipeline(spec, config)
    half = len(events) // 2
    for e in events[:half]:
        first.process(e)
    state = first.state()
    assert first.ctr.waiting() and state["waiting_since"]["pctr"] is not None
    second = Pipeline(spec, config)
    second.restore(state)
    # Replay's CountingPublisher is no part of a checkpoint (the registry counts in streaming).
    second.publisher.version = int(state["model_version"])  # type: ignore[attr-defined]
    for e in events[half:]:
        second.process(e)
    second.finish()
    assert (json.dumps(second.summary(), sort_keys=True, default=str)
            == json.dumps(whole.summary(), sort_keys=True, default=str))
