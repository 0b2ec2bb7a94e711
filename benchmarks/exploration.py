"""Bandit live loop on the simulator: which exploration policy loses the fewest clicks (issue 5).

A simulated loop with a steady arrival of new ads, the same seed and traffic for every policy:
each request's candidates come from the simulator world (`World.sample_batch`, as the live
driver gets them), the policy picks the one shown ad (one slot per request, so regret and
propensities are exact), the click is drawn from the world's true CTR with a uniform that
belongs to the request (common random numbers: the same request clicks the same ad the same
way under every policy), and its delay from the world's click-delay model.

The ctrloop policies all learn through the same trainer code path: impressions and clicks go,
in event-time order, into `ctrloop.trainer.pipeline.Pipeline`; every `publish_interval`
event-seconds the pipeline publishes, the snapshot is encoded, decoded and rebuilt exactly as
the service loads it (`ctrloop.core.snapshot`), and the policy scores the next interval's
requests with that
snapshot only — batched Thompson sampling (Mao et al.), as in the method notes:

- `greedy`: the posterior mean (the model's logit), argmax;
- `eps-E`: greedy, but with probability E the request gets a uniformly random candidate;
- `ts`: Thompson sampling with the GP posterior published with the snapshot
  (`model.posterior`, ctrloop/core/posterior.py) and the service's sampler
  (ctrloop/core/exploration.py);
- `vw:ARGS`: Vowpal Wabbit `--cb_explore_adf ARGS` on the same features (shared user/context
  namespaces, one action line per candidate with the ad's features and ids, user × ad and
  context × ad interactions), cost 1 − click. VW is its own learner: it learns each request
  when its label is known (a click at click time; no click when the click window and the
  trainer's allowed lateness have passed, as ctrloop's joiner releases negatives) and predicts
  with its latest weights — per request, not per snapshot, an advantage over ctrloop.

Regret is the pseudo-regret against the oracle: per request, the best candidate's true CTR
minus the true CTR of the one shown (no Bernoulli noise). New ads are ads created after the
start; "first day" counts their impressions and clicks while younger than 24 h.

    python -m benchmarks.exploration [--hours 1] [--rate 20] [--policies greedy,eps-0.05,...]
        [--out runs/exploration] [--svg docs/img/exploration_regret.svg]

Issue 11: `--seeds 1,2,3` runs every policy on each seed and prints regret per 1k requests and
every TS policy's ratio to every other with a 95% t-interval across seeds (`--summarize DIR...`
merges such runs); `--cohort-prior` serves never-trained ad rows their cohort's mean
(docs/exploration.md "Unseen rows"); `--ad-quality-sd` and `--candidates` shape the world
(strong incumbents: a wide per-ad spread). Tuning seed 0; held-out seeds 1-6 (docs/exploration.md).
"""

from __future__ import annotations

import argparse
import heapq
import html
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from ctrloop.core.events import Click, Impression
from ctrloop.core.features import FeatureEncoder, FeatureSpec
from ctrloop.core.joining import JoinerConfig
from ctrloop.core.learner import LearnerConfig
from ctrloop.core.models import CTRModel
from ctrloop.core.snapshot import build_from_snapshot, decode_snapshot
from ctrloop.sim.world import RequestBatch, World, WorldConfig, seed_sequence
from ctrloop.trainer.heads import COHORT_PRIOR_FIELDS
from ctrloop.trainer.pipeline import Pipeline, PipelineConfig

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

# Seed streams of this benchmark, disjoint from the World's (0..8) and the streams' (100+, 200+).
SEED_ARRIVALS = 300
SEED_CLICK_UNIFORMS = 301
SEED_CLICK_DELAYS = 302
SEED_POLICY = 303
DAY_S = 86_400.0

DEFAULT_POLICIES = "greedy,eps-0.05,ts,ts-1,vw:--squarecb --gamma_scale 100"
VW_SWEEP = ("--epsilon 0.05", "--epsilon 0.1", "--softmax --lambda 10", "--cover 4",
            "--squarecb", "--squarecb --gamma_scale 100")
COLORS = ("#000000", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e", "#8c564b",
          "#e377c2", "#17becf", "#bcbd22")


class Skipped(Exception):
    """A policy that cannot run here (a missing module); the message says why."""


