"""/dashboard and /docs in a real headless browser, offline.

Debian's `chromium` is driven over the DevTools protocol (a websocket, with the `websockets`
package uvicorn already brings): it loads the pages from a `ctrloop serve --workers 2` on a free
loopback port while a thread sends /v1/score traffic. Every host but 127.0.0.1 resolves to
nothing (`--host-resolver-rules`), so a page that needed a CDN would fail here; on top of that,
every request the page makes is checked to go to the service, and every console error,
uncaught exception and failed load is a failure. The dashboard must show data from the
service (and from a simulator status file, as `ctrloop stack` writes it) within a generous
timeout; nothing else depends on timing.

Skipped when chromium is not installed (`apt-get install -y chromium`).

The same browser takes the README's screenshot of a running stack:

    ctrloop stack --duration 90 --port 0 --workdir runs/dash &   # prints the dashboard URL
    cd tests && python -m integration.test_dashboard_browser URL ../docs/img/dashboard.png
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import torch

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser",
                                                      "google-chrome")) if p), None)
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get "
                       "install -y chromium); the dashboard's browser test needs it"),
]
START_TIMEOUT_S = 60.0
PAGE_TIMEOUT_S = 90.0  # generous: two CPUs shared with the service and the traffic thread


class CDPError(RuntimeError):
    """The browser refused a DevTools command."""


class Browser:
    """A headless chromium and one page of it, over the DevTools protocol.

    `events` keeps every protocol event received (console, exceptions, network requests).
    """

    def __init__(self, binary: str, profile: Path, width: int = 1400, height: int = 1000) -> None:
        profile.mkdir(parents=True, exist_ok=True)
        self.profile = profile
        args = [binary, "--headless=new", "--remote-debugging-port=0",
                f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check",
                "--disable-gpu", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-default-apps",
                # Offline: only the service's loopback address resolves.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                f"--window-size={width},{height}", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # chromium refuses to run as root with its sandbox
        self.log = (profile / "chromium.log").open("wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.events: list[dict[str, Any]] = []
        self._id = 0
        self._exit = contextlib.ExitStack()  # websockets wants its connection as a context
        try:
            self.ws = self._connect()
            for domain in ("Page", "Runtime", "Log", "Network"):
                self.call(f"{domain}.enable")
        except BaseException:
            self.close()
            raise

    def _connect(self) -> Any:
        from websockets.sync.client import connect

        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_file.exists() or not port_file.read_text().strip():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start: {self.log_tail()}")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        return self._exit.enter_context(
            # Events queue up between commands (a polling page makes several a second):
            # an unbounded queue, and no keepalive pings that a full queue would leave
            # unanswered (the connection is loopback, to a child process).
            connect(page["webSocketDebuggerUrl"], max_size=None, max_queue=None,
                    ping_interval=None, open_timeout=10))

    def log_tail(self, n: int = 3000) -> str:
        self.log.flush()
        return (self.profile / "chromium.log").read_bytes()[-n:].decode("utf-8", "replace")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise CDPError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))
            if "method" in msg:
                self.events.append(msg)

    def pump(self, seconds: float) -> None:
        """Receive events for `seconds` (while the page runs on its own)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                msg = json.loads(self.ws.recv(timeout=left))
                if "method" in msg:
                    self.events.append(msg)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise CDPError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", url=url)

    def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        """Evaluate until truthy; the value. Fails with the page's problems if it never is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(CDPError):  # the page may be between documents
                value = self.evaluate(expression)
                if value:
                    return value
            self.pump(0.25)
        raise AssertionError(f"{what}: not within {timeout:.0f} s; page problems: "
                             f"{self.problems()}; requests: {self.requests()[-10:]}")

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen since the last goto."""
        out = []
        for e in self.events:
            m, p = e["method"], e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                  for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append(f"exception: {d.get('exception', {}).get('description', d)}")
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif m == "Network.loadingFailed" and not p.get("canceled"):
                out.append(f"load failed: {p.get('errorText')}")
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events
                if e["method"] == "Network.requestWillBeSent"]

    def screenshot(self, path: Path, width: int = 1400) -> None:
        """The whole page, `width` CSS pixels wide, as a PNG."""
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=1000,
                  deviceScaleFactor=1, mobile=False)
        self.pump(1.5)  # the charts resize to the new width
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        self.call("Emulation.setDeviceMetricsOverride", width=width,
                  height=int(size["height"]) + 1, deviceScaleFactor=1, mobile=False)
        self.pump(1.5)
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._exit.close()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()


