"""`ctrloop stack`: the whole loop on one machine, with simulated users driving it.

Starts a Kafka-protocol broker (Tansu) and redis-server from the pip wheels, creates the topics,
runs `ctrloop train` and `ctrloop serve` as child processes, waits for the service, and then
plays the simulator's traffic through it (ctrloop/sim/live.py), printing a live view: is the
served model getting better, and how close does it get to the oracle?

Every child runs in its own process group with `PR_SET_PDEATHSIG`, and is stopped (SIGTERM to
the group, wait, SIGKILL) on Ctrl-C, SIGTERM, `--duration`, or any error: nothing is left
behind. A child that dies on its own stops the stack with the tail of its log.

The broker keeps everything in memory, so each run starts from nothing: the trainer's old
checkpoint under the workdir is removed at start (its offsets would point into the previous
broker's topics).

`--conversion-mix funnel` gives the simulated world two conversion types (a fast, streamed
"signup" and a slow "purchase"); the driver runs in this process, so only it needs the flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import httpx

from ctrloop.core import plots
from ctrloop.core.errors import ConfigError, CtrloopError
from ctrloop.core.plots import write_svg
from ctrloop.dev.localservers import (
    HOST,
    BinaryNotFoundError,
    KafkaBroker,
    RedisServer,
    ServerError,
    _make_pdeathsig_preexec,
    find_binary,
    free_port,
)
from ctrloop.io.settings import ConnectionSettings
from ctrloop.sim.live import (
    DriverConfig,
    DriverStats,
    LiveDriver,
    ctr_lift,
    run_with_reports,
    stop_on_signals,
)
from ctrloop.sim.world import CONVERSION_MIXES

DEFAULT_PORT = 8000
READY_TIMEOUT_S = 90.0
LAST_WINDOW_S = 30.0  # "fresh traffic" in the summary: impressions of the last 30 s
STOP_TIMEOUT_S = 15.0  # the service drains for up to 10 s, the trainer checkpoints
MAX_RATE = 10_000.0  # requests/s: DriverConfig's bound, checked before anything starts
LOCK_NAME = "stack.lock"
# What the simulator knows and the service cannot (the truth behind each click): written here
# every view interval, served to the dashboard (service/routes/dashboard.py reads the path from
# CTRLOOP_SIM_STATUS_FILE).
SIM_STATUS_NAME = "sim-status.json"
VIEW_WIDTH = 100  # columns: every line the stack prints fits (issue 15)
SIM_STATUS_KEEP = 720  # timeline buckets and AUC points kept: 2 h of 10 s buckets


class StackError(CtrloopError):
    """The stack could not start or a part of it died."""


@dataclass(frozen=True)
class StackConfig:
    workdir: Path = Path("runs/stack")
    port: int | None = None  # None: 8000, or a free port if 8000 is taken; 0: any free port
    workers: int = 1
    rate: float = 40.0
    duration: float | None = None
    seed: int = 0
    simulator: bool = True
    explore: bool = True  # simulated requests ask for Thompson sampling
    # Short, so the first model arrives ~35 s in: a fresh trainer learns nothing until its
    # first window has closed. It labels clicks later than this negative (~40% of the world's
    # clicks at 30 s), which lowers calibration but not the ranking; `ctrloop train` defaults
    # to 120 s for calibration.
    click_window: float = 30.0
    allowed_lateness: float = 5.0
    view_interval_s: float = 5.0
    # The simulated world's conversion types (a key of CONVERSION_MIXES). The driver runs in
    # this process, so no child needs it; the trainer learns whatever types arrive.
    conversion_mix: str = "single"

    def __post_init__(self) -> None:
        # Every bound is checked here, when the config is built and before anything starts:
        # a bad --rate used to surface only when the driver was built, after the whole stack
        # was up. NaN passes every `<=` comparison, hence the explicit finiteness checks.
        if self.port is not None and not 0 <= self.port <= 65535:
            raise ConfigError("--port must be in 0..65535")
        if self.duration is not None and not (math.isfinite(self.duration)
                                              and self.duration > 0):
            raise ConfigError("--duration must be a finite number of seconds > 0")
        if not 1 <= self.workers <= 64:
            raise ConfigError("--workers must be in 1..64")
        if not (math.isfinite(self.rate) and 0 < self.rate <= MAX_RATE):
            raise ConfigError(f"--rate must be in (0, {MAX_RATE:g}] requests per second")
        if not 0 <= self.seed < 2**63:
            raise ConfigError("--seed must be in 0..2**63-1")
        if not (math.isfinite(self.click_window) and self.click_window > 0):
            raise ConfigError("--click-window must be a finite number of seconds > 0")
        if not (math.isfinite(self.allowed_lateness) and self.allowed_lateness >= 0):
            raise ConfigError("allowed_lateness must be >= 0 seconds")
        if not (math.isfinite(self.view_interval_s) and self.view_interval_s > 0):
            raise ConfigError("view_interval_s must be > 0 seconds")
        if self.conversion_mix not in CONVERSION_MIXES:
            raise ConfigError(f"--conversion-mix must be one of {', '.join(CONVERSION_MIXES)}")
        # Absolute at the edge: children get this path (the checkpoint dir, redis' --dir) and
        # some of them run in another directory, where a relative path means something else.
        object.__setattr__(self, "workdir", Path(self.workdir).absolute())


# ---------------------------------------------------------------------------- children

class ChildProcess:
    """A `ctrloop` subcommand in its own process group, logging to a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str],
                 log_path: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env,
                # Own group: a terminal's Ctrl-C reaches only the stack, which stops children
                # in order; PDEATHSIG covers a stack killed without cleanup (kill -9).
                start_new_session=True, preexec_fn=_make_pdeathsig_preexec())

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def terminate(self) -> None:
        """SIGTERM to the group: the child stops gracefully (drain, checkpoint)."""
        if self.proc is not None and self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)

    def wait_stopped(self, deadline: float) -> int | None:
        """Wait until the monotonic `deadline`, then SIGKILL whatever of the group is left."""
        proc = self.proc
        if proc is None:
            return None
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        # The leader's exit does not end its group: a uvicorn worker could outlive its master.
        _signal_group(proc.pid, signal.SIGKILL)
        return proc.returncode

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM to the group, wait, then SIGKILL whatever of the group is left."""
        self.terminate()
        return self.wait_stopped(time.monotonic() + timeout)

    def log_tail(self, n_bytes: int = 3000) -> str:
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(max(0, self.log_path.stat().st_size - n_bytes))
            return f.read().decode("utf-8", "replace")


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def check_binaries() -> None:
    """Fail early, saying what to install, when the broker or Redis binary is missing."""
    try:
        find_binary("tansu")
        find_binary("redis-server")
    except BinaryNotFoundError as e:
        raise StackError(f"{e}\nThe stack needs both; on a fresh checkout run: "
                         "pip install -e '.[local]'") from e


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As uvicorn binds: SO_REUSEADDR, so a port in TIME_WAIT still counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def choose_port(requested: int | None) -> tuple[int, str | None]:
    """The service port, and a note when it is not the one asked for."""
    if requested == 0:
        return free_port(), None
    if requested is not None:
        if not _port_free(requested):
            raise StackError(f"port {requested} on {HOST} is in use; stop what holds it "
                             f"(`ss -ltnp 'sport = :{requested}'`) or pass --port 0 for a "
                             "free one")
        return requested, None
    if _port_free(DEFAULT_PORT):
        return DEFAULT_PORT, None
    port = free_port()
    return port, f"port {DEFAULT_PORT} is in use, so the service listens on {port} instead"


# ---------------------------------------------------------------------------- work dir lock

class WorkdirLock:
    """An exclusive `flock` on `<workdir>/stack.lock`, held for the whole run.

    A second stack in the same work dir would delete the first one's trainer checkpoint and
    crash it; instead it is refused, naming the pid that holds the lock. flock is released by
    the kernel when the holder dies (even by kill -9), so a stale lock file never blocks a
    later run. The descriptor is not inherited by children (Python opens files O_CLOEXEC).
    """

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / LOCK_NAME
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # "a+": opening must not truncate the pid of a holder before we know we hold it.
        f = open(self.path, "a+")  # noqa: SIM115 - held open until release()
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise StackError(
                f"another ctrloop stack (pid {holder}) is running in {self.path.parent}; "
                f"stop it (kill {holder}) or give this one its own --workdir") from None
        except BaseException:
            f.close()
            raise
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            # Closing drops the lock; the file stays (removing it would race a new holder).
            self._file.close()
            self._file = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------------- the stack

@dataclass
class _Urls:
    service: str
    kafka: str
    redis: str
    logs: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        s = self.service
        # The dashboard first: the one URL a newcomer should open.
        out = [f"  dashboard    {s}/dashboard", f"  service      {s}",
               f"  API docs     {s}/docs", f"  metrics      {s}/metrics",
               f"  models       {s}/v1/models", f"  Kafka        {self.kafka}",
               f"  Redis        {self.redis}"]
        out += [f"  log {name:<8} {path}" for name, path in self.logs.items()]
        return out


class StopRequest:
    """SIGINT/SIGTERM as a flag that startup checks between its steps.

    Raising KeyboardInterrupt from the handler, wherever the main thread happened to be,
    could land inside `subprocess.Popen` after the fork: the child ran on, untracked, and
    nothing stopped it. A second signal still raises, for someone who will not wait.
    """

    def __init__(self) -> None:
        self.signals = 0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals > 1:
            raise KeyboardInterrupt

    @property
    def requested(self) -> bool:
        return self.signals > 0

    def check(self) -> None:
        """Unwind like Ctrl-C, at a point where every started process is tracked."""
        if self.signals:
            raise KeyboardInterrupt


class Stack:
    """Servers and children of one `ctrloop stack` run; `close()` stops all of them."""

    def __init__(self, config: StackConfig, out: IO[str],
                 stop: StopRequest | None = None) -> None:
        self.config = config
        self.out = out
        self.stop = stop or StopRequest()
        self.logs = config.workdir / "logs"
        self.kafka: KafkaBroker | None = None
        self.redis: RedisServer | None = None
        self.children: dict[str, ChildProcess] = {}
        self.urls: _Urls | None = None
        self.exit_codes: dict[str, int | None] = {}
        self.sim_status = config.workdir / SIM_STATUS_NAME
        self.view = LiveView(out)

    def say(self, msg: str) -> None:
        self.view.say(msg)

    def start(self) -> _Urls:
        cfg = self.config
        self.logs.mkdir(parents=True, exist_ok=True)
        port, note = choose_port(cfg.port)
        if note:
            self.say(f"note: {note}")
        self._fresh_checkpoint_dir()
        self.sim_status.unlink(missing_ok=True)  # a previous run's, until this one writes
        self.say("starting Kafka (Tansu) and redis-server ...")
        self.kafka = KafkaBroker(self.logs)
        self.kafka.start()
        self.stop.check()
        self.redis = RedisServer(self.logs)
        self.redis.start()
        self.stop.check()
        self._create_topics()
        self.stop.check()
        env = self._child_env(port)
        self._spawn("trainer", ["train"], env)
        self.stop.check()
        self._spawn("service", ["serve", "--port", str(port), "--workers", str(cfg.workers)],
                    env)
        url = f"http://{HOST}:{port}"
        self.say(f"waiting for the service at {url}/readyz ...")
        self._wait_ready(url)
        logs = {name: str(c.log_path) for name, c in self.children.items()}
        for server in (self.kafka, self.redis):
            logs[server.name] = str(server.log_path)
        self.urls = _Urls(url, self.kafka.bootstrap, self.redis.url, logs)
        return self.urls

    def _fresh_checkpoint_dir(self) -> None:
        ckpt = self.config.workdir / "trainer"
        if ckpt.exists():
            shutil.rmtree(ckpt)

    def _create_topics(self) -> None:
        from ctrloop.io.kafka import create_topics

        assert self.kafka is not None
        c = ConnectionSettings()
        create_topics(self.kafka.bootstrap, [c.topic_impressions, c.topic_clicks,
                                             c.topic_conversions, c.topic_dead_letter])

    def _child_env(self, port: int) -> dict[str, str]:
        assert self.kafka is not None and self.redis is not None
        cfg = self.config
        env = dict(os.environ)
        env.update({
            "CTRLOOP_KAFKA_BOOTSTRAP": self.kafka.bootstrap,
            "CTRLOOP_REDIS_URL": self.redis.url,
            "CTRLOOP_CHECKPOINT_DIR": str(cfg.workdir / "trainer"),
            "CTRLOOP_CLICK_WINDOW": str(cfg.click_window),
            "CTRLOOP_ALLOWED_LATENESS": str(cfg.allowed_lateness),
            "CTRLOOP_PORT": str(port),
            "CTRLOOP_HOST": HOST,
            "PYTHONUNBUFFERED": "1",  # log files show progress as it happens
        })
        if cfg.simulator:  # the dashboard's simulator panels read what the driver writes
            env["CTRLOOP_SIM_STATUS_FILE"] = str(self.sim_status)
        # Publish as often as the trainer allows: the point of the stack is to watch it learn.
        env.setdefault("CTRLOOP_MIN_PUBLISH_INTERVAL_S", "1")
        if cfg.conversion_mix != "single":
            # The simulated world's conversion types, each a task of the pCVR model.
            env.setdefault("CTRLOOP_CONVERSION_TYPES", ",".join(
                t.name for t in CONVERSION_MIXES[cfg.conversion_mix]))
        return env

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        child = ChildProcess(name, [sys.executable, "-m", "ctrloop.cli", *args], env,
                             self.logs / f"{name}.log")
        self.children[name] = child
        child.start()

    def _wait_ready(self, url: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                self.stop.check()
                self.check_children()
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{url}/readyz").status_code == 200:
                        return
                time.sleep(0.25)
        raise StackError(f"the service was not ready after {READY_TIMEOUT_S:.0f} s; see "
                         f"{self.children['service'].log_path}")

    def check_children(self) -> None:
        """Raise StackError if a child exited (it should run until the stack stops it)."""
        for name, child in self.children.items():
            code = child.exit_code()
            if code is not None:
                raise StackError(f"the {name} exited with code {code}; last lines of "
                                 f"{child.log_path}:\n{child.log_tail()}")

    def close(self) -> None:
        """Stop everything that was started: service and trainer together (one drains its
        Kafka writes, the other checkpoints; both need the broker), then the servers. Never
        raises on a child's behalf."""
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in self.children.values():
            with contextlib.suppress(Exception):
                child.terminate()
        for name, child in self.children.items():
            with contextlib.suppress(Exception):
                self.exit_codes[name] = child.wait_stopped(deadline)
        for server in (self.kafka, self.redis):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()


