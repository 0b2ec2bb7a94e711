"""The `ctrloop` command: exit codes and messages at the edge."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from ctrloop.cli import main


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("CTRLOOP_"):
            monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cli")
    events, truth = d / "events.jsonl", d / "truth.jsonl"
    rc = main(["simulate", "--impressions", "600", "--rate", "50", "--seed", "2",
               "--events-out", str(events), "--truth-out", str(truth)])
    assert rc == 0
    return events, truth


def test_simulate_writes_events_and_truth(simulated: tuple[Path, Path]) -> None:
    events, truth = simulated
    assert len(truth.read_bytes().splitlines()) == 600
    kinds = [json.loads(x)["type"] for x in events.read_bytes().splitlines()]
    assert kinds.count("impression") == 600 and "click" in kinds


def test_simulate_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["simulate", "--impressions", "50", "--events-out", str(tmp_path / "e.jsonl"),
               "--truth-out", str(tmp_path / "t.jsonl")])
    assert rc == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["impressions"] == 50
    assert "wrote 50 impressions" in out.err


def test_replay_writes_outputs(simulated: tuple[Path, Path], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    events, truth = simulated
    pred = tmp_path / "pred.jsonl"
    summary_out = tmp_path / "summary.json"
    rc = main(["replay", "--events", str(events), "--predictions-out", str(pred),
               "--click-window", "5", "--allowed-lateness", "1", "--dim", "4",
               "--batch-size", "64", "--summary-out", str(summary_out), "--truth", str(truth)])
    assert rc == 0
    assert len(pred.read_bytes().splitlines()) == 600
    assert (tmp_path / "pred.jsonl.rejects.jsonl").read_bytes() == b""
    spec_path = tmp_path / "pred.jsonl.spec.json"
    assert json.loads(spec_path.read_text())["fields"]
    summary = json.loads(summary_out.read_text())
    assert summary["predictions"] == 600 and summary["rejected"] == 0
    assert summary["spec_inferred"] is True
    assert "evaluation" in summary
    out = capsys.readouterr()
    assert json.loads(out.out)["predictions"] == 600
    assert "feature spec inferred" in out.err and str(spec_path) in out.err

    # The saved spec can be passed back.
    pred2 = tmp_path / "pred2.jsonl"
    rc = main(["replay", "--events", str(events), "--predictions-out", str(pred2),
               "--click-window", "5", "--allowed-lateness", "1", "--dim", "4",
               "--batch-size", "64", "--feature-spec", str(spec_path)])
    assert rc == 0
    assert pred2.read_bytes() == pred.read_bytes()


@dataclass(frozen=True)
class Bad:
    name: str
    args: list[str]
    message: str


BAD = [
    Bad("missing events file", ["--events", "{tmp}/nope.jsonl"],
        "ctrloop: error: events file {tmp}/nope.jsonl does not exist"),
    Bad("negative click window", ["--click-window", "-1"], "ctrloop: invalid settings"),
    Bad("zero click window", ["--click-window", "0"], "click_window"),
    Bad("zero publish interval", ["--publish-interval", "0"], "publish_interval"),
    Bad("negative lateness", ["--allowed-lateness", "-3"], "allowed_lateness"),
    Bad("zero batch size", ["--batch-size", "0"], "batch_size"),
    Bad("unknown model", ["--model", "dnn"], "unknown model 'dnn'"),
    Bad("missing feature spec", ["--feature-spec", "{tmp}/spec.json"],
        "cannot read feature spec"),
]


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.name)
def test_replay_errors_exit_2_with_a_message(case: Bad, simulated: tuple[Path, Path],
                                             tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    events, _ = simulated
    args = ["replay", "--events", str(events), "--predictions-out", str(tmp_path / "p.jsonl")]
    args += [a.replace("{tmp}", str(tmp_path)) for a in case.args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert case.message.replace("{tmp}", str(tmp_path)) in err
    assert "Traceback" not in err
    assert not (tmp_path / "p.jsonl").exists()


def test_settings_from_the_environment_are_validated(
        simulated: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CTRLOOP_CLICK_WINDOW", "-5")
    rc = main(["replay", "--events", str(simulated[0]), "--predictions-out",
               str(tmp_path / "p.jsonl")])
    assert rc == 2
    assert "click_window" in capsys.readouterr().err


def test_usage_errors_are_argparse_exits(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["replay"])
    assert info.value.code == 2
    assert "--events" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])