def only_local(urls: list[str], service: str) -> list[str]:
    """The requests that went anywhere but the service (data: URLs are inline)."""
    host = urlsplit(service).netloc
    return [u for u in urls if urlsplit(u).scheme not in ("data", "blob")
            and urlsplit(u).netloc != host]


# ---------------------------------------------------------------------------- the test

@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    assert CHROMIUM is not None
    b = Browser(CHROMIUM, tmp_path / "chromium")
    try:
        yield b
    finally:
        b.close()


def _sim_status(path: Path) -> dict[str, Any]:
    """A simulator status as `ctrloop stack` writes it, from a DriverStats of known numbers."""
    from ctrloop.dev.stack import write_sim_status
    from ctrloop.sim.live import DriverStats, Served

    now = time.time()
    stats = DriverStats(started_at=now - 60.0, bucket_s=10.0)
    for k in range(50):  # five full buckets of ten requests
        ts = stats.started_at + k
        shown = [Served(ts, 0.02 + 0.001 * j, 0.03 - 0.005 * j, 0.03, j == 0, "trained", "1")
                 for j in range(3)]
        stats.record_request(ts, shown, oracle_sum=0.09, random_sum=0.045, latency_s=0.003)
    snap = stats.snapshot(now)
    fresh = [{"t": now - 5.0, **stats.served_auc()}, {"t": now, **stats.served_auc()}]
    write_sim_status(path, stats, snap, fresh)
    return dict(json.loads(path.read_text()))


class Traffic(threading.Thread):
    """/v1/score at ~`rate` requests/s until stopped, so the rates have something to show."""

    def __init__(self, url: str, rate: float = 10.0) -> None:
        super().__init__(daemon=True)
        self.url, self.gap = url, 1.0 / rate
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        body = {"user_id": "u1", "features": {"user.age": "25-34"},
                "candidates": [{"ad_id": f"a{j}", "advertiser_id": f"adv{j}"} for j in range(5)],
                "options": {"log": False, "explore": True}}
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self.stop.wait(self.gap):
                with contextlib.suppress(httpx.HTTPError):
                    client.post("/v1/score", json=body)
                    self.sent += 1


def _publish_model(redis_url: str, namespace: str) -> None:
    """Version 1: an FwFM whose record carries the IA per field, as the trainer's does."""
    from ctrloop.core.analysis import CollapseWatch
    from ctrloop.core.features import FeatureSpec, Field
    from ctrloop.core.models import build_model
    from ctrloop.core.snapshot import encode_snapshot
    from ctrloop.io.registry import RedisRegistry

    spec = FeatureSpec((Field("user.id", "categorical", "user", 64),
                        Field("user.age", "categorical", "user", 16),
                        Field("ad.id", "categorical", "ad", 64),
                        Field("ad.advertiser_id", "categorical", "ad", 16)))
    torch.manual_seed(0)
    model = build_model("fwfm", spec, dim=4).eval()
    with torch.no_grad():  # every row trained: a non-zero linear column (core/analysis.py)
        for table in model.embedding_tables():
            table[:, 0] = 0.01
            table[:, 1:] = 0.1 * torch.randn_like(table[:, 1:])
    meta = {"samples_seen": 4321, **CollapseWatch().update(model)}
    registry = RedisRegistry.from_url(redis_url, namespace)
    v = registry.next_version()
    registry.publish(v, encode_snapshot(model, v, meta), meta)


def _values(b: Browser) -> dict[str, float]:
    return dict(b.evaluate("Object.fromEntries([...document.querySelectorAll('dd[data-value]')]"
                           ".map(d => [d.dataset.key, Number(d.dataset.value)]))"))