# ---------------------------------------------------------------------------- live view

def _fmt_pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}%"


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def served_text(models: dict[str, Any] | None, now: float) -> str:
    """The served model in a few words: version, how long ago it was published, samples.

    No trainer metric: the trainer's AUC is progressive (each event scored before it is
    learned, in learning order), so it starts low and climbs whatever the served model does.
    """
    if not models:
        return "model ?"
    s = models.get("serving", {})
    if s.get("status") == "prior":
        return "model prior (none trained yet)"
    pinned = " pinned" if s.get("status") == "pinned" else ""
    return (f"model v{s.get('version')}{pinned} {_age(s.get('published_at'), now)} old, "
            f"{_count(s.get('samples_seen'))} samples")


def _age(published_at: float | None, now: float) -> str:
    if published_at is None or not math.isfinite(published_at):
        return "?"
    age = max(now - published_at, 0.0)
    return f"{age:.0f} s" if age < 120 else f"{age / 60:.0f} min"


def _count(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e4 else f"{n:,}"


@dataclass(frozen=True)
class ViewRow:
    """One report of the live view: what the plain lines and the live table show."""

    elapsed_s: float
    requests_per_s: float
    events_per_s: float
    model: str  # served_text()
    version: str  # "v12", "prior" or "?"
    age: str
    ctr: float | None  # expected CTR served in the latest full bucket
    oracle_ctr: float | None
    random_ctr: float | None
    auc: float | None  # served pCTR vs the true CTR, last LAST_WINDOW_S
    logloss: float | None  # served pCTR vs the true CTR, last LAST_WINDOW_S
    best_logloss: float | None  # the true CTR's own
    explored: float | None  # share of requests ranked by a posterior sample
    explore_cost: float | None  # mean value given up per explored request
    errors: int  # failed score requests
    # Data the trainer will never see: impressions not logged, events the service refused,
    # messages the trainer dead-lettered (as of the served model's record).
    lost: int


def view_row(snap: dict[str, Any], rates: dict[str, float], models: dict[str, Any] | None,
             served_auc: dict[str, Any], bucket: dict[str, Any] | None,
             now: float | None = None) -> ViewRow:
    b = bucket or {}
    now = time.time() if now is None else now
    s = (models or {}).get("serving", {})
    version = "?" if not models else ("prior" if s.get("status") == "prior"
                                      else f"v{s.get('version')}")
    age = "-" if version in ("?", "prior") else _age(s.get("published_at"), now)
    return ViewRow(
        snap["elapsed_s"], rates["requests_per_s"], rates["events_per_s"],
        served_text(models, now), version, age, b.get("expected_ctr"), b.get("oracle_ctr"),
        b.get("random_ctr"), served_auc.get("auc_true_ctr"),
        served_auc.get("logloss_true_ctr"), served_auc.get("oracle_logloss_true_ctr"),
        b.get("explored_share"), b.get("explore_cost"), sum(snap["score_errors"].values()),
        snap["impressions_unlogged"] + snap["events_rejected"]
        + int((s.get("trainer") or {}).get("dead_lettered") or 0))


def plain_lines(r: ViewRow) -> list[str]:
    """A report as two lines of at most VIEW_WIDTH columns: traffic and the served model,
    then what the served model is worth on fresh traffic (the simulator knows the truth)."""
    return [f"[{r.elapsed_s:5.0f}s] req/s {r.requests_per_s:5.1f} events/s "
            f"{_fmt(r.events_per_s, '5.1f')} | {r.model} | errors {r.errors} lost {r.lost}"
            [:VIEW_WIDTH],
            f"  CTR {_fmt_pct(r.ctr)} (oracle {_fmt_pct(r.oracle_ctr)}, random "
            f"{_fmt_pct(r.random_ctr)}) | AUC {_fmt(r.auc)} logloss {_fmt(r.logloss, '.4f')} "
            f"(best {_fmt(r.best_logloss, '.4f')}) | explored {_fmt_pct(r.explored, 0)}"
            [:VIEW_WIDTH]]


def view_line(snap: dict[str, Any], rates: dict[str, float], models: dict[str, Any] | None,
              served_auc: dict[str, Any], bucket: dict[str, Any] | None,
              now: float | None = None) -> str:
    """One report of the plain view (two lines).

    CTRs are the expected ones (true CTR of what was shown) of the latest full bucket: clicks
    come seconds to minutes after their impression, so a recent bucket's realised CTR is
    still incomplete. AUC and log loss are the served pCTR's against the true CTR over the
    last LAST_WINDOW_S of impressions.
    """
    return "\n".join(plain_lines(view_row(snap, rates, models, served_auc, bucket, now)))


VIEW_HELP = """\
every {interval:g} s, the served model on fresh traffic (the simulator knows the truth):
  CTR      expected CTR of the ads served in the last full 10 s (true CTR of each shown ad),
           beside the best ranking's (oracle) and a random one's
  AUC      served pCTR against the true CTR over the last {fresh:g} s (0.5: a constant's)
  logloss  the same impressions' log loss against the true CTR (best: the truth's own)
  explored share of requests ranked by a posterior sample (Thompson sampling)
  lost     impressions not logged + events refused + messages the trainer dead-lettered"""


class LiveView:
    """The stack's live view: a rich table redrawn in place on a terminal, plain lines
    (at most VIEW_WIDTH columns, no escape codes) anywhere else: a pipe, a file, CI."""

    def __init__(self, out: IO[str], interactive: bool | None = None,
                 keep_rows: int = 12) -> None:
        self.out = out
        self.interactive = _is_terminal(out) if interactive is None else interactive
        self.rows: list[ViewRow] = []
        self.keep_rows = keep_rows
        self._live: Any = None
        self._console: Any = None
        if self.interactive:
            from rich.console import Console

            width = min(shutil.get_terminal_size((VIEW_WIDTH, 24)).columns, VIEW_WIDTH)
            self._console = Console(file=out, width=width, force_terminal=True,
                                    highlight=False)

    def say(self, msg: str) -> None:
        if self._console is not None:
            self._console.print(msg, markup=False, highlight=False, soft_wrap=True)
        else:
            print(msg, file=self.out, flush=True)

    def add(self, row: ViewRow) -> None:
        self.rows.append(row)
        if self._console is None:
            for line in plain_lines(row):
                print(line, file=self.out, flush=True)
            return
        if self._live is None:
            from rich.live import Live

            self._live = Live(self.table(), console=self._console, auto_refresh=False,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start()
        self._live.update(self.table(), refresh=True)

    def table(self) -> Any:
        return live_table(self.rows[-self.keep_rows:])

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()  # the last table stays on the screen
            self._live = None


def live_table(rows: list[ViewRow]) -> Any:
    """The rich table of the latest reports, one row each, fitting VIEW_WIDTH columns."""
    from rich.table import Table

    # One space between columns (no vertical rules): 14 columns fit 100 without truncation.
    # No box: rich's boxes add a column of rule per column, and 14 columns then no longer fit
    # 100 (the numbers get cut to "4.0…"); one space between columns does.
    t = Table(box=None, pad_edge=False, padding=(0, 1), collapse_padding=True,
              header_style="bold underline", title="the served model on fresh simulated "
              "traffic", title_justify="left")
    for name in ("time", "req/s", "ev/s", "model", "age", "CTR", "oracle", "random",
                 "AUC", "logloss", "best", "explored", "errors", "lost"):
        t.add_column(name, justify="left" if name == "model" else "right", no_wrap=True)
    for r in rows:
        t.add_row(f"{r.elapsed_s:.0f}s", _fmt(r.requests_per_s, ".1f"),
                  _fmt(r.events_per_s, ".1f"), r.version, r.age, _fmt_pct(r.ctr),
                  _fmt_pct(r.oracle_ctr), _fmt_pct(r.random_ctr), _fmt(r.auc),
                  _fmt(r.logloss, ".4f"), _fmt(r.best_logloss, ".4f"),
                  _fmt_pct(r.explored, 0), str(r.errors), str(r.lost))
    return t


def _is_terminal(out: IO[str]) -> bool:
    try:
        return out.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


def write_sim_status(path: Path, stats: DriverStats, snap: dict[str, Any],
                     fresh_auc: list[dict[str, Any]]) -> None:
    """What the simulator knows, for the dashboard: the timeline of expected CTR served vs
    the oracle's and random's, and the served pCTR's AUC on fresh traffic per report. Replaced
    atomically: the service reads it at any moment."""
    status = {"source": "ctrloop stack simulator",
              "written_at": stats.started_at + snap["elapsed_s"], "started_at": stats.started_at,
              "bucket_s": stats.bucket_s, "fresh_window_s": LAST_WINDOW_S, "snapshot": snap,
              "timeline": stats.timeline()[-SIM_STATUS_KEEP:],
              "fresh_auc": fresh_auc[-SIM_STATUS_KEEP:]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(status)))
    os.replace(tmp, path)


async def fetch_models(client: httpx.AsyncClient, url: str) -> dict[str, Any] | None:
    try:
        resp = await client.get(f"{url}/v1/models")
    except httpx.HTTPError:
        return None
    return resp.json() if resp.status_code == 200 else None


def _latest_full(timeline: list[dict[str, Any]], elapsed: float,
                 bucket_s: float) -> dict[str, Any] | None:
    full = [b for b in timeline if b["start_s"] + bucket_s <= elapsed]
    return full[-1] if full else None


@dataclass
class _Run:
    stack: Stack
    driver: LiveDriver | None
    models: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    interrupted: bool = False  # Ctrl-C or SIGTERM (rather than --duration or an error)
    fresh_auc: list[dict[str, Any]] = field(default_factory=list)  # served AUC per report

    def record_models(self, answer: dict[str, Any] | None, elapsed: float) -> None:
        if not answer:
            return
        s = answer.get("serving", {})
        self.models.append({"t_s": round(elapsed, 1), "version": s.get("version"),
                            "status": s.get("status"), "samples_seen": s.get("samples_seen"),
                            "trainer_metrics": s.get("metrics")})


async def _live(run: _Run, client: httpx.AsyncClient) -> None:
    cfg, stack = run.stack.config, run.stack
    assert stack.urls is not None
    url = stack.urls.service
    driver = run.driver
    stop = asyncio.Event()

    def request_stop() -> None:
        stop.set()
        if driver is not None:
            driver.request_stop()

    async def report(snap: dict[str, Any], rates: dict[str, float]) -> None:
        try:
            stack.check_children()
        except StackError as e:
            run.error = str(e)
            request_stop()
            return
        models = await fetch_models(client, url)
        run.record_models(models, snap["elapsed_s"])
        assert driver is not None
        bucket = _latest_full(driver.stats.timeline(), snap["elapsed_s"],
                              driver.stats.bucket_s)
        fresh = driver.stats.served_auc_last(LAST_WINDOW_S)
        now = driver.stats.started_at + snap["elapsed_s"]
        stack.view.add(view_row(snap, rates, models, fresh, bucket, now))
        run.fresh_auc.append({"t": now, "t_s": snap["elapsed_s"], **fresh})
        try:
            write_sim_status(stack.sim_status, driver.stats, snap, run.fresh_auc)
        except OSError as e:  # the dashboard shows the status as stale; the stack goes on
            stack.say(f"note: cannot write {stack.sim_status}: {e}")

    def interrupted() -> None:
        run.interrupted = True
        request_stop()

    with stop_on_signals(interrupted):
        if stack.stop.requested:  # a signal came between startup and this handler
            interrupted()
        if driver is not None:
            await run_with_reports(driver, cfg.duration, cfg.view_interval_s, report)
        else:
            await _watch_only(run, client, stop)


async def _watch_only(run: _Run, client: httpx.AsyncClient, stop: asyncio.Event) -> None:
    """--no-simulator: keep the stack up, show the served model every few seconds."""
    stack, t0 = run.stack, time.monotonic()
    assert stack.urls is not None
    end = math.inf if stack.config.duration is None else t0 + stack.config.duration
    while not stop.is_set() and time.monotonic() < end:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), min(stack.config.view_interval_s,
                                                    max(end - time.monotonic(), 0.01)))
        try:
            stack.check_children()
        except StackError as e:
            run.error = str(e)
            return
        models = await fetch_models(client, stack.urls.service)
        elapsed = time.monotonic() - t0
        run.record_models(models, elapsed)
        stack.say(f"[{elapsed:5.0f}s] {served_text(models, time.time())}")