@dataclass(frozen=True)
class LoopConfig:
    seed: int = 0
    hours: float = 1.0
    rate: float = 20.0  # requests (= impressions: one slot) per event second
    publish_interval: float = 60.0
    click_window: float = 120.0
    allowed_lateness: float = 30.0
    ad_pool_size: int = 300
    churn_per_hour: float = 0.5  # share of the pool replaced per hour: the new-ad arrival rate
    base_ctr: float = 0.05
    candidates_min: int = 4
    candidates_max: int = 12
    n_users: int = 20_000
    bucket_s: float = 300.0  # timeline resolution
    ad_quality_sd: float = 0.5  # spread of the per-ad effect: large = strong incumbents
    # Never-trained ad rows get their cohort's mean (issue 11; trainer/heads.py
    # COHORT_PRIOR_FIELDS, off by default in the trainer); False: they keep their init (~0).
    cohort_prior: bool = False
    adagrad_initial: float = 0.0  # the trainer's LearnerConfig.adagrad_initial (0: plain Adagrad)

    def world(self) -> WorldConfig:
        return WorldConfig(seed=self.seed, impressions_per_second=self.rate, slot_probs=(1.0,),
                           position_bias=(1.0,), candidates_min=self.candidates_min,
                           candidates_max=self.candidates_max, n_users=self.n_users,
                           ad_pool_size=self.ad_pool_size,
                           ad_churn_per_hour=self.churn_per_hour, base_ctr=self.base_ctr,
                           ad_quality_sd=self.ad_quality_sd)

    def pipeline(self) -> PipelineConfig:
        return PipelineConfig(publish_interval=self.publish_interval,
                              allowed_lateness=self.allowed_lateness,
                              learner=LearnerConfig(adagrad_initial=self.adagrad_initial),
                              joiner=JoinerConfig(click_window=self.click_window))


# ---------------------------------------------------------------------------- traffic

@dataclass
class Chunk:
    """The requests of one publication interval, with everything every policy sees or needs."""

    batch: RequestBatch
    mask: NDArray[np.bool_]  # (n, kmax): which columns of batch.candidates are candidates
    ctr: FloatArray  # (n, kmax) true CTR at position 1, -inf padding
    shared: list[dict[str, Any]]  # user.* and ctx.* features per request
    uniforms: FloatArray  # the request's click uniform: clicked iff u < ctr of the shown ad
    delays: FloatArray  # the request's click delay, if it clicks

    def __len__(self) -> int:
        return len(self.batch)


def traffic(cfg: LoopConfig, world: World) -> Iterator[Chunk]:
    """The same requests, candidates and click draws for every policy (given a fresh world)."""
    arrivals = np.random.default_rng(seed_sequence(cfg.seed, SEED_ARRIVALS))
    uniforms = np.random.default_rng(seed_sequence(cfg.seed, SEED_CLICK_UNIFORMS))
    delays = np.random.default_rng(seed_sequence(cfg.seed, SEED_CLICK_DELAYS))
    wc = world.config
    start, end = wc.start_ts, wc.start_ts + cfg.hours * 3600.0
    t = start
    while t < end:
        stop = min(t + cfg.publish_interval, end)
        n = int(arrivals.poisson(cfg.rate * (stop - t)))
        ts = np.sort(np.round(arrivals.uniform(t, stop, n), 3))
        t = stop
        if n == 0:
            continue
        batch = world.sample_batch(ts)
        mask = batch.candidates >= 0
        rows, cols = np.nonzero(mask)
        ctr = np.full(mask.shape, -np.inf)
        ctr[rows, cols] = world.true_ctr_batch(batch, rows, batch.candidates[rows, cols],
                                               np.ones(rows.shape[0], np.int64))
        d = wc.click_delay_median_s * np.exp(wc.click_delay_sigma * delays.standard_normal(n))
        yield Chunk(batch, mask, ctr, world.request_features(batch), uniforms.random(n),
                    np.clip(d, wc.click_delay_min_s, wc.click_delay_max_s))


def infer_spec(cfg: LoopConfig) -> FeatureSpec:
    """The spec the trainer would infer from the first impressions (same for every policy)."""
    world = World(cfg.world())
    batch = world.sample_batch(world.config.start_ts + np.arange(500, dtype=np.float64))
    feats = world.request_features(batch)
    imps = [Impression(f"s{i}", float(batch.ts[i]), f"u{batch.user[i]}", ad.id,
                       ad.advertiser_id, {**feats[i], **ad.features})
            for i in range(len(batch)) for ad in [world.ads[int(batch.candidates[i, 0])]]]
    return FeatureSpec.infer(imps)


# ---------------------------------------------------------------------------- policies

Choice = tuple[IntArray, FloatArray]  # column of the shown candidate, its propensity


