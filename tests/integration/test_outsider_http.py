"""The scoring service as an outsider meets it (issue 10, "make it a habit"): a real
`ctrloop serve` process on a socket, hostile bodies sent over HTTP, and a real Kafka outage.

Every hostile body gets a 4xx with a JSON `detail` that says what is wrong — never a 5xx, a
hang or a dead worker — and the service keeps answering afterwards. A Kafka outage is said
once (one WARNING, one recovery line, no traceback), /readyz reports it while staying ready,
and /v1/score says `logged: false` for impressions it could not hand to a live producer."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ctrloop.dev.localservers import KafkaBroker, RedisServer, free_port
from ctrloop.io.kafka import create_topics

from .service_process import ServiceProcess

pytestmark = pytest.mark.integration

CAND = b'{"ad_id": "a", "advertiser_id": "b"}'
SCORE_OK = {"user_id": "u", "candidates": [{"ad_id": "a", "advertiser_id": "b"}]}


def score_body(extra: bytes = b"", cands: bytes = b"[" + CAND + b"]") -> bytes:
    return b'{"user_id": "u", ' + extra + b'"candidates": ' + cands + b"}"


def click_body(value: bytes) -> bytes:
    return b'{"events": [{"type": "click", "impression_id": "i", "ts": ' + value + b"}]}"


# (name, path, body, statuses allowed, words the detail must contain)
HOSTILE: list[tuple[str, str, bytes, set[int], str]] = [
    ("depth 100,000 arrays", "/v1/score", b"[" * 100_000 + b"]" * 100_000, {400}, "JSON"),
    ("depth 100,000 arrays", "/v1/events", b"[" * 100_000 + b"]" * 100_000, {400}, "JSON"),
    ("depth 100,000 in a field", "/v1/score",
     score_body(cands=b"[" * 100_000 + b"]" * 100_000), {400, 422}, ""),
    ("depth 100,000 objects", "/v1/events", b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
     {400}, "JSON"),
    ("10 MB", "/v1/score", score_body(b'"features": {"x": "' + b"y" * (10 << 20) + b'"}, '),
     {413}, "CTRLOOP_MAX_BODY_BYTES"),
    ("10 MB", "/v1/events", click_body(b"1" + b"0" * (10 << 20)), {413},
     "CTRLOOP_MAX_BODY_BYTES"),
    ("NaN", "/v1/events", click_body(b"NaN"), {400}, "NaN and Infinity are not JSON"),
    ("Infinity", "/v1/events", click_body(b"Infinity"), {400}, "NaN and Infinity"),
    ("-Infinity bid", "/v1/score",
     score_body(cands=b'[{"ad_id": "a", "advertiser_id": "b", "bid": -Infinity}]'), {422},
     "finite number"),
    ("NaN feature", "/v1/score", score_body(b'"features": {"x": NaN}, '), {400, 422}, ""),
    ("duplicate keys", "/v1/score",
     b'{"user_id": "u", "user_id": "v", "candidates": [' + CAND + b"]}", {400},
     "duplicate key"),
    ("duplicate keys", "/v1/events",
     b'{"events": [{"type": "click", "type": "impression", "impression_id": "i", '
     b'"ts": 1767225600}]}', {400}, "duplicate key"),
    ("invalid UTF-8", "/v1/events",
     b'{"events": [{"type": "click", "impression_id": "\xc3\x28", "ts": 1767225600}]}',
     {400}, "not UTF-8"),
    ("invalid UTF-8", "/v1/score", score_body(b'"request_id": "\xff", '), {400}, "not UTF-8"),
    ("lone surrogate", "/v1/events",
     b'{"events": [{"type": "click", "impression_id": "\\ud800", "ts": 1767225600}]}',
     {400, 422}, ""),
    ("10,000 candidates", "/v1/score",
     score_body(cands=b"[" + b",".join([CAND] * 10_000) + b"]"), {422},
     "CTRLOOP_MAX_CANDIDATES"),
    ("10,001 candidates", "/v1/score",
     score_body(cands=b"[" + b",".join([CAND] * 10_001) + b"]"), {422}, ""),
    ("not an object", "/v1/events", b"[1, 2, 3]", {422}, "events"),
    ("empty", "/v1/score", b"", {400}, "JSON"),
    ("far-future click", "/v1/events", click_body(b"4070908800.0"), {422}, "ahead"),
]


@pytest.fixture(scope="module")
def service(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[ServiceProcess]:
    # No broker at all: hostile bodies must be refused before anything reaches Kafka.
    env = {"CTRLOOP_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
           "CTRLOOP_REDIS_URL": redis_server.url, "CTRLOOP_REGISTRY_NAMESPACE": "outsider",
           "CTRLOOP_PRODUCE_TIMEOUT_S": "1"}
    with ServiceProcess(env, tmp_path_factory.mktemp("outsider")) as s:
        yield s


@pytest.mark.parametrize(("name", "path", "body", "allowed", "says"), HOSTILE,
                         ids=[f"{p}: {n}" for n, p, *_ in HOSTILE])
def test_hostile_bodies_get_a_clear_4xx(service: ServiceProcess, name: str, path: str,
                                        body: bytes, allowed: set[int], says: str) -> None:
    t0 = time.monotonic()
    r = httpx.post(service.url + path, content=body, timeout=30,
                   headers={"content-type": "application/json"})
    took = time.monotonic() - t0
    assert r.status_code in allowed, (name, r.status_code, r.text[:500])
    assert r.headers["content-type"] == "application/json"
    detail = r.json()["detail"]
    assert detail, r.text
    assert says in str(detail), (name, r.text[:500])
    assert took < 10, f"{name}: {took:.1f} s"
    # Still up, and still scoring.
    assert httpx.post(service.url + "/v1/score", json=SCORE_OK, timeout=10).status_code == 200


def test_a_chunked_10_mb_body_is_cut_off(service: ServiceProcess) -> None:
    """No Content-Length: the limit applies while reading, not only to the header."""
    def chunks() -> Iterator[bytes]:
        yield b'{"events": [{"type": "click", "impression_id": "'
        for _ in range(10):
            yield b"x" * (1 << 20)
        yield b'", "ts": 1767225600}]}'

    r = httpx.post(service.url + "/v1/events", content=chunks(), timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    assert "CTRLOOP_MAX_BODY_BYTES" in r.json()["detail"]
    assert httpx.get(service.url + "/healthz", timeout=10).status_code == 200


def test_the_service_log_has_no_traceback(service: ServiceProcess) -> None:
    for _, path, body, *_ in HOSTILE[:4]:
        httpx.post(service.url + path, content=body, timeout=30)
    assert "Traceback" not in service.log_tail(1 << 20)


# ---------------------------------------------------------------------------- Kafka outage


def wait_for(check: Any, what: str, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_kafka_outage_is_reported_once_and_logged_is_the_truth(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    port = free_port()
    topics = ["outage.impressions", "outage.clicks", "outage.conversions"]
    broker = KafkaBroker(tmp_path / "kafka", port=port).start()
    env = {"CTRLOOP_KAFKA_BOOTSTRAP": broker.bootstrap, "CTRLOOP_REDIS_URL": redis_server.url,
           "CTRLOOP_REGISTRY_NAMESPACE": "outage", "CTRLOOP_PRODUCE_TIMEOUT_S": "2",
           "CTRLOOP_TOPIC_IMPRESSIONS": topics[0], "CTRLOOP_TOPIC_CLICKS": topics[1],
           "CTRLOOP_TOPIC_CONVERSIONS": topics[2],
           "CTRLOOP_TOPIC_DEAD_LETTER": "outage.dead-letter"}
    logged = {**SCORE_OK, "options": {"top_k": 1, "log": True}}
    try:
        create_topics(broker.bootstrap, topics)
        with ServiceProcess(env, tmp_path) as s:
            def kafka() -> str:
                return str(httpx.get(s.url + "/readyz", timeout=10).json()["kafka"])

            def score() -> dict[str, Any]:
                r = httpx.post(s.url + "/v1/score", json=logged, timeout=10)
                assert r.status_code == 200, r.text
                return dict(r.json())

            wait_for(lambda: kafka() == "connected", "Kafka connected")
            body = score()
            assert body["logged"] is True and body["candidates"][0]["impression_id"]

            broker.stop()
            # A batch the broker never acknowledged: its producer is replaced (closing one
            # that cannot flush is where the tracebacks came from).
            r = httpx.post(s.url + "/v1/events", timeout=30, json={"events": [
                {"type": "click", "impression_id": "i", "ts": time.time()}]})
            assert r.status_code == 503, r.text
            wait_for(lambda: kafka() == "unavailable", "the outage seen")
            r = httpx.get(s.url + "/readyz", timeout=10)
            assert r.status_code == 200  # scoring needs no Kafka: still ready
            body = score()
            assert body["logged"] is False
            assert "impression_id" not in body["candidates"][0]
            time.sleep(5)  # several monitor rounds and reconnect attempts during the outage
            assert score()["logged"] is False
            outage_log = s.log_tail(1 << 20)

            broker = KafkaBroker(tmp_path / "kafka", port=port).start()
            create_topics(broker.bootstrap, topics)
            wait_for(lambda: kafka() == "connected", "Kafka back", timeout_s=45)
            wait_for(lambda: score()["logged"], "impressions logged again")
            # A second outage, and the service stopped during it: closing producers that
            # cannot flush must not print tracebacks either.
            broker.stop()
            wait_for(lambda: kafka() == "unavailable", "the second outage seen")
        log = s.log_tail(1 << 20)
    finally:
        broker.stop()
    warnings = re.findall(r"WARNING ctrloop\.service\.sink: .*", outage_log)
    assert len(warnings) == 1, warnings  # one line for the first outage, however long
    assert "CTRLOOP_KAFKA_BOOTSTRAP" in warnings[0]
    assert len(re.findall(r"WARNING ctrloop\.service\.sink: Kafka at .* is unavailable", log)) == 2
    assert len(re.findall(r"INFO ctrloop\.service\.sink: Kafka at .* is reachable again", log)) == 1
    assert "Traceback" not in log, log[-3000:]
    assert "Exception ignored" not in log, log[-3000:]