async def _run_live(run: _Run) -> None:
    async with httpx.AsyncClient(timeout=3.0) as client:
        await _live(run, client)


# ---------------------------------------------------------------------------- entry point

@contextlib.contextmanager
def _signals_to(stop: StopRequest) -> Iterator[None]:
    """While starting, SIGINT and SIGTERM set `stop` (the live view installs its own)."""
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, stop) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """During cleanup a second Ctrl-C must not abandon children half-stopped."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_stack(config: StackConfig, out: IO[str] = sys.stdout) -> dict[str, Any]:
    """Run the stack until --duration, Ctrl-C or SIGTERM; returns (and saves) the summary."""
    check_binaries()
    with WorkdirLock(config.workdir):
        return _run_locked(config, out)


def _run_locked(config: StackConfig, out: IO[str]) -> dict[str, Any]:
    stack = Stack(config, out)
    run = _Run(stack, None)
    interrupted = False
    t0 = time.time()
    try:
        with _signals_to(stack.stop):
            urls = stack.start()
            stack.say(f"ctrloop stack is up after {time.time() - t0:.1f} s "
                      "(Ctrl-C stops everything):")
            for line in urls.lines():
                stack.say(line)
            if config.simulator:
                run.driver = LiveDriver(urls.service, DriverConfig(
                    rate=config.rate, seed=config.seed, explore=config.explore,
                    conversion_mix=config.conversion_mix))
                stack.say(f"simulated traffic: {config.rate:g} requests/s;\n"
                          + VIEW_HELP.format(interval=config.view_interval_s,
                                             fresh=LAST_WINDOW_S))
            asyncio.run(_run_live(run))
            interrupted = stack.stop.requested
    except KeyboardInterrupt:
        interrupted = True
    except (ServerError, OSError) as e:
        raise StackError(f"the stack could not start: {e}") from e
    finally:
        stack.view.close()
        with _signals_ignored():
            stack.say("stopping the stack ...")
            t_stop = time.time()
            stack.close()
            stack.say(f"stopped every process in {time.time() - t_stop:.1f} s")
    summary = _finish(run, config, t0, interrupted)
    if run.error:
        raise StackError(run.error)
    return summary


def _finish(run: _Run, config: StackConfig, t0: float, interrupted: bool) -> dict[str, Any]:
    """The end of a run: the summary file and its text, the plots and their paths."""
    summary = build_summary(run, t0, interrupted)
    path = config.workdir / "stack-summary.json"
    path.write_text(json.dumps(_finite(summary), indent=2, default=str))
    run.stack.say(summary_text(summary, path))
    if summary.get("timeline"):
        # From the saved form (NaN as None), so a plot can always be redrawn from the file.
        saved = json.loads(json.dumps(_finite(summary), default=str))
        paths = write_stack_plots(saved, config.workdir / "plots")
        run.stack.say("plots:\n" + "\n".join(f"  {p}" for p in paths))
    return summary


def _finite(obj: Any) -> Any:
    """NaN/inf → None, so the summary is strict JSON that any tool can read."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def build_summary(run: _Run, t0: float, interrupted: bool) -> dict[str, Any]:
    stack = run.stack
    cfg = stack.config
    out: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "urls": asdict(stack.urls) if stack.urls else None,
        "seconds": round(time.time() - t0, 1), "interrupted": interrupted or run.interrupted,
        "error": run.error, "exit_codes": stack.exit_codes, "models": run.models,
    }
    if run.driver is not None:
        stats = run.driver.stats
        timeline = stats.timeline()
        out.update(final=run.driver.snapshot(), served_auc=stats.served_auc(),
                   served_auc_last=stats.served_auc_last(LAST_WINDOW_S), ctr=ctr_lift(timeline),
                   timeline=timeline, fresh_auc=run.fresh_auc,
                   calibration=stats.calibration())
    return out