class ModelPolicy:
    """A policy that scores with the latest published ctrloop snapshot."""

    name = "model"

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed_sequence(seed, SEED_POLICY))

    def choose(self, model: CTRModel | None, rows: torch.Tensor, chunk: Chunk) -> Choice:
        raise NotImplementedError

    @staticmethod
    def mean_logits(model: CTRModel | None, rows: torch.Tensor, chunk: Chunk) -> FloatArray:
        out = np.full(chunk.mask.shape, -np.inf)
        if model is None:  # the prior: every candidate equal
            out[chunk.mask] = 0.0
            return out
        with torch.inference_mode():
            out[chunk.mask] = model(rows).double().numpy()
        return out


class Greedy(ModelPolicy):
    name = "greedy"

    def choose(self, model: CTRModel | None, rows: torch.Tensor, chunk: Chunk) -> Choice:
        best = np.argmax(self.mean_logits(model, rows, chunk), axis=1)
        return best, np.ones(len(chunk))


class EpsilonGreedy(ModelPolicy):
    def __init__(self, seed: int, epsilon: float) -> None:
        super().__init__(seed)
        self.epsilon = epsilon
        self.name = f"eps-{epsilon:g}"

    def choose(self, model: CTRModel | None, rows: torch.Tensor, chunk: Chunk) -> Choice:
        best = np.argmax(self.mean_logits(model, rows, chunk), axis=1)
        n_cand = chunk.mask.sum(axis=1)
        explore = self.rng.random(len(chunk)) < self.epsilon
        rand = np.floor(self.rng.random(len(chunk)) * n_cand).astype(np.int64)
        chosen = np.where(explore, rand, best)
        prop = self.epsilon / n_cand + (1 - self.epsilon) * (chosen == best)
        return chosen, prop


class Thompson(ModelPolicy):
    """Thompson sampling through the service's sampler over the published GP posterior."""

    name = "ts"
    temperature: float | None = None  # None: ctrloop.core.exploration.DEFAULT_TEMPERATURE
    only_field: str | None = None  # sample only this field's rows (the others: the mean)

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        try:
            from ctrloop.core import exploration
        except ImportError as e:
            raise Skipped(f"ctrloop/core/exploration.py is not there ({e}): Thompson sampling "
                          "needs the service's sampler (issue 5, service side)") from None
        if not all(hasattr(exploration, n) for n in ("thompson_rank", "JointPosterior")):
            raise Skipped("ctrloop.core.exploration has no thompson_rank / JointPosterior")
        self.exploration = exploration
        self.gen = torch.Generator().manual_seed(int(self.rng.integers(2**62)))

    def choose(self, model: CTRModel | None, rows: torch.Tensor, chunk: Chunk) -> Choice:
        mu = self.mean_logits(model, rows, chunk)
        posterior = None if model is None else getattr(model, "posterior", None)
        if model is not None and posterior is None:
            raise Skipped("the published snapshot carries no posterior (model.posterior)")
        chosen = np.zeros(len(chunk), np.int64)
        if posterior is None:  # before the first snapshot: the prior ranks all equal
            n_cand = chunk.mask.sum(axis=1)
            chosen = np.floor(self.rng.random(len(chunk)) * n_cand).astype(np.int64)
            return chosen, 1.0 / n_cand
        # One request at a time: the sampler draws jointly over a request's candidates, one
        # perturbation per distinct embedding row (shared advertisers, the user's own rows).
        offsets = np.concatenate([[0], np.cumsum(chunk.mask.sum(axis=1))])
        flat_mu = mu[chunk.mask]
        with torch.inference_mode():
            row_var = posterior.row_variance(rows).double().numpy()
        temp = self.temperature
        row_var *= self.exploration.DEFAULT_TEMPERATURE if temp is None else temp
        if self.only_field is not None:
            keep = model.spec.names.index(self.only_field)
            row_var[:, [c for c in range(row_var.shape[1]) if c != keep]] = 0.0
        np_rows = rows.numpy()
        ex = self.exploration
        for i in range(len(chunk)):
            lo, hi = int(offsets[i]), int(offsets[i + 1])
            post = ex.JointPosterior.from_rows(flat_mu[lo:hi], np_rows[lo:hi], row_var[lo:hi])
            chosen[i] = int(ex.thompson_rank(post, rng=self.gen).order[0])
        return chosen, np.full(len(chunk), math.nan)  # propensity: not estimated here


def vw_line_parts(shared: dict[str, Any], user_id: str) -> str:
    u = " ".join(f"{k[5:]}={_tok(v)}" for k, v in shared.items() if k.startswith("user."))
    c = " ".join(f"{k[4:]}={_tok(v)}" for k, v in shared.items() if k.startswith("ctx."))
    return f"shared |u id={user_id} {u} |c {c}"


