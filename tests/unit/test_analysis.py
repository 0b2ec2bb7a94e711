"""Collapse and entanglement analysis (ctrloop/core/analysis.py): the math on small known cases."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

from ctrloop.cli import main
from ctrloop.core.analysis import (
    ALL_TABLES,
    CollapseWatch,
    FieldMatrix,
    collapse_report,
    compact,
    concatenated,
    entanglement_report,
    field_mutual_information,
    field_spectrum,
    information_abundance,
    model_field_matrices,
    mutual_information,
    render_spectra_svg,
    render_table,
    singular_values,
    stem_task_spaces,
    strided_sample,
    table_names,
    trained_rows,
)
from ctrloop.core.features import FeatureSpec, Field
from ctrloop.core.learner import LearnerConfig, OnlineLearner
from ctrloop.core.models import MODELS, build_model, model_parameters
from ctrloop.core.snapshot import build_from_snapshot, decode_snapshot, encode_snapshot

SPEC = FeatureSpec((Field("user.id", "categorical", "user", 64),
                    Field("ctx.hour", "categorical", "context", 8),
                    Field("ad.id", "categorical", "ad", 32)))


def test_rank_one_rows_have_ia_one_whatever_their_lengths() -> None:
    direction = torch.randn(1, 8)
    rows = direction * torch.linspace(0.1, 5.0, 40)[:, None]  # lengths differ, one direction
    assert information_abundance(singular_values(rows)) == pytest.approx(1.0, abs=1e-6)


def test_opposite_rows_are_one_direction_too() -> None:
    v = torch.randn(1, 6)
    assert information_abundance(singular_values(torch.cat([v, -3 * v]))) == \
        pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_k_orthonormal_rows_have_ia_k(k: int) -> None:
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    rows = q[:k] * torch.arange(1, k + 1, dtype=torch.float64)[:, None]  # normalised first
    sv = singular_values(rows)
    assert information_abundance(sv) == pytest.approx(k, rel=1e-9)
    assert np.count_nonzero(sv > 1e-6) == k


def test_without_normalisation_lengths_count() -> None:
    rows = torch.diag(torch.tensor([4.0, 1.0]))
    assert information_abundance(singular_values(rows, normalize=False)) == pytest.approx(1.25)
    assert information_abundance(singular_values(rows)) == pytest.approx(2.0)


def test_spectrum_is_sorted_descending_and_matches_svd() -> None:
    x = torch.randn(50, 6, dtype=torch.float64) * torch.tensor([5.0, 0.1, 2.0, 1.0, 3.0, 0.5])
    sv = singular_values(x, normalize=False)
    assert list(sv) == sorted(sv, reverse=True)
    np.testing.assert_allclose(sv, torch.linalg.svdvals(x).numpy(), rtol=1e-8)


def test_empty_and_zero_matrices() -> None:
    assert information_abundance(singular_values(torch.zeros(0, 4))) == 0.0
    assert information_abundance(singular_values(torch.zeros(3, 4))) == 0.0  # no direction
    assert information_abundance([]) == 0.0


def test_untrained_rows_are_excluded() -> None:
    torch.manual_seed(0)
    trained = torch.randn(1, 8).repeat(10, 1)  # collapsed: one direction
    noise = torch.randn(200, 8)  # random init: isotropic
    weight = torch.cat([trained, noise])
    mask = torch.zeros(210, dtype=torch.bool)
    mask[:10] = True
    s = field_spectrum(FieldMatrix("t", "f", weight, mask))
    assert (s.rows, s.rows_trained, s.rows_used) == (210, 10, 10)
    assert s.ia == pytest.approx(1.0, abs=1e-5)
    everything = field_spectrum(FieldMatrix("t", "f", weight, torch.ones(210, dtype=torch.bool)))
    assert everything.ia > 5  # the untouched noise would hide the collapse


def test_trained_rows_evidence_order() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 16) * 0.01
    w[2] += 0.05 * torch.sign(torch.randn(16))  # one Adagrad step: lr on every coordinate
    acc = torch.zeros(5, 16)
    acc[[0, 3]] = 1.0
    linear = torch.tensor([0.0, 0.0, 0.3, 0.0, -0.1])
    assert trained_rows(w, acc).tolist() == [True, False, False, True, False]
    assert trained_rows(w, acc, linear).tolist() == [False, False, True, False, True]
    # Evidence that marks nothing passes on: an all-zero accumulator (a model rebuilt from a
    # snapshot), an all-zero linear column (hidden on purpose here).
    assert trained_rows(w, torch.zeros(5, 16), linear).tolist() == \
        [False, False, True, False, True]
    assert trained_rows(w, acc, torch.zeros(5)).tolist() == [True, False, False, True, False]
    assert trained_rows(w, None, None, init_std=0.01).tolist() == \
        [False, False, True, False, False]


def test_strided_sample_bounds_and_keeps_order() -> None:
    idx = torch.arange(10_000)
    s = strided_sample(idx, 1000)
    assert s.numel() <= 1000 and torch.all(s[1:] > s[:-1])
    assert torch.equal(strided_sample(idx[:5], 1000), idx[:5])


def test_sampling_keeps_ia() -> None:
    torch.manual_seed(1)
    x = torch.randn(20_000, 8) * torch.tensor([3.0, 2.0, 1.0, 1.0, 0.5, 0.2, 0.1, 0.1])
    mask = torch.ones(20_000, dtype=torch.bool)
    full = field_spectrum(FieldMatrix("t", "f", x, mask), max_rows=None)
    sampled = field_spectrum(FieldMatrix("t", "f", x, mask), max_rows=2000)
    assert sampled.rows_used <= 2000
    assert sampled.ia == pytest.approx(full.ia, rel=0.03)


def _trained_fwfm(steps: int = 30, name: str = "fwfm",
                  hparams: dict[str, object] | None = None) -> OnlineLearner:
    torch.manual_seed(0)
    model = build_model(name, SPEC, **({"dim": 4} if hparams is None else hparams))
    learner = OnlineLearner(model, LearnerConfig(batch_size=64))
    rng = np.random.default_rng(0)
    offsets = np.asarray(SPEC.offsets)
    for _ in range(steps):
        # Only buckets 1..5 of each field ever appear: the rest stay at their random init.
        rows = offsets + rng.integers(1, 6, size=(64, 3))
        learner.learn(rows, rng.integers(0, 2, size=64).astype(np.float32))
    return learner


def test_fwfm_fields_count_only_the_buckets_that_were_learned() -> None:
    learner = _trained_fwfm()
    spectra = collapse_report(learner.model)
    assert [(s.table, s.field) for s in spectra] == [("table", f) for f in SPEC.names]
    for s in spectra:
        assert s.rows_trained == 5 and s.dim == 4  # column 0 (linear weight) excluded
        assert 1.0 <= s.ia <= 4.0


def test_snapshot_rule_finds_the_same_rows_as_the_accumulator() -> None:
    learner = _trained_fwfm()
    live = collapse_report(learner.model)
    blob = encode_snapshot(learner.model, 1, {})
    for inference in (True, False):  # inference: no accumulator; else an all-zero one
        rebuilt = build_from_snapshot(decode_snapshot(blob), inference=inference)
        again = collapse_report(rebuilt)
        assert [s.rows_trained for s in again] == [s.rows_trained for s in live]
        assert [s.ia for s in again] == pytest.approx([s.ia for s in live])


def test_a_checkpoints_accumulators_decide_for_a_rebuilt_model() -> None:
    learner = _trained_fwfm()
    state = learner.state_dict()
    model = build_model("fwfm", SPEC, dim=4)
    model.load_state_dict(state["model"])
    with torch.no_grad():
        model.table.weight[:, 0] = 0.0  # hide the snapshot rule's evidence
    mats = model_field_matrices(model, accumulators=state["accumulators"])
    assert [int(m.trained.sum()) for m in mats] == [5, 5, 5]


def test_multi_embedding_tables_each_get_a_spectrum_from_the_live_model_and_snapshot() -> None:
    learner = _trained_fwfm(name="hmoe", hparams={"tables": [4, 8], "hidden": 8, "tower": [8]})
    live = collapse_report(learner.model)
    assert [(s.table, s.dim) for s in live] == [("table.0", 4)] * 3 + [("table.1", 8)] * 3
    assert all(s.rows_trained == 5 for s in live)
    rebuilt = build_from_snapshot(decode_snapshot(encode_snapshot(learner.model, 1, {})),
                                  inference=True)
    assert [s.rows_trained for s in collapse_report(rebuilt)] == [5] * 6  # column 0 decides
    both = collapse_report(learner.model, all_tables=True)
    assert [(s.table, s.dim) for s in both[6:]] == [(ALL_TABLES, 12)] * 3


def test_tables_side_by_side_add_up_when_they_span_different_directions() -> None:
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    trained = torch.ones(4, dtype=torch.bool)
    one_dir = torch.ones(4, 1, dtype=torch.float64) * q[:1]  # rank 1 in each table
    other = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]], dtype=torch.float64) * q[1:2]
    same = concatenated([FieldMatrix("t0", "f", one_dir, trained),
                         FieldMatrix("t1", "f", one_dir * 3, trained)])
    differ = concatenated([FieldMatrix("t0", "f", one_dir, trained),
                           FieldMatrix("t1", "f", other, trained)])
    assert [m.table for m in same] == [ALL_TABLES] and same[0].weight.shape == (4, 16)
    assert field_spectrum(same[0]).ia == pytest.approx(1.0)
    assert field_spectrum(differ[0]).ia == pytest.approx(2.0)
    assert concatenated([FieldMatrix("t0", "f", one_dir, trained)]) == []


def test_stem_task_tables_count_the_rows_their_own_task_trained() -> None:
    torch.manual_seed(0)
    model = build_model("stem", SPEC, tasks=["a", "b"], dim=4, task_dim=2)
    learner = OnlineLearner(model, LearnerConfig(batch_size=64))
    offsets = np.asarray(SPEC.offsets)
    rng = np.random.default_rng(0)
    for task, buckets in ((0, (1, 4)), (1, (1, 7))):  # task a: buckets 1-3, task b: 1-6
        rows = offsets + rng.integers(*buckets, size=(64, 3))
        learner.learn(rows, rng.integers(0, 2, size=64).astype(np.float32),
                      tasks=np.full(64, task))
    snap = build_from_snapshot(decode_snapshot(encode_snapshot(model, 1, {})), inference=True)
    for m in (model, snap):  # the live model (accumulator there too) and the snapshot
        trained = {(s.table, s.field): s.rows_trained for s in collapse_report(m)}
        assert trained[("table", "user.id")] == 6
        assert trained[("task_table.a", "user.id")] == 3
        assert trained[("task_table.b", "user.id")] == 6


def test_stem_has_a_table_per_task_and_lr_has_none() -> None:
    stem = build_model("stem", SPEC, tasks=["signup", "purchase"], dim=4, task_dim=2)
    tables = {s.table for s in collapse_report(stem)}
    assert tables == {"table", "task_table.signup", "task_table.purchase"}
    assert all(s.dim == 2 for s in collapse_report(stem) if s.table != "table")
    assert collapse_report(build_model("lr", SPEC)) == []


def test_compact_is_small_and_json_ready() -> None:
    spectra = collapse_report(_trained_fwfm().model)
    c = compact(spectra)
    assert set(c) == {"table"} and set(c["table"]) == set(SPEC.names)
    assert c["table"]["ctx.hour"]["rows"] == 5


def test_mutual_information_independent_vs_dependent() -> None:
    rng = np.random.default_rng(0)
    n = 20_000
    y = rng.integers(0, 2, n)
    independent = rng.integers(0, 10, n)
    copy = y.copy()
    noisy = np.where(rng.random(n) < 0.9, y, 1 - y)  # binary symmetric channel, flip 0.1
    mi_ind = mutual_information(independent, y)
    assert mi_ind.mi < 0.002 and mi_ind.mi_corrected < 0.001
    assert mutual_information(copy, y).mi == pytest.approx(math.log(2), abs=1e-3)
    h = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))
    assert mutual_information(noisy, y).mi == pytest.approx(math.log(2) - h, abs=0.01)


def test_miller_madow_removes_most_of_a_high_cardinality_fields_bias() -> None:
    rng = np.random.default_rng(1)
    n = 5_000
    y = (rng.random(n) < 0.1).astype(int)
    ids = rng.integers(0, 2_000, n)  # ~2.5 samples per id, independent of y
    mi = mutual_information(ids, y)
    assert mi.mi > 0.02  # the plug-in estimate is fooled
    assert mi.mi_corrected < mi.mi / 3


def test_field_mutual_information_per_spec_field() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 4000)
    rows = np.stack([rng.integers(0, 64, 4000), 64 + y * 3, 72 + rng.integers(0, 32, 4000)], 1)
    out = field_mutual_information(rows, y, SPEC)
    assert [m.field for m in out] == SPEC.names
    assert out[1].mi_corrected > 0.6 and out[0].mi_corrected < 0.01
    with pytest.raises(ValueError):
        field_mutual_information(rows[:, :2], y, SPEC)


def test_entanglement_shared_space_cannot_separate_contradictory_pairs() -> None:
    tasks = ("a", "b")
    torch.manual_seed(0)
    p = 200
    users = torch.randn(p, 4)
    shared_ads = torch.randn(p, 4)
    labels = torch.tensor([[1, 0]] * (p // 2) + [[0, 1]] * (p // 2))
    shared = entanglement_report({t: users for t in tasks}, {t: shared_ads for t in tasks},
                                 labels, tasks)
    for g in shared.contradictory:
        assert g.pairs == p // 2 and g.gap == pytest.approx(0.0) and g.agree == 0.0
    # Task spaces: the ad sits on the user in the task the pair is positive for, opposite in
    # the other: every contradictory pair agrees with both labels.
    sign = labels.double() * 2 - 1
    ads = {t: users * sign[:, i:i + 1].float() for i, t in enumerate(tasks)}
    sep = entanglement_report({t: users for t in tasks}, ads, labels, tasks)
    for g in sep.contradictory:
        assert g.gap == pytest.approx(2.0) and g.agree == 1.0
    assert sep.per_task["a"]["distance_positive"] == pytest.approx(0.0, abs=1e-9)
    assert sep.per_task["a"]["distance_negative"] == pytest.approx(2.0)


def test_stem_task_spaces_on_a_constructed_model() -> None:
    """A STEM model whose task-specific rows encode the contradiction: the pair (user 1, ad 1)
    is a signup but not a purchase, (user 2, ad 2) the other way round."""
    model = build_model("stem", SPEC, tasks=["signup", "purchase"], dim=2, task_dim=2)
    uo, ao = SPEC.offsets[0], SPEC.offsets[2]
    with torch.no_grad():
        model.table.weight.zero_()
        model.task_table.weight.zero_()
        shared = torch.tensor([1.0, 0.0])
        for u, a in ((uo + 1, ao + 1), (uo + 2, ao + 2)):
            model.table.weight[u, 1:] = shared
            model.table.weight[a, 1:] = shared
        # task_table columns: [w_signup, w_purchase | e_signup (2) | e_purchase (2)]
        model.task_table.weight[uo + 1, 2:] = torch.tensor([0.0, 1.0, 0.0, 1.0])
        model.task_table.weight[ao + 1, 2:] = torch.tensor([0.0, 1.0, 0.0, -1.0])
        model.task_table.weight[uo + 2, 2:] = torch.tensor([0.0, 1.0, 0.0, 1.0])
        model.task_table.weight[ao + 2, 2:] = torch.tensor([0.0, -1.0, 0.0, 1.0])
    users, ads = torch.tensor([uo + 1, uo + 2]), torch.tensor([ao + 1, ao + 2])
    labels = torch.tensor([[1, 0], [0, 1]])
    tasks = ("signup", "purchase")
    sep = entanglement_report(*stem_task_spaces(model, users, ads), labels, tasks)
    ent = entanglement_report(*stem_task_spaces(model, users, ads, shared_only=True), labels,
                              tasks)
    assert all(g.gap > 0.9 and g.agree == 1.0 for g in sep.contradictory)
    assert all(g.gap == 0.0 for g in ent.contradictory)


def test_render_table_and_svg() -> None:
    spectra = collapse_report(_trained_fwfm().model)
    text = render_table(spectra)
    assert "user.id" in text and "5/64" in text
    svg = render_spectra_svg(spectra, title="fwfm <test>")
    root = ET.fromstring(svg)  # well-formed XML
    assert root.tag.endswith("svg")
    assert svg.count("<polyline") == len(SPEC.names)
    assert "&lt;test&gt;" in svg


def test_collapse_watch_recomputes_every_n_publications() -> None:
    learner = _trained_fwfm()
    watch = CollapseWatch(every=3, max_rows=100)
    first = watch.update(learner.model)["collapse"]
    assert first["publication"] == 0 and first["max_rows"] == 100
    assert first["tables"] == compact(collapse_report(learner.model, 100))
    assert watch.update(learner.model)["collapse"]["publication"] == 0  # kept in between
    watch.update(learner.model)
    assert watch.update(learner.model)["collapse"]["publication"] == 3
    assert CollapseWatch(every=0).update(learner.model) == {}
    with pytest.raises(ValueError):
        CollapseWatch(every=-1)


# --- `ctrloop analyze` --------------------------------------------------------------------------


def _events_file(path: Path) -> Path:
    """Impressions whose click depends on ctx.hour only (its 4 values share SPEC's 7 buckets, so
    less than the ~0.17 nats of the values themselves): its MI is the largest."""
    rng = np.random.default_rng(3)
    lines = []
    for i in range(600):
        hour = int(rng.integers(0, 4))
        lines.append(json.dumps({
            "type": "impression", "impression_id": f"i{i}", "ts": 1767225600.0 + i,
            "user_id": f"u{rng.integers(0, 50)}", "ad_id": f"a{rng.integers(0, 20)}",
            "advertiser_id": "v1", "features": {"ctx.hour": str(hour)}}))
        if rng.random() < (0.6 if hour == 0 else 0.05):
            lines.append(json.dumps({"type": "click", "impression_id": f"i{i}",
                                     "ts": 1767225600.0 + i + 1}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_analyzes_a_snapshot_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    learner = _trained_fwfm()
    snap = tmp_path / "m.snapshot"
    snap.write_bytes(encode_snapshot(learner.model, 7, {}))
    plot = tmp_path / "s.svg"
    events = _events_file(tmp_path / "events.jsonl")
    assert main(["analyze", "--snapshot-file", str(snap), "--plot", str(plot), "--json",
                 "--events", str(events)]) == 0
    out = json.loads(capsys.readouterr().out)
    live = collapse_report(learner.model, None)
    assert [f["ia"] for f in out["fields"]] == pytest.approx([s.ia for s in live])
    assert [f["rows_trained"] for f in out["fields"]] == [5, 5, 5]
    mi = {m["field"]: m["mi_corrected"] for m in out["mutual_information"]}
    assert mi["ctx.hour"] > 0.01 and mi["ctx.hour"] == max(mi.values())
    ET.fromstring(plot.read_text())
    assert main(["analyze", "--snapshot-file", str(snap), "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "user.id" in text and "5/64" in text


def test_cli_analyzes_a_checkpoint_with_its_accumulators(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ctrloop.trainer.checkpoint import save_checkpoint

    learner = _trained_fwfm()
    state = {"spec": SPEC.to_dict(), "pipeline": {"learner": learner.state_dict()},
             "offsets": {}}
    save_checkpoint(tmp_path / "ckpt", state)
    argv = ["analyze", "--checkpoint", str(tmp_path / "ckpt"), "--plot",
            str(tmp_path / "s.svg"), "--json"]
    assert main([*argv, "--hparams", '{"dim": 4}']) == 0
    out = json.loads(capsys.readouterr().out)
    assert [f["rows_trained"] for f in out["fields"]] == [5, 5, 5]
    assert main(argv) == 2  # default dim 16 does not fit: says to pass --hparams
    assert "--hparams" in capsys.readouterr().err
    assert main([*argv, "--head", "pcvr"]) == 2
    assert "no pcvr learner" in capsys.readouterr().err


def test_cli_reads_a_registry_version(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from ctrloop.io.registry import InMemoryRegistry, RedisRegistry

    registry = InMemoryRegistry()
    monkeypatch.setattr(RedisRegistry, "from_url", classmethod(lambda cls, *a: registry))
    learner = _trained_fwfm()
    v = registry.next_version()
    registry.publish(v, encode_snapshot(learner.model, v, {}), {})
    plot = str(tmp_path / "s.svg")
    base = ["analyze", "--redis-url", "redis://x", "--plot", plot, "--json"]
    for which in (str(v), "current"):
        assert main([*base, "--snapshot", which]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["source"] == f"pctr version {v}" and len(out["fields"]) == 3
    assert main([*base, "--snapshot", "current", "--head", "pcvr"]) == 2
    assert "no pcvr model published" in capsys.readouterr().err
    assert main(["analyze", "--plot", plot]) == 2  # no source
    assert main([*base, "--snapshot", "1", "--snapshot-file", plot]) == 2  # two sources


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_architecture_gets_a_spectrum_per_field_and_table(name: str) -> None:
    accepted = model_parameters(name)
    hparams: dict[str, object] = {"dim": 4} if "dim" in accepted else {}
    if "tables" in accepted:
        hparams["tables"] = [4, 4]
    if "tasks" in accepted:
        hparams["tasks"] = ["a", "b"]
    learner = _trained_fwfm(steps=3, name=name, hparams=hparams)
    model = learner.model
    spectra = collapse_report(model)
    assert len(spectra) == len(model.embedding_tables()) * len(SPEC.fields)
    assert {s.table for s in spectra} == set(table_names(model))
    # `learn` without tasks trains STEM's first task only: task b's own rows stay untrained.
    untrained = [s for s in spectra if s.table == "task_table.b"]
    assert all(s.rows_trained == 0 and s.ia == 0.0 for s in untrained)
    assert all(s.rows_trained == 5 and 1.0 <= s.ia <= s.ia_max for s in spectra
               if s not in untrained)


def test_cli_reports_entanglement_of_a_multi_task_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ctrloop.core.events import Impression
    from ctrloop.core.features import FeatureEncoder

    def imp(i: str, user: str, ad: str) -> Impression:
        return Impression(impression_id=i, ts=1767225600.0, user_id=user, ad_id=ad,
                          advertiser_id="v1", features={"ctx.hour": "1"})

    enc = FeatureEncoder(SPEC)
    signup, purchase, ignored = imp("i1", "u1", "a1"), imp("i2", "u2", "a2"), imp("i3", "u3", "a3")
    model = build_model("stem", SPEC, tasks=["signup", "purchase"], dim=2, task_dim=2)
    with torch.no_grad():
        model.table.weight.zero_()
        model.task_table.weight.zero_()
        for e, own, other in ((signup, 1.0, -1.0), (purchase, -1.0, 1.0)):
            u, _, a = enc.encode(e)
            model.table.weight[u, 1:] = model.table.weight[a, 1:] = torch.tensor([1.0, 0.0])
            # task_table columns: [w_signup, w_purchase | e_signup (2) | e_purchase (2)]
            model.task_table.weight[u, 2:] = torch.tensor([0.0, 1.0, 0.0, 1.0])
            model.task_table.weight[a, 2:] = torch.tensor([0.0, own, 0.0, other])
    snap = tmp_path / "cvr.snapshot"
    snap.write_bytes(encode_snapshot(model, 3, {}))
    lines = [json.dumps({"type": "impression", "impression_id": e.impression_id, "ts": e.ts,
                         "user_id": e.user_id, "ad_id": e.ad_id, "advertiser_id": "v1",
                         "features": e.features}) for e in (signup, purchase, ignored)]
    lines += [json.dumps({"type": "click", "impression_id": i, "ts": 1767225601.0})
              for i in ("i1", "i2")]
    lines += [json.dumps({"type": "conversion", "impression_id": i, "ts": 1767225700.0,
                          "conversion_type": t}) for i, t in (("i1", "signup"),
                                                               ("i2", "purchase"))]
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(lines) + "\n")
    argv = ["analyze", "--snapshot-file", str(snap), "--plot", str(tmp_path / "s.svg"),
            "--events", str(events)]
    assert main([*argv, "--json"]) == 0
    ent = json.loads(capsys.readouterr().out)["entanglement"]
    assert ent["pairs"] == 2
    for g in ent["task_spaces"]["contradictory"]:
        assert g["pairs"] == 1 and g["gap"] > 0.9 and g["agree"] == 1.0
    assert all(g["gap"] == 0.0 for g in ent["shared_space"]["contradictory"])
    assert main(argv) == 0
    assert "interest entanglement over 2 clicked" in capsys.readouterr().out
