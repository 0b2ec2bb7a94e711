"""The `ctrloop` command: exit codes and messages at the edge."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
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


# ---------------------------------------------------------------------------- stack, drive

class _Started(Exception):
    """Raised by a stand-in for anything that would start a server or a child."""


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ctrloop stack` may not start anything: every way to start a process raises."""
    from ctrloop.dev import stack
    from ctrloop.dev.localservers import KafkaBroker, RedisServer

    def started(*_: object, **__: object) -> None:
        raise _Started("a server or child was started")

    monkeypatch.setattr(stack, "check_binaries", lambda: None)
    for cls in (KafkaBroker, RedisServer, stack.ChildProcess):
        monkeypatch.setattr(cls, "start", started)


@pytest.mark.parametrize(("flag", "value"), [
    ("--rate", "-5"), ("--rate", "0"), ("--rate", "nan"), ("--rate", "inf"),
    ("--rate", "20000"), ("--duration", "0"), ("--duration", "-1"), ("--duration", "nan"),
    ("--port", "-1"), ("--port", "70000"), ("--workers", "0"), ("--workers", "65"),
    ("--seed", "-1"), ("--click-window", "0"), ("--click-window", "-3"),
    ("--click-window", "nan"),
])
def test_stack_checks_every_numeric_flag_before_starting_anything(
        flag: str, value: str, tmp_path: Path, nothing_starts: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    # `--rate -5` was refused only by the driver, after the whole stack had started (11 s).
    t0 = time.monotonic()
    rc = main(["stack", "--workdir", str(tmp_path / "w"), flag, value])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"ctrloop: error: {flag} must be" in err, err
    assert time.monotonic() - t0 < 2.0
    assert not (tmp_path / "w").exists()  # not even the work dir


def test_a_second_stack_in_the_same_workdir_is_refused_naming_the_first(
        tmp_path: Path, nothing_starts: None, capsys: pytest.CaptureFixture[str]) -> None:
    # The second stack used to delete the first one's trainer/ checkpoint and crash it.
    workdir = tmp_path / "w"
    (workdir / "trainer").mkdir(parents=True)
    (workdir / "trainer" / "checkpoint").write_text("the first stack's")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from pathlib import Path\n"
         "from ctrloop.dev.stack import WorkdirLock\n"
         "lock = WorkdirLock(Path(sys.argv[1]))\n"
         "lock.acquire()\n"
         "print('locked', flush=True)\n"
         "time.sleep(60)\n", str(workdir)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        rc = main(["stack", "--workdir", str(workdir), "--duration", "5"])
        assert rc == 2
        err = capsys.readouterr().err
        assert f"another ctrloop stack (pid {holder.pid}) is running in {workdir}" in err, err
        assert (workdir / "trainer" / "checkpoint").read_text() == "the first stack's"
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone (kill -9 included): the kernel dropped its lock, no stale lock.
    from ctrloop.dev.stack import WorkdirLock

    with WorkdirLock(workdir) as lock:
        assert lock.path.read_text().strip() == str(os.getpid())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_drive_against_nothing_fails_at_once_saying_what_to_start(
        capsys: pytest.CaptureFixture[str]) -> None:
    # It used to run for --duration and exit 0 with "errors 200".
    url = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    assert main(["drive", "--url", url, "--duration", "30"]) == 2
    assert time.monotonic() - t0 < 10.0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("ctrloop: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"the service at {url} is unreachable" in lines[0]
    assert "ctrloop serve" in lines[0]


class _Refusing(http.server.BaseHTTPRequestHandler):
    """Something that answers HTTP, but never a score."""

    def do_GET(self) -> None:
        self._answer(200)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self._answer(500)

    def _answer(self, status: int) -> None:
        self.send_response(status)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *_: object) -> None:
        pass


def test_drive_where_no_request_succeeds_exits_non_zero(
        capsys: pytest.CaptureFixture[str]) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert main(["drive", "--url", url, "--duration", "1", "--rate", "20"]) == 2
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert f"ctrloop: error: no request to {url}/v1/score succeeded" in err, err
    assert "'500'" in err


@pytest.mark.parametrize(("flag", "value"), [
    ("--rate", "-5"), ("--duration", "-1"), ("--interval", "0"), ("--seed", "-1")])
def test_drive_checks_its_flags_before_sending_anything(
        flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    assert main(["drive", "--url", url, flag, value]) == 2
    err = capsys.readouterr().err
    assert "ctrloop: error:" in err and "unreachable" not in err, err


def test_delay_report_without_redis_says_what_to_run_or_set(
        capsys: pytest.CaptureFixture[str]) -> None:
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    assert main(["delay-report", "--redis-url", url]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("ctrloop: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "registry unreachable" in lines[0] and "--redis-url" in lines[0]
    assert "ctrloop stack" in lines[0] and "--checkpoint-dir" in lines[0]


def test_serve_warns_that_admin_token_on_the_command_line_shows_in_ps(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import uvicorn

    # `ctrloop serve` hands its settings to the workers through os.environ: keep them out of
    # the other tests (CTRLOOP_ADMIN_TOKEN leaking here enabled admin routes elsewhere).
    monkeypatch.setattr(os, "environ", dict(os.environ))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    assert main(["serve", "--port", "18000", "--admin-token", "s3cret-token"]) == 0
    assert "set CTRLOOP_ADMIN_TOKEN in the environment instead" in capsys.readouterr().err
    monkeypatch.setenv("CTRLOOP_ADMIN_TOKEN", "s3cret-token")
    assert main(["serve", "--port", "18000"]) == 0
    assert "CTRLOOP_ADMIN_TOKEN" not in capsys.readouterr().err


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"ctrloop {version('ctrloop')}"


def test_replay_writes_a_snapshot_that_analyze_reads(simulated: tuple[Path, Path],
                                                     tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from ctrloop.core.snapshot import build_from_snapshot, decode_snapshot

    events, _ = simulated
    snap = tmp_path / "final.snapshot"
    rc = main(["replay", "--events", str(events), "--predictions-out",
               str(tmp_path / "p.jsonl"), "--click-window", "5", "--allowed-lateness", "1",
               "--dim", "4", "--batch-size", "64", "--snapshot-out", str(snap)])
    assert rc == 0
    decoded = decode_snapshot(snap.read_bytes())
    model = build_from_snapshot(decoded)
    assert model.name == "fwfm" and model.posterior is not None
    assert decoded.meta["source"] == "replay" and decoded.meta["collapse"]["tables"]
    capsys.readouterr()
    assert main(["analyze", "--snapshot-file", str(snap), "--json"]) == 0
    fields = json.loads(capsys.readouterr().out)["fields"]
    assert {f["field"] for f in fields} >= {"user.id", "ad.id"}
    assert any(f["rows_trained"] > 0 for f in fields)
