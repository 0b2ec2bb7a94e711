"""Off-policy evaluation: unbiased where the truth is known, honest intervals, clear errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import orjson
import pytest

from ctrloop.cli import main
from ctrloop.core.offpolicy import (
    LoggedData,
    OffPolicyInputError,
    estimate,
    evaluate_file,
    rank_propensities,
    read_log,
    target_probabilities,
)
from ctrloop.sim import WorldConfig, write_files

POSITION_BIAS = (1.0, 0.6)
EPSILON = 0.3


def synthetic_log(seed: int, n_requests: int) -> tuple[LoggedData, dict[str, np.ndarray]]:
    """An epsilon-greedy logger over noisy model scores, 1-2 slots, 3-6 candidates.

    Returns the log and, per logged impression, the greedy and uniform targets' probabilities.
    """
    rng = np.random.default_rng(seed)
    req, pos, prop, clicked, ncand, greedy_p, uniform_p = [], [], [], [], [], [], []
    for r in range(n_requests):
        n = int(rng.integers(3, 7))
        slots = int(rng.integers(1, 3))
        logit = rng.normal(-2.0, 1.0, n)
        ctr = 1 / (1 + np.exp(-logit))
        scores = logit + rng.normal(0, 0.7, n)
        mu = rank_propensities(scores, slots, "epsilon", EPSILON)
        g = rank_propensities(scores, slots, "greedy")
        order = rng.permutation(n) if rng.random() < EPSILON else np.argsort(-scores,
                                                                           kind="stable")
        for k in range(slots):
            a = int(order[k])
            req.append(r)
            pos.append(k + 1)
            prop.append(mu[a, k])
            clicked.append(float(rng.random() < ctr[a] * POSITION_BIAS[k]))
            ncand.append(float(n))
            greedy_p.append(g[a, k])
            uniform_p.append(1.0 / n)
    data = LoggedData([f"i{i}" for i in range(len(req))], np.asarray(req), np.asarray(pos),
                      np.asarray(prop), np.asarray(clicked), np.asarray(ncand), n_requests)
    return data, {"greedy": np.asarray(greedy_p), "uniform": np.asarray(uniform_p)}


def true_values(n: int = 400_000, seed: int = 12345) -> dict[str, float]:
    """Expected clicks per request of each policy over the same request distribution, by
    averaging the exact per-request expectation over many requests (MC error ~1e-4)."""
    rng = np.random.default_rng(seed)
    totals = {"greedy": 0.0, "uniform": 0.0, "logging": 0.0}
    for nc in range(3, 7):
        for slots in (1, 2):
            m = n // 8
            logit = rng.normal(-2.0, 1.0, (m, nc))
            ctr = 1 / (1 + np.exp(-logit))
            scores = logit + rng.normal(0, 0.7, (m, nc))
            order = np.argsort(-scores, axis=1, kind="stable")
            top = np.take_along_axis(ctr, order[:, :slots], axis=1)
            pb = np.asarray(POSITION_BIAS[:slots])
            greedy = (top * pb).sum(axis=1).mean()
            uniform = ctr.mean(axis=1).mean() * pb.sum()
            totals["greedy"] += greedy / 8
            totals["uniform"] += uniform / 8
            totals["logging"] += ((1 - EPSILON) * greedy + EPSILON * uniform) / 8
    return totals


@pytest.fixture(scope="module")
def runs() -> dict[str, list]:
    out: dict[str, list] = {"greedy": [], "uniform": [], "logging": []}
    for seed in range(300):
        data, targets = synthetic_log(seed, 1500)
        out["logging"].append(estimate(data, target_probabilities(data, "logging")))
        for name in ("greedy", "uniform"):
            out[name].append(estimate(data, targets[name]))
    return out


@pytest.mark.parametrize("target", ["logging", "greedy", "uniform"])
@pytest.mark.parametrize("kind", ["ips", "snips"])
def test_unbiased_with_nominal_coverage(runs: dict[str, list], target: str, kind: str) -> None:
    truth = true_values()[target]
    ests = [getattr(r, kind) for r in runs[target]]
    values = np.asarray([e.value for e in ests])
    # The mean of 300 independent estimates is within 3.5 of its standard errors of the truth.
    assert abs(values.mean() - truth) < 3.5 * values.std(ddof=1) / math.sqrt(len(values))
    covered = np.mean([e.ci_low <= truth <= e.ci_high for e in ests])
    # 95% intervals; with 300 runs the coverage's own sd is 0.013.
    assert 0.91 <= covered <= 0.99, covered
    # The reported standard errors match the spread of the estimates across seeds.
    se = np.mean([e.std_error for e in ests])
    assert 0.8 < se / values.std(ddof=1) < 1.25


def test_logging_target_equals_on_policy_mean(runs: dict[str, list]) -> None:
    for r in runs["logging"]:
        assert r.ips.value == pytest.approx(r.on_policy.value)
        assert r.snips.value == pytest.approx(r.on_policy.value)
        assert r.effective_sample_size == pytest.approx(r.impressions)


def test_snips_has_lower_variance_than_ips(runs: dict[str, list]) -> None:
    for target in ("greedy", "uniform"):
        ips = np.std([r.ips.value for r in runs[target]])
        snips = np.std([r.snips.value for r in runs[target]])
        assert snips < ips, (target, snips, ips)


def test_clipping_caps_weights_and_is_reported() -> None:
    data, targets = synthetic_log(0, 1000)
    free = estimate(data, targets["uniform"])
    capped = estimate(data, targets["uniform"], max_weight=2.0)
    assert free.max_weight > 2.0 and capped.clipped > 0
    assert free.clipped == 0
    assert capped.ips.value < free.ips.value  # clipping only removes weight
    assert capped.effective_sample_size > free.effective_sample_size


def test_rank_propensities_columns_sum_to_one() -> None:
    scores = np.asarray([0.3, 2.0, -1.0, 0.5])
    for policy in ("greedy", "uniform", "epsilon"):
        p = rank_propensities(scores, 2, policy, 0.2)
        assert p.sum(axis=0) == pytest.approx([1.0, 1.0])
    p = rank_propensities(scores, 2, "epsilon", 0.2)
    assert p[1, 0] == pytest.approx(0.8 + 0.2 / 4)
    assert p[3, 1] == pytest.approx(0.8 + 0.2 / 4)
    assert p[2, 0] == pytest.approx(0.2 / 4)


# ---------------------------------------------------------------------------- files and CLI

@pytest.fixture(scope="module")
def sim_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("ope")
    events, truth = d / "events.jsonl", d / "truth.jsonl"
    write_files(WorldConfig(seed=3, n_users=2000, ad_pool_size=200), 6000, events, truth)
    return events, truth


def test_simulator_log_logging_target_covers_true_value(sim_log: tuple[Path, Path]) -> None:
    events, truth = sim_log
    res = evaluate_file(events, "logging")
    true_ctr = [orjson.loads(line)["ctr"] for line in truth.read_bytes().splitlines()]
    true_value = sum(true_ctr) / res.requests  # expected clicks per request actually served
    assert res.ips.value == pytest.approx(res.on_policy.value)
    assert res.ips.ci_low <= true_value <= res.ips.ci_high
    assert res.impressions == 6000 and 1.5 < res.impressions_per_request < 1.9


def test_cli_ope_with_target_file(sim_log: tuple[Path, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    events, _ = sim_log
    data = read_log(events)
    # The simulator logs uniformly at random, so "uniform" as a file equals the logging policy.
    target = tmp_path / "target.jsonl"
    target.write_bytes(b"".join(
        orjson.dumps({"impression_id": iid, "target_propensity": p}) + b"\n"
        for iid, p in zip(data.impression_ids, data.propensity.tolist(), strict=True)))
    out = tmp_path / "ope.json"
    assert main(["ope", "--events", str(events), "--target-file", str(target),
                 "--json-out", str(out)]) == 0
    res = orjson.loads(out.read_bytes())
    cpr = res["clicks_per_request"]
    assert cpr["ips"]["value"] == pytest.approx(cpr["on_policy"]["value"])
    assert "IPS" in capsys.readouterr().err


def _write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


IMP = {"type": "impression", "impression_id": "x1", "ts": 1767225600.0, "user_id": "u1",
       "ad_id": "a1", "advertiser_id": "adv1", "position": 1, "propensity": 0.5}


@pytest.mark.parametrize(("bad", "message"), [
    (b"{not json", "not valid JSON"),
    (orjson.dumps({**IMP, "impression_id": "x2", "propensity": None}), "no 'propensity'"),
    (orjson.dumps({**IMP, "impression_id": "x2", "propensity": 1.5}), "'propensity'"),
    (orjson.dumps({**IMP, "impression_id": "x2", "position": None}), "'position'"),
    (orjson.dumps(IMP), "duplicate impression_id"),
    (orjson.dumps({"type": "view", "impression_id": "x1"}), "'type'"),
    (b"[1, 2]", "JSON object"),
])
def test_bad_log_line_names_its_line(tmp_path: Path, bad: bytes, message: str) -> None:
    path = _write(tmp_path / "e.jsonl", [orjson.dumps(IMP), b"", bad])
    with pytest.raises(OffPolicyInputError, match=rf"e\.jsonl:3: .*{message}"):
        read_log(path)


def test_bad_target_line_names_its_line(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    events = _write(tmp_path / "e.jsonl", [orjson.dumps(IMP)])
    target = _write(tmp_path / "t.jsonl", [
        orjson.dumps({"impression_id": "x1", "target_propensity": 0.2}),
        orjson.dumps({"impression_id": "x1", "target_propensity": 2})])
    assert main(["ope", "--events", str(events), "--target-file", str(target)]) == 2
    err = capsys.readouterr().err
    assert "t.jsonl:2" in err and "target_propensity" in err


def test_uniform_target_needs_n_candidates(tmp_path: Path) -> None:
    events = _write(tmp_path / "e.jsonl", [orjson.dumps(IMP)])
    with pytest.raises(OffPolicyInputError, match="n_candidates"):
        evaluate_file(events, "uniform")
    events = _write(tmp_path / "e2.jsonl", [orjson.dumps({**IMP, "n_candidates": 4})])
    assert evaluate_file(events, "uniform").impressions == 1