def _tok(v: Any) -> str:
    if isinstance(v, int | float) and not isinstance(v, bool):
        b = round(4.0 * math.log2(1.0 + abs(float(v))))  # ctrloop's numeric bins
        return str(-b if v < 0 else b)
    return str(v).replace(" ", "_").replace(":", ";").replace("|", "/")


class VowpalPolicy:
    """`--cb_explore_adf` with its own online learning (see the module docstring)."""

    def __init__(self, seed: int, args: str, cfg: LoopConfig) -> None:
        from vowpalwabbit import Workspace

        self.name = f"vw:{args}"
        self.vw = Workspace(f"--cb_explore_adf {args} -q ua -q ca --quiet --random_seed {seed}")
        self.rng = np.random.default_rng(seed_sequence(seed, SEED_POLICY))
        self.delay = cfg.click_window + cfg.allowed_lateness
        self.window = cfg.click_window
        self._actions: dict[int, str] = {}
        self._pending: list[tuple[float, int, list[str]]] = []
        self._seq = 0

    def _action(self, world: World, ad_index: int) -> str:
        s = self._actions.get(ad_index)
        if s is None:
            ad = world.ads[ad_index]
            feats = " ".join(f"{k[3:]}={_tok(v)}" for k, v in ad.features.items())
            s = self._actions[ad_index] = f"|a id={ad.id} adv={ad.advertiser_id} {feats}"
        return s

    def learn_until(self, ts: float) -> None:
        while self._pending and self._pending[0][0] <= ts:
            self.vw.learn(heapq.heappop(self._pending)[2])

    def choose_one(self, world: World, chunk: Chunk, i: int) -> tuple[int, float, list[str]]:
        b = chunk.batch
        k = int(b.n_candidates[i])
        lines = [vw_line_parts(chunk.shared[i], f"u{int(b.user[i])}")]
        lines += [self._action(world, int(a)) for a in b.candidates[i, :k].tolist()]
        pmf = np.asarray(self.vw.predict(lines), np.float64)
        pmf = pmf / pmf.sum()
        j = int(min(np.searchsorted(np.cumsum(pmf), self.rng.random(), side="right"), k - 1))
        return j, float(pmf[j]), lines

    def schedule(self, lines: list[str], j: int, prob: float, clicked: bool, ts: float,
                 click_ts: float) -> None:
        labelled = list(lines)
        cost = 0.0 if clicked else 1.0
        labelled[j + 1] = f"0:{cost}:{prob} {lines[j + 1]}"
        # The label is known at the click, or once the window (and lateness) closed without one.
        at = click_ts if clicked else ts + self.delay
        heapq.heappush(self._pending, (at, self._seq, labelled))
        self._seq += 1


# ---------------------------------------------------------------------------- the loop

@dataclass
class Tally:
    requests: int = 0
    clicks: int = 0
    expected_clicks: float = 0.0
    oracle_clicks: float = 0.0
    regret: float = 0.0
    new_ad_candidates: int = 0  # candidate slots of new ads in their first day (opportunity)
    new_ad_impressions: int = 0
    new_ad_clicks: int = 0
    new_ad_oracle_picks: int = 0  # requests where the oracle's best is a first-day new ad
    # Is a never-seen ad's served mean optimistic? Over candidates scored by a snapshot with a
    # posterior: served mean logit and true logit, for ads whose ad.id row has no evidence
    # ("unseen") and for the others ("seen"): [count, sum served logit, sum true logit].
    unseen: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    seen: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    timeline: list[dict[str, float]] = field(default_factory=list)