def test_dashboard_and_docs_render_offline_with_live_data(
        browser: Browser, kafka_broker: Any, redis_server: Any, topic_prefix: str,
        tmp_path: Path) -> None:
    from .service_process import ServiceProcess

    _publish_model(redis_server.url, topic_prefix)
    status = _sim_status(tmp_path / "sim-status.json")
    env = {"CTRLOOP_REDIS_URL": redis_server.url, "CTRLOOP_REGISTRY_NAMESPACE": topic_prefix,
           "CTRLOOP_KAFKA_BOOTSTRAP": kafka_broker.bootstrap, "CTRLOOP_RELOAD_POLL_S": "1",
           "CTRLOOP_TOPIC_IMPRESSIONS": f"{topic_prefix}imp",
           "CTRLOOP_SIM_STATUS_FILE": str(tmp_path / "sim-status.json")}
    with ServiceProcess(env, tmp_path / "service", workers=2) as service:
        traffic = Traffic(service.url)
        traffic.start()
        try:
            browser.goto(f"{service.url}/dashboard")
            browser.wait_for("document.body.dataset.ready === '1' && "
                             "Number(document.body.dataset.polls) >= 3 && "
                             "document.querySelectorAll('#traffic canvas').length > 0",
                             PAGE_TIMEOUT_S, "the traffic chart drew data from the service")
            browser.wait_for("document.querySelector('#model [data-key=version]')"
                             "?.dataset.value === '1'", PAGE_TIMEOUT_S,
                             "the served model panel shows version 1")
            values = _values(browser)
        finally:
            traffic.stop.set()
            traffic.join(timeout=15)

        assert values["score_rps"] > 0, values
        assert 0 < values["p50_s"] <= values["p99_s"] <= 2.5, values  # within the buckets
        assert values["samples"] == 4321, values
        # The simulator's panels show the status file's numbers, from its last full bucket.
        last = [b for b in status["timeline"]
                if b["start_s"] + status["bucket_s"] <= status["written_at"] - status["started_at"]]
        assert values["ctr_served"] == pytest.approx(last[-1]["expected_ctr"]), values
        assert values["ctr_oracle"] == pytest.approx(last[-1]["oracle_ctr"]), values
        assert values["auc_true_ctr"] == pytest.approx(status["fresh_auc"][-1]["auc_true_ctr"])
        for panel in ("traffic", "latency", "model", "ctr", "calibration", "auc", "explore",
                      "ia"):
            assert browser.evaluate(
                f"document.querySelector('#{panel} canvas') !== null"), f"{panel}: no chart"
        assert browser.evaluate("document.querySelectorAll('#ia table.ia tr').length") == 1 + 4
        assert browser.evaluate("Number(document.body.dataset.errors)") == 0
        assert browser.problems() == []
        assert only_local(browser.requests(), service.url) == []
        assert any(u.endswith("/static/dashboard/uPlot.iife.min.js") for u in browser.requests())

        # Swagger UI from the package's own copy, offline as well.
        browser.goto(f"{service.url}/docs")
        title = browser.wait_for("document.querySelector('.swagger-ui .info .title')?.innerText",
                                 PAGE_TIMEOUT_S, "Swagger UI rendered the API's title")
        assert "ctrloop scoring service" in title
        ops = browser.wait_for("document.querySelectorAll('.opblock').length", PAGE_TIMEOUT_S,
                               "Swagger UI listed the operations")
        assert ops >= 5
        assert browser.problems() == []
        assert only_local(browser.requests(), service.url) == []


# ---------------------------------------------------------------------------- screenshots

def screenshot(url: str, out: Path, wait_s: float, ready: Callable[[Browser], bool]) -> None:
    """Open `url`'s dashboard, let it poll for `wait_s`, and save a full-page PNG."""
    assert CHROMIUM is not None, "chromium is not installed"
    profile = Path(os.environ.get("TMPDIR", "/tmp")) / f"ctrloop-shot-{os.getpid()}"
    b = Browser(CHROMIUM, profile)
    try:
        b.goto(f"{url.rstrip('/')}/dashboard")
        b.wait_for("document.body.dataset.ready === '1'", PAGE_TIMEOUT_S, "dashboard data")
        b.pump(wait_s)
        if not ready(b):
            print("note: some panels have no data yet")
        b.screenshot(out)
        print(f"wrote {out}; page problems: {b.problems()}")
    finally:
        b.close()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="screenshot of a running service's dashboard")
    parser.add_argument("url", help="the service's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("out", type=Path)
    parser.add_argument("--wait", type=float, default=45.0, help="seconds of polling first")
    a = parser.parse_args()
    screenshot(a.url, a.out, a.wait, lambda b: bool(b.evaluate(
        "[...document.querySelectorAll('section')].every(s => s.dataset.hasData === '1')")))
