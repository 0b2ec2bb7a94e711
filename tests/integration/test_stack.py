"""`ctrloop stack` end to end: a real broker, redis-server, trainer and service, driven by the
simulator. Once the served model has learned from enough traffic, it must have advanced, its
pCTR must rank fresh traffic better than a constant, and the CTR of what it serves must rise
above what the prior served. Ctrl-C and SIGTERM must stop every process the stack started.

The learning run is bounded by traffic volume, not by wall-clock time: it lasts until the
served model has learned TARGET_SAMPLES samples, then AFTER_TARGET_S more seconds of traffic
(the buckets the CTR comparison uses), up to MAX_RUN_S. A fixed 110 s run once failed CI on a
loaded 2-core machine (lift +3.7%, unloaded ~+21%): with less CPU the trainer had simply
learned from less traffic by then.

Measured on the 2-core development machine (stack at 60 requests/s, 10 runs of the earlier
110 s version): the first trained model is served 36-37 s in (the trainer's first 30 s click
window has to close); the expected CTR of served ads goes from 3.65% under the prior to
4.45-4.7% a minute later (+22-28%; oracle 7.2%, random 3.1%).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from ctrloop.core.errors import CtrloopError
from ctrloop.dev.localservers import KafkaBroker
from ctrloop.dev.stack import Stack, StackConfig, StopRequest, check_binaries

pytestmark = pytest.mark.integration

RATE = 60  # requests/s: enough data to learn from in a minute, modest on 2 cores
# Samples learned by the served model before the comparison window starts: what an unloaded
# run at RATE has learned ~90 s in (~100 impressions/s, learned ~35 s after they were shown).
TARGET_SAMPLES = 5500
AFTER_TARGET_S = 40.0  # then this much traffic: the last 3 full 10 s buckets are compared
MAX_RUN_S = 420.0  # a bound for a machine so slow that the target never comes
CLICK_WINDOW_S = 30.0  # the stack's default: no model can be trained before it has closed
UP_LINE = "ctrloop stack is up"


@pytest.fixture(scope="module", autouse=True)
def _binaries() -> None:
    try:
        check_binaries()
    except CtrloopError as e:
        pytest.skip(str(e))


# ---------------------------------------------------------------------------- processes

def _stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[1]), fields[0], int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "?"


def _descendants(root: int) -> dict[int, tuple[int, str]]:
    """pid -> (start time, command line) of every live descendant of `root`."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            children.setdefault(st[0], []).append(int(entry))
            starts[int(entry)] = st[2]
    out: dict[int, tuple[int, str]] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out[child] = (starts[child], _cmdline(child))
            todo.append(child)
    return out


def _still_running_pids(procs: dict[int, tuple[int, str]]) -> list[int]:
    """The processes of `procs` still running (same pid and start time, not a zombie)."""
    left = []
    for pid, (start, _) in procs.items():
        st = _stat(pid)
        if st is not None and st[2] == start and st[1] != "Z":
            left.append(pid)
    return left


def _still_running(procs: dict[int, tuple[int, str]]) -> list[str]:
    return [f"{pid}: {procs[pid][1]}" for pid in _still_running_pids(procs)]


def _clean_env() -> dict[str, str]:
    # The stack configures its children; stray CTRLOOP_* settings of the caller must not.
    return {k: v for k, v in os.environ.items() if not k.startswith("CTRLOOP_")}