class Loop:
    def __init__(self, cfg: LoopConfig, spec: FeatureSpec) -> None:
        self.cfg = cfg
        self.spec = spec

    def run(self, make: Callable[[], Any]) -> dict[str, Any]:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        world = World(cfg.world())
        policy = make()
        is_vw = isinstance(policy, VowpalPolicy)
        encoder = FeatureEncoder(self.spec)
        served: list[CTRModel | None] = [None]
        versions = [0]

        def publish(pipe: Pipeline, clock: float) -> str:
            # The service's path: bytes out, verified decode, rebuilt for inference.
            versions[0] += 1
            blob = pipe.ctr.snapshot(versions[0], {"event_time": clock})
            served[0] = build_from_snapshot(decode_snapshot(blob), inference=True)
            return str(versions[0])

        pcfg = cfg.pipeline()
        pipe = None if is_vw else Pipeline(self.spec, pcfg, publisher=publish, seed=cfg.seed)
        self.pipeline, self.served = pipe, served  # the last run's, for inspection
        if pipe is not None and cfg.cohort_prior:
            pipe.ctr.cohort_prior_fields = COHORT_PRIOR_FIELDS
        tally = Tally()
        start_ts = world.config.start_ts
        created = np.zeros(0)
        pending: list[tuple[float, str]] = []  # clicks due to the pipeline
        next_bucket = start_ts + cfg.bucket_s
        t0 = time.perf_counter()
        for chunk in traffic(cfg, world):
            b = chunk.batch
            if created.shape[0] < len(world.ads):
                created = np.asarray([a.created_ts for a in world.ads])
            ads = np.where(chunk.mask, b.candidates, 0)
            age = b.ts[:, None] - created[ads]
            fresh = chunk.mask & (created[ads] > start_ts) & (age < DAY_S)
            if is_vw:
                chosen = self._vw_chunk(policy, world, chunk)
            else:
                assert pipe is not None
                rows = self._encode(encoder, world, chunk)
                chosen, _ = policy.choose(served[0], rows, chunk)
                self._optimism(served[0], rows, chunk, tally)
            idx = np.arange(len(chunk))
            shown_ctr = chunk.ctr[idx, chosen]
            best = np.argmax(chunk.ctr, axis=1)
            clicked = chunk.uniforms < shown_ctr
            if pipe is not None:
                self._feed(pipe, world, chunk, chosen, clicked, pending)
                pipe.advance_idle(float(b.ts[-1]))
            oracle = chunk.ctr[idx, best]
            tally.requests += len(chunk)
            tally.clicks += int(clicked.sum())
            tally.expected_clicks += float(shown_ctr.sum())
            tally.oracle_clicks += float(oracle.sum())
            new_shown = fresh[idx, chosen]
            tally.new_ad_candidates += int(fresh.sum())
            tally.new_ad_impressions += int(new_shown.sum())
            tally.new_ad_clicks += int((new_shown & clicked).sum())
            tally.new_ad_oracle_picks += int(fresh[idx, best].sum())
            # Regret by request time, so the timeline is exact within a bucket.
            step = np.cumsum(oracle - shown_ctr)
            while next_bucket <= b.ts[-1]:
                j = int(np.searchsorted(b.ts, next_bucket, side="left"))
                prev = float(step[j - 1]) if j > 0 else 0.0
                tally.timeline.append({"hours": (next_bucket - start_ts) / 3600.0,
                                       "regret": tally.regret + prev})
                next_bucket += cfg.bucket_s
            tally.regret += float(step[-1])
        tally.timeline.append({"hours": cfg.hours, "regret": tally.regret})
        seconds = time.perf_counter() - t0
        out = {k: v for k, v in asdict(tally).items()}
        out.update(policy=policy.name, seconds=seconds,
                   ctr=tally.clicks / max(tally.requests, 1),
                   expected_ctr=tally.expected_clicks / max(tally.requests, 1),
                   oracle_ctr=tally.oracle_clicks / max(tally.requests, 1),
                   new_ads=world.n_new_ads, publications=versions[0],
                   regret_per_1k=1000.0 * tally.regret / max(tally.requests, 1))
        for name in ("unseen", "seen"):
            n, served_sum, true_sum = getattr(tally, name)
            out[f"{name}_served_logit"] = served_sum / n if n else None
            out[f"{name}_true_logit"] = true_sum / n if n else None
        return out

    def _optimism(self, model: CTRModel | None, rows: torch.Tensor, chunk: Chunk,
                  tally: Tally) -> None:
        """Served vs true mean logit of unseen and seen ads (see Tally)."""
        post = None if model is None else model.posterior
        if model is None or post is None:
            return
        col = self.spec.names.index("ad.id")
        with torch.inference_mode():
            mu = model(rows).double().numpy()
            unseen = (post.evidence(rows[:, col]) == 0).numpy()
        p = np.clip(chunk.ctr[chunk.mask], 1e-9, 1 - 1e-9)
        true = np.log(p / (1 - p))
        for acc, m in ((tally.unseen, unseen), (tally.seen, ~unseen)):
            acc[0] += float(m.sum())
            acc[1] += float(mu[m].sum())
            acc[2] += float(true[m].sum())

    @staticmethod
    def _encode(encoder: FeatureEncoder, world: World, chunk: Chunk) -> torch.Tensor:
        b = chunk.batch
        ads = world.ads
        parts = []
        for i in range(len(chunk)):
            k = int(b.n_candidates[i])
            cands = [(ad.id, ad.advertiser_id, ad.features)
                     for ad in (ads[a] for a in b.candidates[i, :k].tolist())]
            parts.append(encoder.encode_request(chunk.shared[i], f"u{int(b.user[i])}", cands))
        return torch.from_numpy(np.concatenate(parts))

    @staticmethod
    def _feed(pipe: Pipeline, world: World, chunk: Chunk, chosen: IntArray,
              clicked: NDArray[np.bool_], pending: list[tuple[float, str]]) -> None:
        """The shown impressions and their clicks into the trainer, in event-time order."""
        b = chunk.batch
        for i, (c, click) in enumerate(zip(chosen.tolist(), clicked.tolist(), strict=True)):
            ts = float(b.ts[i])
            while pending and pending[0][0] <= ts:
                cts, iid = heapq.heappop(pending)
                pipe.process(Click(iid, cts))
            ad = world.ads[int(b.candidates[i, c])]
            iid = f"r{int(b.request_ids[i])}"
            pipe.process(Impression(iid, ts, f"u{int(b.user[i])}", ad.id, ad.advertiser_id,
                                    {**chunk.shared[i], **ad.features}, position=1))
            if click:
                heapq.heappush(pending, (round(ts + float(chunk.delays[i]), 3), iid))

    @staticmethod
    def _vw_chunk(policy: VowpalPolicy, world: World, chunk: Chunk) -> IntArray:
        b = chunk.batch
        chosen = np.zeros(len(chunk), np.int64)
        for i in range(len(chunk)):
            ts = float(b.ts[i])
            policy.learn_until(ts)
            j, prob, lines = policy.choose_one(world, chunk, i)
            chosen[i] = j
            clicked = bool(chunk.uniforms[i] < chunk.ctr[i, j])
            policy.schedule(lines, j, prob, clicked, ts, ts + float(chunk.delays[i]))
        return chosen


