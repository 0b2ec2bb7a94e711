"""`ctrloop serve` as a child process on a free port, for the service's integration tests."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from ctrloop.dev.localservers import free_port


class ServiceProcess:
    """Starts `ctrloop serve --workers N` with `env` (CTRLOOP_* settings) in its own process
    group; `url` is its base URL once `start()` returned (every worker answering /readyz)."""

    def __init__(self, env: dict[str, str], log_dir: Path, workers: int = 1,
                 startup_timeout: float = 90.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.startup_timeout = startup_timeout
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"service-{self.port}.log"
        metrics_dir = log_dir / f"metrics-{self.port}"
        metrics_dir.mkdir()
        self.env = {**os.environ, **env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ctrloop.cli", "serve", "--port", str(self.port),
                 "--workers", str(self.workers)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        ready_pids: set[str] = set()
        # Fresh connections land on any worker: wait until every one of them is ready.
        with httpx.Client(base_url=self.url, timeout=5.0,
                          headers={"Connection": "close"}) as client:
            while len(ready_pids) < self.workers:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"ctrloop serve exited with {self.proc.returncode}:\n"
                                       f"{self.log_tail()}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"ctrloop serve not ready in {self.startup_timeout} s:\n"
                                       f"{self.log_tail()}")
                try:
                    r = client.post("/v1/score", json={
                        "user_id": "probe", "candidates": [{"ad_id": "a", "advertiser_id": "b"}]})
                    if r.status_code == 200 and client.get("/readyz").status_code == 200:
                        ready_pids.add(r.headers["x-ctrloop-worker"])
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def log_tail(self, n_bytes: int = 6000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-n_bytes:].decode("utf-8", "replace")

    def metric(self, name: str, labels: str = "") -> float:
        """The value of one sample of /metrics (summed over the workers), 0 if absent."""
        text = httpx.get(f"{self.url}/metrics", timeout=5.0).text
        pattern = "^" + re.escape(name + (f"{{{labels}}}" if labels else "")) + r" (\S+)$"
        m = re.search(pattern, text, re.MULTILINE)
        return float(m.group(1)) if m else 0.0

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