def summary_text(summary: dict[str, Any], path: Path) -> str:
    """The end of a run in lines of at most VIEW_WIDTH columns (a long path aside)."""
    lines = [f"summary written to {path}"]
    final = summary.get("final")
    if final is None:
        return "\n".join(lines)
    ctr = summary["ctr"]
    first = final.get("first_trained_s")
    lines.append(f"  {final['requests']:,} requests, {final['impressions']:,} impressions, "
                 f"{final['clicks_sent']:,} clicks sent; first trained model at "
                 f"{'-' if first is None else f'{first:.0f} s'}")
    p, t = ctr["prior"], ctr["trained"]
    if ctr["rose"]:
        verdict = f"CTR rose {ctr['expected_lift']:+.0%}"
    elif not t["impressions"]:
        verdict = "no trained model served long enough (run longer)"
    else:
        verdict = "CTR did not rise"
    lines.append(f"  {verdict}: prior {_fmt_pct(p['expected_ctr'])} -> trained "
                 f"{_fmt_pct(t['expected_ctr'])} (oracle {_fmt_pct(t['oracle_ctr'])}, random "
                 f"{_fmt_pct(t['random_ctr'])})")
    last, whole = summary["served_auc_last"], summary["served_auc"]
    # The whole run's too, where it is more (the driver keeps the last 20,000 impressions).
    more = (f", {_fmt(whole['auc_true_ctr'])} over {whole['n']:,}"
            if whole["n"] > last["n"] else "")
    lines.append(f"  served pCTR vs true CTR: AUC {_fmt(last['auc_true_ctr'])} over the last "
                 f"{LAST_WINDOW_S:g} s ({last['n']:,} impressions){more}")
    lines.append(f"    (the truth's own AUC {_fmt(last['oracle_auc_true_ctr'])}); logloss "
                 f"{_fmt(last.get('logloss_true_ctr'), '.4f')} (best "
                 f"{_fmt(last.get('oracle_logloss_true_ctr'), '.4f')}); mean pCTR "
                 f"{_fmt_pct(last.get('mean_pctr'))} vs true {_fmt_pct(last.get('mean_true_ctr'))}")
    lines.append(f"  failed requests {sum(final['score_errors'].values())}, impressions not "
                 f"logged {final.get('impressions_unlogged', 0)}, events refused "
                 f"{final['events_rejected']}, events still pending {final['pending_events']}")
    return "\n".join(lines)