def make_policy(name: str, cfg: LoopConfig) -> Callable[[], Any]:
    if name == "greedy":
        return lambda: Greedy(cfg.seed)
    if name.startswith("eps-"):
        eps = float(name[4:])
        return lambda: EpsilonGreedy(cfg.seed, eps)
    if name in ("ts", "tsad") or name.startswith(("ts-", "tsad-")):
        # ts-T: sampling temperature T (the calibrated posterior's variance times T), as the
        # service's CTRLOOP_EXPLORE_TEMPERATURE; plain ts: the service default. tsad[-T]: only
        # the ad.id rows are sampled (the new ad's own uncertainty), every other row at its mean.
        base, _, t_arg = name.partition("-")
        temperature = float(t_arg) if t_arg else None

        def make_ts() -> Thompson:
            t = Thompson(cfg.seed)
            t.name, t.temperature = name, temperature
            t.only_field = "ad.id" if base == "tsad" else None
            return t
        return make_ts
    if name.startswith("vw:"):
        return lambda: VowpalPolicy(cfg.seed, name[3:], cfg)
    raise SystemExit(f"unknown policy {name!r}: greedy, eps-E, ts, vw:ARGS")


# ---------------------------------------------------------------------------- reporting

def table(results: list[dict[str, Any]]) -> str:
    head = ("| policy | clicks | expected CTR | oracle CTR | cumulative regret | regret / request "
            "| new-ad impressions (1st day) | new-ad clicks (1st day) | wall s |")
    lines = [head, "|" + "---|" * 9]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['policy']} | skipped: {r['skipped']} |||||||| ")
            continue
        lines.append(
            f"| {r['policy']} | {r['clicks']:,} | {r['expected_ctr']:.4f} | "
            f"{r['oracle_ctr']:.4f} | {r['regret']:,.1f} | {r['regret'] / r['requests']:.4f} | "
            f"{r['new_ad_impressions']:,} | {r['new_ad_clicks']:,} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def svg_plot(results: list[dict[str, Any]], title: str) -> str:
    """Cumulative regret over event time, one line per policy (hand-written SVG)."""
    w, h, pad, right = 760, 380, 60, 170
    runs = [r for r in results if "timeline" in r]
    hours = max((p["hours"] for r in runs for p in r["timeline"]), default=1.0)
    top = max((p["regret"] for r in runs for p in r["timeline"]), default=1.0) or 1.0

    def x(v: float) -> float:
        return pad + (w - pad - right) * v / hours

    def y(v: float) -> float:
        return h - pad - (h - 2 * pad) * v / top

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'font-family="sans-serif" font-size="11">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{(w - right) / 2}" y="20" text-anchor="middle" font-size="14">'
             f'{html.escape(title)}</text>']
    for t in np.linspace(0, top, 6):
        parts.append(f'<line x1="{pad}" x2="{w - right}" y1="{y(t):.1f}" y2="{y(t):.1f}" '
                     f'stroke="#ddd"/><text x="{pad - 5}" y="{y(t) + 4:.1f}" '
                     f'text-anchor="end">{t:,.0f}</text>')
    for t in np.linspace(0, hours, 7):
        parts.append(f'<text x="{x(t):.1f}" y="{h - pad + 16}" text-anchor="middle">'
                     f'{t:.1f} h</text>')
    parts.append(f'<text x="{pad - 45}" y="{h / 2}" transform="rotate(-90 {pad - 45} {h / 2})" '
                 f'text-anchor="middle">cumulative regret (clicks)</text>')
    for i, r in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        pts = " ".join(f"{x(p['hours']):.1f},{y(p['regret']):.1f}"
                       for p in [{"hours": 0.0, "regret": 0.0}, *r["timeline"]])
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>')
        parts.append(f'<text x="{w - right + 8}" y="{pad + 14 * i}" fill="{color}">'
                     f'{html.escape(r["policy"])}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


# Student t 0.975 quantiles for 1..15 degrees of freedom.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131)


def ratio_ci(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Mean of per-seed ratios num/den with a 95% t-interval across seeds (NaN for < 2)."""
    r = np.asarray(num) / np.asarray(den)
    if r.size < 2:
        return float(r.mean()), math.nan, math.nan
    df = r.size - 1
    t = T975[df - 1] if df <= len(T975) else 1.96 + 2.4 / df  # no scipy in the env
    half = float(t * r.std(ddof=1) / math.sqrt(r.size))
    return float(r.mean()), float(r.mean()) - half, float(r.mean()) + half


def seeds_table(per_seed: dict[int, list[dict[str, Any]]]) -> str:
    """Regret per 1k requests per seed and policy (mean row last), then every Thompson
    sampling policy's regret over every other policy's: mean per-seed ratio, 95% CI."""
    by_seed = {s: {r["policy"]: r for r in res if "regret" in r} for s, res in per_seed.items()}
    names = [n for n in next(iter(by_seed.values())) if all(n in b for b in by_seed.values())]
    lines = ["| seed | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for seed, by in by_seed.items():
        lines.append(f"| {seed} | " + " | ".join(f"{by[n]['regret_per_1k']:.2f}" for n in names)
                     + " |")
    lines.append("| mean | " + " | ".join(
        f"{np.mean([b[n]['regret_per_1k'] for b in by_seed.values()]):.2f}" for n in names)
        + " |")
    lines.append("")
    for ts in (n for n in names if n.startswith("ts")):
        for other in (n for n in names if not n.startswith("ts")):
            m, lo, hi = ratio_ci([b[ts]["regret"] for b in by_seed.values()],
                                 [b[other]["regret"] for b in by_seed.values()])
            lines.append(f"- {ts} / {other}: {m:.3f} (95% CI {lo:.3f}–{hi:.3f}, "
                         f"{len(by_seed)} seeds)")
    return "\n".join(lines)


def summarize(dirs: list[Path]) -> str:
    """seeds_table over the `seed-*/exploration.json` of several `--seeds` runs (e.g. the same
    world run in parallel processes, or with and without the cohort prior: those policies are
    named "... (cohort prior)")."""
    per_seed: dict[int, list[dict[str, Any]]] = {}
    for d in dirs:
        for f in sorted(d.glob("seed-*/exploration.json")):
            run = json.loads(f.read_text())
            tag = " (cohort prior)" if run["config"].get("cohort_prior") else ""
            res = [{**r, "policy": r["policy"] + tag} for r in run["results"]]
            per_seed.setdefault(int(run["config"]["seed"]), []).extend(res)
    if not per_seed:
        raise SystemExit(f"no seed-*/exploration.json under {', '.join(map(str, dirs))}")
    return seeds_table(dict(sorted(per_seed.items())))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = LoopConfig()
    ap.add_argument("--hours", type=float, default=d.hours, help="event time simulated")
    ap.add_argument("--rate", type=float, default=d.rate, help="requests per event second")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--seeds", help="comma-separated seeds (overrides --seed): every policy "
                    "on each, then regret per 1k requests and ts / other with a 95%% CI")
    ap.add_argument("--ad-quality-sd", type=float, default=d.ad_quality_sd,
                    help="spread of the per-ad effect (larger: stronger incumbents)")
    ap.add_argument("--adagrad-initial", type=float, default=d.adagrad_initial,
                    help="Adagrad's initial accumulator for embedding rows (0: plain)")
    ap.add_argument("--cohort-prior", action="store_true",
                    help="never-trained ad rows get the mean of the trained ones (issue 11)")
    ap.add_argument("--publish-interval", type=float, default=d.publish_interval)
    ap.add_argument("--pool", type=int, default=d.ad_pool_size, help="active ads")
    ap.add_argument("--churn", type=float, default=d.churn_per_hour,
                    help="share of the pool replaced by new ads per hour")
    ap.add_argument("--base-ctr", type=float, default=d.base_ctr)
    ap.add_argument("--candidates", type=int, help="candidates per request (default "
                    f"{d.candidates_min}-{d.candidates_max} uniformly)")
    ap.add_argument("--policies", default=DEFAULT_POLICIES,
                    help=f"comma-separated (default {DEFAULT_POLICIES})")
    ap.add_argument("--vw-sweep", action="store_true",
                    help="also run every VW exploration setting: " + ", ".join(VW_SWEEP))
    ap.add_argument("--out", type=Path, default=Path("runs/exploration"))
    ap.add_argument("--svg", type=Path, help="write the regret plot here too")
    ap.add_argument("--summarize", type=Path, nargs="+", metavar="DIR",
                    help="only print the seeds table of these --seeds runs' --out folders")
    args = ap.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    torch.set_num_threads(1)
    names = [p for p in args.policies.split(",") if p]
    if args.vw_sweep:
        names += [f"vw:{a}" for a in VW_SWEEP if f"vw:{a}" not in names]
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    per_seed: dict[int, list[dict[str, Any]]] = {}
    for seed in seeds:
        cfg = LoopConfig(seed=seed, hours=args.hours, rate=args.rate,
                         publish_interval=args.publish_interval, ad_pool_size=args.pool,
                         churn_per_hour=args.churn, base_ctr=args.base_ctr,
                         ad_quality_sd=args.ad_quality_sd, cohort_prior=args.cohort_prior,
                         adagrad_initial=args.adagrad_initial,
                         candidates_min=args.candidates or d.candidates_min,
                         candidates_max=args.candidates or d.candidates_max)
        out = args.out / f"seed-{seed}" if args.seeds else args.out
        per_seed[seed] = run_seed(cfg, names, out, args.svg if not args.seeds else None)
    if args.seeds:
        text = seeds_table(per_seed)
        (args.out / "seeds.json").write_text(json.dumps(
            {"seeds": seeds, "policies": names, "table": text,
             "regret_per_1k": {s: {r["policy"]: r.get("regret_per_1k") for r in res}
                               for s, res in per_seed.items()}}, indent=2))
        print(text)
    return 0


def run_seed(cfg: LoopConfig, names: list[str], out: Path, svg_path: Path | None
             ) -> list[dict[str, Any]]:
    """Every policy on one seed's world; writes exploration.json and the regret plot."""
    loop = Loop(cfg, infer_spec(cfg))
    results: list[dict[str, Any]] = []
    for name in names:
        try:
            r = loop.run(make_policy(name, cfg))
        except Skipped as e:
            print(f"{name}: SKIPPED: {e}", file=sys.stderr, flush=True)
            results.append({"policy": name, "skipped": str(e)})
            continue
        results.append(r)
        print(f"seed {cfg.seed} {name}: regret {r['regret']:.1f} ({r['regret_per_1k']:.2f}/1k), "
              f"clicks {r['clicks']}, expected CTR {r['expected_ctr']:.4f} (oracle "
              f"{r['oracle_ctr']:.4f}), new-ad imps {r['new_ad_impressions']}, mean logit "
              f"unseen {_fmt(r['unseen_served_logit'])} (true {_fmt(r['unseen_true_logit'])}) "
              f"seen {_fmt(r['seen_served_logit'])} (true {_fmt(r['seen_true_logit'])}), "
              f"{r['seconds']:.0f} s", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"config": asdict(cfg), "results": results, "table": table(results)}
    (out / "exploration.json").write_text(json.dumps(summary, indent=2, default=str))
    title = (f"Cumulative regret vs oracle ({cfg.hours:g} h, {cfg.rate:g} req/s, "
             f"seed {cfg.seed})")
    svg = svg_plot(results, title)
    (out / "exploration_regret.svg").write_text(svg)
    if svg_path is not None:
        svg_path.write_text(svg)
    print(table(results))
    return results


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:+.3f}"

if __name__ == "__main__":
    sys.exit(main())
