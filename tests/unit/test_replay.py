"""Replay of an events file: predictions, rejects, determinism, the inferred spec."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from ctrloop.core.errors import ConfigError
from ctrloop.core.features import FeatureSpec
from ctrloop.core.joining import JoinerConfig
from ctrloop.core.learner import LearnerConfig
from ctrloop.sim import WorldConfig, write_files
from ctrloop.trainer.pipeline import PipelineConfig
from ctrloop.trainer.replay import REJECT_PAYLOAD_BYTES, outputs_for, read_events, replay

N_IMPRESSIONS = 3000
CONFIG = PipelineConfig(
    publish_interval=1.0,
    allowed_lateness=5.0,
    joiner=JoinerConfig(click_window=20.0),
    learner=LearnerConfig(batch_size=128, hparams={"dim": 4}),
)


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("replay")
    summary = write_files(WorldConfig(impressions_per_second=40, seed=5), N_IMPRESSIONS,
                          d / "events.jsonl", d / "truth.jsonl")
    return {"dir": d, "events": d / "events.jsonl", "summary": summary}


@pytest.fixture(scope="module")
def first(sim: dict[str, Any]) -> dict[str, Any]:
    out = outputs_for(sim["dir"] / "run1" / "pred.jsonl")
    out.predictions.parent.mkdir()
    summary = replay(sim["events"], out, config=CONFIG)
    return {"out": out, "summary": summary}


def test_outputs_for_defaults(tmp_path: Path) -> None:
    out = outputs_for(tmp_path / "p.jsonl")
    assert out.rejects == tmp_path / "p.jsonl.rejects.jsonl"
    assert out.spec == tmp_path / "p.jsonl.spec.json"
    other = outputs_for(tmp_path / "p.jsonl", tmp_path / "r", tmp_path / "s")
    assert (other.rejects, other.spec) == (tmp_path / "r", tmp_path / "s")


def test_one_prediction_per_impression(sim: dict[str, Any], first: dict[str, Any]) -> None:
    events = lines(sim["events"])
    imps = [e["impression_id"] for e in events if e["type"] == "impression"]
    preds = lines(first["out"].predictions)
    assert len(imps) == N_IMPRESSIONS
    assert [p["impression_id"] for p in preds] == imps
    assert all(set(p) == {"impression_id", "pctr", "pctr_std", "pcvr", "model_version"}
               for p in preds)
    assert all(0 < p["pctr"] < 1 and 0 < p["pcvr"] < 1 and p["pctr_std"] > 0 for p in preds)
    s = first["summary"]
    assert s["predictions"] == s["pipeline"]["impressions"] == N_IMPRESSIONS
    assert s["rejected"] == 0 and first["out"].rejects.read_bytes() == b""
    assert s["lines"] == len(events)
    assert s["join"]["positives"] + s["join"]["negatives"] == N_IMPRESSIONS
    assert s["pending"] == 0


def test_served_versions_follow_event_time(sim: dict[str, Any], first: dict[str, Any]) -> None:
    ts = {e["impression_id"]: e["ts"] for e in lines(sim["events"]) if e["type"] == "impression"}
    preds = sorted(lines(first["out"].predictions), key=lambda p: ts[p["impression_id"]])
    versions = [int(p["model_version"]) for p in preds]
    assert versions == sorted(versions)  # non-decreasing in ts order
    # The first impressions come before anything could be learned: the prior, version "0".
    early = [p for p in preds if ts[p["impression_id"]] < ts[preds[0]["impression_id"]] + 20]
    assert early and all(p["model_version"] == "0" for p in early)
    assert versions[-1] > 10
    assert int(first["summary"]["model_version"]) >= versions[-1]
    # Impressions with the same ts were served by the same model.
    by_ts: dict[float, set[int]] = {}
    for p, v in zip(preds, versions, strict=True):
        by_ts.setdefault(ts[p["impression_id"]], set()).add(v)
    assert all(len(vs) == 1 for vs in by_ts.values())


def test_replay_is_deterministic(sim: dict[str, Any], first: dict[str, Any]) -> None:
    out = outputs_for(sim["dir"] / "run2" / "pred.jsonl")
    out.predictions.parent.mkdir()
    summary = replay(sim["events"], out, config=CONFIG)
    assert out.predictions.read_bytes() == first["out"].predictions.read_bytes()
    assert out.spec.read_bytes() == first["out"].spec.read_bytes()
    for key in ("pipeline", "join", "features", "metrics", "model_version", "spec_hash"):
        assert summary[key] == first["summary"][key], key


def test_inferred_spec_is_saved_and_reusable(sim: dict[str, Any],
                                            first: dict[str, Any]) -> None:
    s = first["summary"]
    assert s["spec_inferred"] is True and s["spec_path"] == str(first["out"].spec)
    spec = FeatureSpec.load(first["out"].spec)
    assert spec.hash == s["spec_hash"]
    assert {"user.id", "ad.id", "ad.advertiser_id", "user.age", "ad.bid"} <= set(spec.names)
    # Passed back explicitly, the spec gives the same replay.
    out = outputs_for(sim["dir"] / "run3" / "pred.jsonl")
    out.predictions.parent.mkdir()
    again = replay(sim["events"], out, spec=spec, config=CONFIG)
    assert again["spec_inferred"] is False and again["spec_path"] is None
    assert not out.spec.exists()
    assert out.predictions.read_bytes() == first["out"].predictions.read_bytes()


@dataclass(frozen=True)
class BadLine:
    name: str
    raw: bytes
    reason: str


BAD_LINES = [
    BadLine("not JSON", b'{"type": "impression", "impression_id": ', "not valid JSON"),
    BadLine("NaN ts", b'{"type":"click","impression_id":"x","ts":NaN}', "not valid JSON"),
    BadLine("infinite ts", b'{"type":"click","impression_id":"x","ts":1e999}', "not valid JSON"),
    BadLine("10 MB string",
            b'{"type":"impression","impression_id":"big","ts":1767225601.0,"user_id":"u",'
            b'"ad_id":"a","advertiser_id":"v","features":{"user.age":"'
            + b"x" * (10 << 20) + b'"}}', "bytes, at most 65536 allowed"),
    BadLine("missing id", b'{"type":"click","ts":1767225601.0}', "missing field 'impression_id'"),
    BadLine("unknown type", b'{"type":"view","impression_id":"x","ts":1767225601.0}',
            "unknown event type 'view'"),
    BadLine("ts in milliseconds", b'{"type":"click","impression_id":"x","ts":1767225601000}',
            "is not a Unix time"),
]


def test_bad_lines_go_to_rejects_and_the_replay_goes_on(sim: dict[str, Any],
                                                        first: dict[str, Any],
                                                        tmp_path: Path) -> None:
    good = sim["events"].read_bytes().splitlines(keepends=True)
    # Interleave: a bad line after every 150 good ones, and a blank line (skipped, not rejected).
    mixed: list[bytes] = []
    expected: dict[int, BadLine] = {}
    bad_iter = iter(BAD_LINES)
    for i, line in enumerate(good):
        mixed.append(line)
        if i % 150 == 149:
            bad = next(bad_iter, None)
            if bad is not None:
                mixed.append(bad.raw + b"\n")
                expected[len(mixed)] = bad
    mixed.append(b"\n")
    assert len(expected) == len(BAD_LINES)
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"".join(mixed))
    out = outputs_for(tmp_path / "pred.jsonl")
    spec = FeatureSpec.load(first["out"].spec)
    summary = replay(path, out, spec=spec, config=CONFIG)

    rejects = lines(out.rejects)
    assert [r["line"] for r in rejects] == sorted(expected)
    for r in rejects:
        case = expected[r["line"]]
        assert case.reason in r["reason"], case.name
        assert r["payload"].rstrip("\n").encode() == case.raw[:REJECT_PAYLOAD_BYTES]
    assert summary["rejected"] == len(BAD_LINES)
    assert summary["lines"] == len(mixed)
    # The valid events were all replayed, exactly as without the bad lines.
    assert out.predictions.read_bytes() == first["out"].predictions.read_bytes()
    assert summary["pipeline"] == first["summary"]["pipeline"]


def test_unknown_feature_names_are_counted(sim: dict[str, Any], first: dict[str, Any],
                                           tmp_path: Path) -> None:
    out_lines = []
    added = 0
    for raw in sim["events"].read_bytes().splitlines():
        e = orjson.loads(raw)
        if e["type"] == "impression" and added < 40:
            e["features"]["ctx.new_signal"] = added % 3
            e["features"]["experiment"] = "b"
            added += 1
        out_lines.append(orjson.dumps(e))
    path = tmp_path / "extra.jsonl"
    path.write_bytes(b"\n".join(out_lines) + b"\n")
    spec = FeatureSpec.load(first["out"].spec)
    summary = replay(path, outputs_for(tmp_path / "pred.jsonl"), spec=spec, config=CONFIG)
    assert summary["features"]["unknown_features"] == 80
    assert summary["features"]["unknown_names"] == {"ctx.new_signal": 40, "experiment": 40}
    assert summary["rejected"] == 0
    assert summary["pipeline"]["learned"] == first["summary"]["pipeline"]["learned"]


def test_missing_events_file(tmp_path: Path) -> None:
    out = outputs_for(tmp_path / "pred.jsonl")
    with pytest.raises(ConfigError, match="does not exist"):
        replay(tmp_path / "nope.jsonl", out, config=CONFIG)
    assert not out.predictions.exists()


def test_no_impression_to_infer_a_spec_from(tmp_path: Path) -> None:
    path = tmp_path / "clicks.jsonl"
    path.write_bytes(b'{"type":"click","impression_id":"a","ts":1767225600.0}\n{bad\n')
    with pytest.raises(ConfigError, match="no valid impression to infer a feature spec"):
        replay(path, outputs_for(tmp_path / "pred.jsonl"), config=CONFIG)


def test_read_events_counts(tmp_path: Path, sim: dict[str, Any]) -> None:
    path = tmp_path / "few.jsonl"
    head = sim["events"].read_bytes().splitlines(keepends=True)[:5]
    path.write_bytes(b"".join(head) + b"\n" + b"[]\n")
    counts: dict[str, int] = {}
    got = list(read_events(path, None, counts))
    assert len(got) == 5
    assert counts == {"lines": 7, "rejected": 1}


def test_replay_of_a_copy_elsewhere_is_identical(sim: dict[str, Any], first: dict[str, Any],
                                                tmp_path: Path) -> None:
    # Nothing depends on the file's name or place (no path-derived seeds).
    copy = tmp_path / "other-name.jsonl"
    shutil.copy(sim["events"], copy)
    out = outputs_for(tmp_path / "p.jsonl")
    replay(copy, out, config=CONFIG)
    assert out.predictions.read_bytes() == first["out"].predictions.read_bytes()