@dataclass
class StackRun:
    proc: subprocess.Popen[bytes]
    out_path: Path
    workdir: Path
    children: dict[int, tuple[int, str]]
    samples_at_target: int = 0  # samples_seen of the served model when the target was checked

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def watch(self, seconds: float) -> None:
        """Let it run, noting every process it starts (children may come and go)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"the stack exited early:\n{self.output()}"
            self.children.update(_descendants(self.proc.pid))
            time.sleep(min(2.0, max(end - time.monotonic(), 0.0)))

    def stop(self, sig: signal.Signals, timeout: float = 60.0) -> int:
        self.children.update(_descendants(self.proc.pid))
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Where is it stuck? `ctrloop stack` dumps every thread's stack on SIGUSR1.
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            self.kill()
            pytest.fail(f"the stack did not stop within {timeout:.0f} s of {sig.name}; "
                        f"its output:\n{self.output()}")

    def kill(self) -> None:
        """Last resort for a failed test: nothing of ours may outlive it."""
        for pid in _still_running_pids(self.children):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait(timeout=10)

    def summary(self) -> dict[str, Any]:
        return json.loads((self.workdir / "stack-summary.json").read_text())


def _start(workdir: Path, *args: str) -> StackRun:
    workdir.mkdir(parents=True, exist_ok=True)
    out_path = workdir / "stack.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ctrloop.cli", "stack", "--port", "0", "--workdir",
             str(workdir), *args],
            stdout=out, stderr=subprocess.STDOUT, env=_clean_env())
    return StackRun(proc, out_path, workdir, {})


def _wait_until(run: StackRun, done: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not done():
        if run.proc.poll() is not None or time.monotonic() > end:
            run.kill()
            pytest.fail(f"{what} did not happen; stack output:\n{run.output()}")
        run.children.update(_descendants(run.proc.pid))
        time.sleep(0.2)


def _wait_up(run: StackRun, timeout: float = 90.0) -> None:
    _wait_until(run, lambda: UP_LINE in run.output(), timeout, "the stack starting")


# ---------------------------------------------------------------------------- learning run

def _service_url(output: str) -> str:
    match = re.search(r"^  service +(http://\S+)$", output, re.M)
    assert match is not None, f"no service URL in the stack's output:\n{output}"
    return match.group(1)


def _samples_served(url: str) -> int:
    """samples_seen of the model the service serves now (0 for the prior or no answer)."""
    try:
        serving = httpx.get(f"{url}/v1/models", timeout=5.0).json()["serving"]
    except (httpx.HTTPError, ValueError, KeyError):
        return 0
    if serving.get("status") != "trained":
        return 0
    return int(serving.get("samples_seen") or 0)


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackRun]:
    """One stack with simulated traffic until the served model has learned TARGET_SAMPLES
    samples, AFTER_TARGET_S more seconds of traffic, then Ctrl-C (SIGINT)."""
    run = _start(tmp_path_factory.mktemp("stack"), "--rate", str(RATE),
                 "--duration", str(MAX_RUN_S + 120))  # --duration only guards a stuck test
    try:
        _wait_up(run)
        url = _service_url(run.output())
        end = time.monotonic() + MAX_RUN_S - AFTER_TARGET_S
        while _samples_served(url) < TARGET_SAMPLES and time.monotonic() < end:
            run.watch(2.0)
        run.samples_at_target = _samples_served(url)
        run.watch(AFTER_TARGET_S)
        run.stop(signal.SIGINT)
        yield run
    finally:
        if run.proc.poll() is None:
            run.kill()


def test_ctrl_c_stops_the_stack_and_every_child(learned: StackRun) -> None:
    assert learned.proc.returncode == 0, learned.output()
    cmds = " | ".join(cmd for _, cmd in learned.children.values())
    for child in ("tansu broker", "redis-server", "ctrloop.cli train", "ctrloop.cli serve"):
        assert child in cmds
    assert _still_running(learned.children) == []
    out = learned.output()
    for what in ("/docs", "/metrics", "/v1/models", "Kafka", "Redis", "service.log"):
        assert what in out
    assert learned.summary()["interrupted"] is True


def test_the_output_fits_100_columns_and_ends_with_the_plots(learned: StackRun) -> None:
    """Not a terminal here: plain lines, no escape codes, none wider than 100 columns (but
    those naming a path under the test's long temporary directory)."""
    out = learned.output()
    assert "\x1b" not in out
    wide = [ln for ln in out.splitlines() if len(ln) > 100 and str(learned.workdir) not in ln]
    assert wide == []
    assert "trainer AUC" not in out
    assert re.search(r"^  CTR \d+\.\d+% \(oracle \d+\.\d+%, random \d+\.\d+%\) \| AUC 0\.\d+",
                     out, re.M), out
    plots = learned.workdir / "plots"
    for name in ("ctr.svg", "fresh-auc.svg", "calibration.svg", "versions.svg"):
        svg = (plots / name).read_text()
        assert svg.startswith("<svg") and f"  {plots / name}" in out.splitlines()
    timeline = learned.summary()["timeline"]
    served = re.search(r'data-name="served" points="([^"]*)"', (plots / "ctr.svg").read_text())
    assert served is not None
    assert len(served.group(1).split()) == sum(b["expected_ctr"] is not None for b in timeline)


def _trained_versions(summary: dict[str, Any]) -> set[int]:
    return {int(v) for b in summary["timeline"] for v in b["versions"] if v != "prior"}


def test_served_model_version_advances(learned: StackRun) -> None:
    s = learned.summary()
    errors = s["final"]["score_errors"]
    # No error status ever; a rare transport error (a keep-alive connection closed by the
    # server just as it is reused) is tolerated, not retried: the request may have logged.
    assert not any(k.isdigit() for k in errors), errors
    assert sum(errors.values()) <= 0.001 * s["final"]["requests"], errors
    # In event time, not wall time: nothing can be learned before the first click window
    # has closed, however fast or slow the machine (a wall-clock bound failed under load).
    first = s["final"]["first_trained_s"]
    assert first is not None and first >= CLICK_WINDOW_S, first
    assert learned.samples_at_target >= TARGET_SAMPLES, (
        f"the served model learned only {learned.samples_at_target} samples in "
        f"{MAX_RUN_S:.0f} s: the machine is too slow for this test")
    versions = _trained_versions(s)
    assert len(versions) >= 10, versions  # hot reloads keep coming (~1 per second)
    served = [int(m["version"]) for m in s["models"] if m["status"] == "trained"]
    assert served == sorted(served) and served[-1] > served[0]
    assert s["models"][-1]["samples_seen"] > 2000


def test_served_pctr_ranks_fresh_traffic_better_than_a_constant(learned: StackRun) -> None:
    # The last 30 s of impressions, all scored by models that learned TARGET_SAMPLES or more.
    # The AUC is against the true CTR (expected over the click draw): a constant scores exactly 0.5
    # and there is no click noise, so the margin is the model's alone. Measured 0.57-0.61 in
    # ten runs (against the drawn clicks 0.55-0.63, which wobbles with ~130 clicks); the
    # truth itself as the score gets ~0.78.
    fresh = learned.summary()["served_auc_last"]
    assert fresh["n"] > 1000, fresh  # ~3000 at the full rate; a loaded driver sends fewer
    assert fresh["auc_true_ctr"] > 0.56, fresh


def test_expected_ctr_of_served_ads_rises_over_the_prior(learned: StackRun) -> None:
    ctr = learned.summary()["ctr"]
    prior, trained = ctr["prior"], ctr["trained"]
    assert prior["impressions"] > 1000 and trained["impressions"] > 1000
    assert ctr["rose"]
    assert trained["expected_ctr"] > 1.1 * prior["expected_ctr"], ctr
    assert trained["expected_ctr"] < trained["oracle_ctr"]
    assert prior["random_ctr"] < trained["expected_ctr"]


# ---------------------------------------------------------------------------- SIGTERM

def _trainer_started(run: StackRun) -> bool:
    return (run.workdir / "logs" / "trainer.log").exists()


@pytest.mark.parametrize("when", ["starting", "running"])
def test_sigterm_stops_every_child(tmp_path: Path, when: str) -> None:
    run = _start(tmp_path, "--no-simulator", "--duration", "120")
    try:
        if when == "starting":
            _wait_until(run, lambda: _trainer_started(run), 60.0, "the trainer starting")
        else:
            _wait_up(run)
            run.watch(2.0)
        code = run.stop(signal.SIGTERM)
        assert code == 0, run.output()
        assert run.children, "the stack had started nothing yet"
        assert _still_running(run.children) == []
        assert "stopping the stack" in run.output()
    finally:
        if run.proc.poll() is None:
            run.kill()


def test_a_signal_while_starting_stops_at_the_next_step_with_everything_tracked(
        tmp_path: Path) -> None:
    """The first SIGINT/SIGTERM only sets a flag; startup checks it between steps, so it
    never unwinds from inside a half-done `Popen` (which once left a child untracked)."""
    stop = StopRequest()
    stack = Stack(StackConfig(workdir=tmp_path, port=0, simulator=False), io.StringIO(), stop)
    real_start = KafkaBroker.start

    def start_then_signal(self: KafkaBroker) -> KafkaBroker:
        started = real_start(self)
        stop(signal.SIGTERM, None)  # as if it arrived while the broker was starting
        return started

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(KafkaBroker, "start", start_then_signal)
            with pytest.raises(KeyboardInterrupt):
                stack.start()
        assert stack.kafka is not None and stack.kafka.is_running()
        assert stack.redis is None and stack.children == {}  # nothing after the signal
    finally:
        stack.close()
    assert stack.kafka is not None and not stack.kafka.is_running()
    with pytest.raises(KeyboardInterrupt):
        stop(signal.SIGTERM, None)  # a second signal: stop waiting