def write_stack_plots(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """SVG plots of a run from its summary: CTR over time against the oracle and random,
    the served AUC on fresh traffic, calibration of the served pCTR, model versions."""
    timeline = summary["timeline"]
    t = [b["start_s"] for b in timeline]
    out = [write_svg(out_dir / "ctr.svg", plots.line_chart(
        "Expected CTR of the served ads, per 10 s bucket",
        [plots.Series("served", t, [b["expected_ctr"] for b in timeline]),
         plots.Series("oracle (best ranking)", t, [b["oracle_ctr"] for b in timeline], True),
         plots.Series("random ranking", t, [b["random_ctr"] for b in timeline], True)],
        "seconds since traffic started", "CTR", y_fmt=plots.pct(1), y_min=0.0))]
    fresh = summary.get("fresh_auc") or []
    ft = [r["t_s"] for r in fresh]
    out.append(write_svg(out_dir / "fresh-auc.svg", plots.line_chart(
        f"Served pCTR's AUC against the true CTR, last {LAST_WINDOW_S:g} s of impressions",
        [plots.Series("served model", ft, [r["auc_true_ctr"] for r in fresh]),
         plots.Series("the true CTR as the score", ft,
                      [r["oracle_auc_true_ctr"] for r in fresh], True)],
        "seconds since traffic started", "AUC")))
    bins = (summary.get("calibration") or {}).get("bins", [])
    out.append(write_svg(out_dir / "calibration.svg", plots.calibration_chart(
        "Calibration of the served pCTR (trained models, latest impressions)",
        [plots.Series("pCTR deciles", [b["pred"] for b in bins],
                      [b["actual"] for b in bins])],
        y_label="true CTR at the shown position")))
    served = [m for m in summary.get("models", []) if _version_number(m) is not None]
    out.append(write_svg(out_dir / "versions.svg", plots.line_chart(
        "Served model version (trained models)",
        [plots.Series("version", [m["t_s"] for m in served],
                      [_version_number(m) for m in served])],
        "seconds since traffic started", "version", y_fmt=lambda v: f"v{v:g}")))
    return out


def _version_number(model: dict[str, Any]) -> float | None:
    """A trained or pinned model's version as a number; None for the prior (or odd ones)."""
    if model.get("status") == "prior":
        return None
    try:
        return float(model["version"])
    except (KeyError, TypeError, ValueError):
        return None
