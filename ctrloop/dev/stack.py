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

from ctrloop.core.errors import ConfigError, CtrloopError
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

    def say(self, msg: str) -> None:
        print(msg, file=self.out, flush=True)

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

def _fmt_pct(x: float | None) -> str:
    return "  -  " if x is None or not math.isfinite(x) else f"{100 * x:.2f}%"


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def model_line(models: dict[str, Any] | None) -> str:
    """The served model from a /v1/models answer, in a few words."""
    if not models:
        return "model ?"
    s = models.get("serving", {})
    if s.get("status") == "prior":
        return "model prior (no trained version yet)"
    m = s.get("metrics") or {}
    return (f"model v{s.get('version')} ({s.get('status')}) samples {s.get('samples_seen', 0):,}"
            f" trainer AUC {_fmt(m.get('auc'))}")


def view_line(snap: dict[str, Any], rates: dict[str, float], models: dict[str, Any] | None,
              served_auc: dict[str, Any], bucket: dict[str, Any] | None) -> str:
    """One live-view line: traffic, the served model, CTRs and the served pCTR's AUC.

    CTRs are the expected ones (true CTR of what was shown) of the latest full bucket: clicks
    come seconds to minutes after their impression, so a recent bucket's realised CTR is
    still incomplete; the realised CTR is shown over the whole run instead.
    """
    b = bucket or {}
    return (f"[{snap['elapsed_s']:5.0f}s] req/s {rates['requests_per_s']:5.1f} "
            f"events/s {rates['events_per_s']:4.1f} | {model_line(models)} | CTR served "
            f"{_fmt_pct(b.get('expected_ctr'))} oracle {_fmt_pct(b.get('oracle_ctr'))} "
            f"random {_fmt_pct(b.get('random_ctr'))} realised so far "
            f"{_fmt_pct(snap.get('realised_ctr'))} | served AUC "
            f"{_fmt(served_auc.get('auc_true_ctr'))} (n={served_auc.get('n', 0)})"
            f" | p99 {_fmt(snap['latency_p99_ms'], '.0f')} ms"
            f" errors {sum(snap['score_errors'].values())}")


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
        stack.say(view_line(snap, rates, models, fresh, bucket))
        run.fresh_auc.append({"t": driver.stats.started_at + snap["elapsed_s"], **fresh})
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
        stack.say(f"[{elapsed:6.0f}s] {model_line(models)}")


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
                stack.say(f"simulated traffic: {config.rate:g} requests/s. Every "
                          f"{config.view_interval_s:g} s: the expected CTR of the ads served "
                          "in the last full 10 s (vs the best and a random choice), and the "
                          f"served pCTR's AUC against the true CTR over the last "
                          f"{LAST_WINDOW_S:g} s")
            asyncio.run(_run_live(run))
            interrupted = stack.stop.requested
    except KeyboardInterrupt:
        interrupted = True
    except (ServerError, OSError) as e:
        raise StackError(f"the stack could not start: {e}") from e
    finally:
        with _signals_ignored():
            stack.say("stopping the stack ...")
            t_stop = time.time()
            stack.close()
            stack.say(f"stopped every process in {time.time() - t_stop:.1f} s")
    summary = build_summary(run, t0, interrupted)
    path = config.workdir / "stack-summary.json"
    path.write_text(json.dumps(_finite(summary), indent=2, default=str))
    stack.say(summary_text(summary, path))
    if run.error:
        raise StackError(run.error)
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
                   timeline=timeline)
    return out


def summary_text(summary: dict[str, Any], path: Path) -> str:
    lines = [f"summary written to {path}"]
    final = summary.get("final")
    if final is None:
        return "\n".join(lines)
    ctr = summary["ctr"]
    first = final.get("first_trained_s")
    lines.append(f"  {final['requests']:,} requests, {final['impressions']:,} impressions, "
                 f"{final['clicks_sent']:,} clicks sent; first trained model served after "
                 f"{'-' if first is None else f'{first:.0f} s'}")
    p, t = ctr["prior"], ctr["trained"]
    if ctr["rose"]:
        verdict = f"CTR rose: expected CTR {ctr['expected_lift']:+.0%}"
    elif not t["impressions"]:
        verdict = "no trained model served long enough to compare (run longer)"
    else:
        verdict = "CTR did not rise"
    lines.append(f"  {verdict}: prior-served {_fmt_pct(p['expected_ctr'])} -> trained-served "
                 f"{_fmt_pct(t['expected_ctr'])} (oracle {_fmt_pct(t['oracle_ctr'])}, random "
                 f"{_fmt_pct(t['random_ctr'])})")
    auc = summary["served_auc"]
    lines.append(f"  served pCTR AUC on {auc['n']:,} trained-model impressions: vs ad appeal "
                 f"{_fmt(auc['auc_ad_appeal'])}, vs true CTR {_fmt(auc['auc_true_ctr'])}, "
                 f"vs clicks {_fmt(auc['auc_clicks'])}")
    return "\n".join(lines)
