"""Issue 10, the service's side: one set of limits with the trainer (what the service accepts
or logs, the trainer's decoder accepts), the event-time bound (no far-future ts), the
contract's JSON messages, the OpenAPI's integers and nulls, /docs without a CDN, one version,
and the Kafka sink's outage behaviour (logged only when handed to a live producer, one line
per outage, no tracebacks from closing producers)."""

from __future__ import annotations

import logging
import re
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka.errors import KafkaTimeoutError
from service_fakes import RecordingSink

import ctrloop
from ctrloop.core.events import MAX_FEATURES, MAX_LINE_BYTES, Click, Impression, decode_event
from ctrloop.dev.localservers import free_port
from ctrloop.io.registry import InMemoryRegistry
from ctrloop.service import sink as sink_module
from ctrloop.service.app import create_app
from ctrloop.service.schemas import duplicate_key
from ctrloop.service.settings import ServiceSettings
from ctrloop.service.sink import EventSink

ROOT = Path(__file__).resolve().parents[2]
FAR_FUTURE = 4070908800.0  # 2099-01-01: inside the contract's 2000-2100, far ahead of now


@pytest.fixture(autouse=True)
def _single_process_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def client(sink: RecordingSink) -> Iterator[TestClient]:
    settings_ = ServiceSettings(reload_poll_s=3600, max_event_ahead_s=600)
    app = create_app(settings_, registry=InMemoryRegistry(), sink=sink)  # type: ignore[arg-type]
    with TestClient(app) as c:
        yield c


def score_body(shared: dict[str, Any] | None = None, cand: dict[str, Any] | None = None,
               n: int = 3, **extra: Any) -> dict[str, Any]:
    return {"user_id": "u1", "features": shared or {"user.age": "25-34"},
            "candidates": [{"ad_id": f"a{j}", "advertiser_id": "adv",
                            "features": cand or {"ad.category": "games"}} for j in range(n)],
            **extra}


def click(ts: float) -> dict[str, Any]:
    return {"type": "click", "impression_id": "i1", "ts": ts}


# ---------------------------------------------------------------------------- B: event time


def test_a_far_future_event_is_refused_with_its_index(client: TestClient,
                                                      sink: RecordingSink) -> None:
    now = time.time()
    r = client.post("/v1/events", json={"events": [click(now - 5), click(FAR_FUTURE)]})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert [e["index"] for e in detail["errors"]] == [1]
    assert "ahead of the receiving clock" in detail["errors"][0]["reason"]
    assert "CTRLOOP_MAX_EVENT_AHEAD_S" in detail["errors"][0]["reason"]
    assert sink.produced == []  # nothing of the batch
    # Within the bound (a sender's clock a little ahead) is fine.
    r = client.post("/v1/events", json={"events": [click(now + 300)]})
    assert r.status_code == 202, r.text


def test_the_bound_is_configurable(sink: RecordingSink) -> None:
    settings_ = ServiceSettings(reload_poll_s=3600, max_event_ahead_s=5)
    app = create_app(settings_, registry=InMemoryRegistry(), sink=sink)  # type: ignore[arg-type]
    with TestClient(app) as c:
        r = c.post("/v1/events", json={"events": [click(time.time() + 60)]})
        assert r.status_code == 422, r.text


def test_score_with_logging_refuses_a_far_future_ts(client: TestClient,
                                                    sink: RecordingSink) -> None:
    logged = {"top_k": 1, "log": True}
    r = client.post("/v1/score", json=score_body(ts=FAR_FUTURE, options=logged))
    assert r.status_code == 422, r.text
    assert "ts" in r.json()["detail"] and "ahead" in r.json()["detail"]
    assert sink.logged == []
    # Without logging the ts carries nothing to the trainer: scored as usual.
    r = client.post("/v1/score", json=score_body(ts=FAR_FUTURE))
    assert r.status_code == 200, r.text
    r = client.post("/v1/score", json=score_body(ts=time.time(), options=logged))
    assert r.status_code == 200 and r.json()["logged"] is True


# ---------------------------------------------------------------------------- G: one set of limits


def test_an_event_the_trainer_would_dead_letter_for_its_size_is_refused(
    client: TestClient, sink: RecordingSink
) -> None:
    features = {f"f{j}": "x" * 1024 for j in range(256)}  # each valid; 290 KB together
    imp = {"type": "impression", "impression_id": "i1", "ts": time.time(), "user_id": "u",
           "ad_id": "a", "advertiser_id": "b", "features": features}
    r = client.post("/v1/events", json={"events": [imp]})
    assert r.status_code == 422, r.text
    assert f"at most {MAX_LINE_BYTES} allowed" in r.json()["detail"]["errors"][0]["reason"]
    assert sink.produced == []


def test_score_refuses_to_log_merged_features_over_the_contract(
    client: TestClient, sink: RecordingSink
) -> None:
    shared = {f"user.f{j}": 1 for j in range(256)}
    cand = {f"ad.f{j}": 1 for j in range(256)}
    r = client.post("/v1/score", json=score_body(shared, cand,
                                                 options={"top_k": 1, "log": True}))
    assert r.status_code == 422, r.text
    assert f"at most {MAX_FEATURES}" in r.json()["detail"]
    assert sink.logged == []
    # Policy: the bound is on what is logged; scoring without logging takes them.
    r = client.post("/v1/score", json=score_body(shared, cand, options={"top_k": 1}))
    assert r.status_code == 200, r.text
    # Overlapping names merge (the candidate's win): 256 after merging is fine.
    r = client.post("/v1/score", json=score_body(shared, {"user.f0": 2},
                                                 options={"top_k": 1, "log": True}))
    assert r.status_code == 200 and r.json()["logged"] is True, r.text


def test_score_refuses_to_log_an_impression_over_the_size_limit(
    client: TestClient, sink: RecordingSink
) -> None:
    shared = {f"user.f{j}": "y" * 1024 for j in range(40)}
    cand = {f"ad.f{j}": "z" * 1024 for j in range(40)}  # 80 KB per merged impression
    r = client.post("/v1/score", json=score_body(shared, cand,
                                                 options={"top_k": 2, "log": True}))
    assert r.status_code == 422, r.text
    assert "bytes encoded" in r.json()["detail"] and "a0" in r.json()["detail"]
    assert sink.logged == []


names = st.sampled_from(["user.age", "ctx.device", "ad.category", "x" * 128, "é:\"\\",
                         "u.\u2028", "n"])
values = st.one_of(st.text(max_size=40), st.sampled_from(["é" * 1024, "\x00" * 1024]),
                   st.integers(-(10**12), 10**12), st.floats(-1e12, 1e12, allow_nan=False),
                   st.booleans(), st.none())
feature_dicts = st.dictionaries(names, values, max_size=7)
ids = st.one_of(st.text(min_size=1, max_size=10), st.just("i" * 128))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large])
@given(shared=feature_dicts, cands=st.lists(st.tuples(ids, ids, feature_dicts), min_size=1,
                                              max_size=5),
       top_k=st.integers(1, 5), request_id=st.none() | ids, explore=st.booleans(),
       ts=st.none() | st.floats(946684800.0, time.time()))
def test_whatever_the_service_logs_the_trainer_decodes(
    shared: dict[str, Any], cands: list[tuple[str, str, dict[str, Any]]], top_k: int,
    request_id: str | None, explore: bool, ts: float | None
) -> None:
    sink = RecordingSink()
    app = create_app(ServiceSettings(reload_poll_s=3600), registry=InMemoryRegistry(),
                     sink=sink)  # type: ignore[arg-type]
    body: dict[str, Any] = {
        "user_id": "u1", "features": shared,
        "candidates": [{"ad_id": a, "advertiser_id": b, "features": f} for a, b, f in cands],
        "options": {"top_k": top_k, "log": True, "explore": explore}}
    if request_id is not None:
        body["request_id"] = request_id
    if ts is not None:
        body["ts"] = ts
    with TestClient(app) as c:
        r = c.post("/v1/score", json=body)
    assert r.status_code in (200, 422), r.text
    if r.status_code == 422:
        assert sink.logged == []
        return
    assert r.json()["logged"] is True
    assert len(sink.logged) == min(top_k, len(cands))
    for (_, key, value), item in zip(sink.logged, r.json()["candidates"], strict=True):
        imp = decode_event(value, "impression")  # the trainer's own decoder: no exception
        assert isinstance(imp, Impression)
        assert key.decode() == imp.impression_id == item["impression_id"]
        assert imp.position == item["rank"] and imp.ad_id == item["ad_id"]


# ---------------------------------------------------------------------------- JSON messages


EVENTS_NAN = b'{"events": [{"type": "click", "impression_id": "i", "ts": NaN}]}'
SCORE_INF = (b'{"user_id": "u", "candidates": [{"ad_id": "a", "advertiser_id": "b", '
             b'"bid": Infinity}]}')
NOT_UTF8 = b'{"events": [{"type": "click", "impression_id": "\xff\xfe", "ts": 1767225600}]}'
SCORE_NOT_UTF8 = b'{"user_id": "\xff", "candidates": [{"ad_id": "a", "advertiser_id": "b"}]}'


@pytest.mark.parametrize(("path", "body", "status", "says"), [
    ("/v1/events", EVENTS_NAN, 400, "NaN and Infinity are not JSON"),
    ("/v1/events", NOT_UTF8, 400, "not UTF-8: byte 48 (0xff)"),
    # pydantic reads the literal and words it as a field error, which says as much.
    ("/v1/score", SCORE_INF, 422, "finite number"),
    ("/v1/score", SCORE_NOT_UTF8, 400, "not UTF-8: byte 13 (0xff)"),
])
def test_json_errors_say_what_is_wrong(client: TestClient, path: str, body: bytes,
                                       status: int, says: str) -> None:
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    detail = str(r.json()["detail"])
    assert says in detail, detail
    assert "surrogates" not in detail and "column" not in detail


# ---------------------------------------------------------------------------- OpenAPI drift


def test_integral_floats_are_the_integers_the_schema_promises(client: TestClient,
                                                              sink: RecordingSink) -> None:
    imp = {"type": "impression", "impression_id": "i1", "ts": time.time(), "user_id": "u",
           "ad_id": "a", "advertiser_id": "b", "position": 1185.0, "model_version": 3.0}
    r = client.post("/v1/events", json={"events": [imp]})
    assert r.status_code == 202, r.text
    value = orjson.loads(sink.produced[0][2])
    assert value["position"] == 1185 and type(value["position"]) is int
    assert value["model_version"] == "3"
    r = client.post("/v1/events", json={"events": [dict(imp, position=1.5)]})
    assert r.status_code == 422
    # The schema's bounds are the parser's: beyond ±2^53 both refuse.
    r = client.post("/v1/events", json={"events": [dict(imp, model_version=2**53 + 2)]})
    assert r.status_code == 422
    bound = client.get("/openapi.json").json()["components"]["schemas"]["ImpressionEvent"][
        "properties"]["model_version"]["anyOf"][1]
    assert (bound["minimum"], bound["maximum"]) == (-(2**53), 2**53)


def test_null_features_are_documented(client: TestClient, sink: RecordingSink) -> None:
    imp = {"type": "impression", "impression_id": "i1", "ts": time.time(), "user_id": "u",
           "ad_id": "a", "advertiser_id": "b", "features": None}
    assert client.post("/v1/events", json={"events": [imp]}).status_code == 202
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    feats = schemas["ImpressionEvent"]["properties"]["features"]
    assert {"type": "null"} in feats["anyOf"], feats


def test_conversion_type_null_is_documented(client: TestClient, sink: RecordingSink) -> None:
    conv = {"type": "conversion", "impression_id": "i1", "ts": time.time(),
            "conversion_type": None}
    assert client.post("/v1/events", json={"events": [conv]}).status_code == 202
    assert orjson.loads(sink.produced[0][2])["conversion_type"] == "default"
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    ctype = schemas["ConversionEvent"]["properties"]["conversion_type"]
    assert {"type": "null"} in ctype["anyOf"], ctype


# ---------------------------------------------------------------------------- /docs, version


def test_docs_load_swagger_ui_from_the_service_itself(client: TestClient) -> None:
    r = client.get("/docs")
    assert r.status_code == 200
    urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", r.text)
    assert len(urls) >= 4, urls  # the bundle, the stylesheet, the favicon, the OpenAPI
    for url in urls:
        assert url.startswith("/"), f"/docs loads {url} from elsewhere: blank offline"
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert asset.content, url
    assert "cdn" not in r.text.lower()
    assert client.get("/redoc").status_code == 404  # would load from a CDN: not served


def test_the_assets_are_package_data() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["ctrloop.service"]
    assets = ROOT / "service" / "static" / "swagger-ui"
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png", "LICENSE"):
        assert (assets / name).is_file(), name
        assert any((assets / name).relative_to(ROOT / "service").match(p) for p in patterns)


def test_one_version_defined_in_pyproject(client: TestClient) -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert ctrloop.__version__ == declared
    assert client.get("/openapi.json").json()["info"]["version"] == declared


# ---------------------------------------------------------------------------- the Kafka sink


class _FlushFails:
    """A KafkaProducer whose flush times out, as with Kafka down: close() raised before the
    producer was marked closed (and __del__ raised again)."""

    def __init__(self) -> None:
        self.closes: list[float] = []
        self.closed = False

    def flush(self, timeout: float | None = None) -> None:
        raise KafkaTimeoutError("Failed to flush buffered records within 0 secs")

    def close(self, timeout: float | None = None) -> None:
        self.closes.append(timeout or 0.0)
        self.flush(timeout)
        self.closed = True


def test_closing_a_producer_kafka_cannot_flush_never_raises() -> None:
    p = _FlushFails()
    lost = sink_module._close_quietly(p, 2.0)  # type: ignore[arg-type]
    assert lost is not None and "KafkaTimeoutError" in lost
    assert p.closed and p.closes == [2.0, 0]  # the second close skipped the flush


def test_without_kafka_nothing_is_called_logged_and_the_outage_is_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ctrloop.service.sink")
    failed: list[int] = []
    states: list[bool] = []
    sink = EventSink(f"127.0.0.1:{free_port()}", "impressions", produce_timeout_s=0.3,
                     on_log_failed=failed.append, on_state=states.append)
    try:
        deadline = time.monotonic() + 10
        while sink.kafka_state() != "unavailable":
            assert time.monotonic() < deadline, sink.kafka_state()
            time.sleep(0.05)
        record = ("impressions", b"k", b"{}")
        assert sink.log([record, record]) is False
        assert failed == [2]
        time.sleep(3.5)  # several monitor rounds and reconnect attempts
        assert sink.log([record]) is False
    finally:
        sink.close(timeout=2.0)
    # kafka-python's own reconnect chatter is silenced by the service (app_from_env); what
    # the service itself says is one line.
    warnings = [r for r in caplog.records
                if r.name == "ctrloop.service.sink" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    msg = warnings[0].getMessage()
    assert "unavailable" in msg and "CTRLOOP_KAFKA_BOOTSTRAP" in msg and "logged:false" in msg
    assert states == [False]
    assert not any(r.exc_info for r in caplog.records if r.name.startswith("service"))


def test_readyz_reports_kafka_and_stays_ready(sink: RecordingSink) -> None:
    app = create_app(ServiceSettings(reload_poll_s=3600), registry=InMemoryRegistry(),
                     sink=sink)  # type: ignore[arg-type]
    with TestClient(app) as c:
        assert c.get("/readyz").json()["kafka"] == "connected"
        sink.down = True
        r = c.get("/readyz")
        assert r.status_code == 200, "scoring works without Kafka: still ready"
        assert r.json()["kafka"] == "unavailable"
        r = c.post("/v1/score", json=score_body(options={"top_k": 2, "log": True}))
        assert r.status_code == 200
        assert r.json()["logged"] is False
        assert all("impression_id" not in item for item in r.json()["candidates"])


def test_a_click_event_round_trips_through_the_contract(client: TestClient,
                                                        sink: RecordingSink) -> None:
    now = time.time()
    assert client.post("/v1/events", json={"events": [click(now)]}).status_code == 202
    assert decode_event(sink.produced[0][2], "click") == Click("i1", now)


# ---------------------------------------------------------------------------- duplicate keys


@pytest.mark.parametrize(("body", "key"), [
    (b'{"a": 1, "a": 2}', "a"),
    (b'{"x": {"b": ":", "b": "::"}}', "b"),
    (b'[{"k:1": 1}, {"k:1": 1, "k:1": 1}]', "k:1"),
    (b'{"a": "\\u003a", "a": 1}', "a"),
    (b'{"a": 1, "b": "x:y", "c": {"d": [1, {"e": ":"}]}}', None),
    (b'{"a": "\\u003a"}', None),  # an escaped colon: the slow check finds no repeat
    (b'{"a": {"a": {"a": 1}}}', None),  # the same key in different objects is fine
])
def test_duplicate_keys_are_found(body: bytes, key: str | None) -> None:
    problem = duplicate_key(body, orjson.loads(body))
    if key is None:
        assert problem is None
    else:
        assert problem is not None and f"duplicate key {key!r}" in problem


json_docs = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.text(alphabet=":ab\"\\é", max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(alphabet=":ab\"\\é", max_size=4), inner, max_size=3),
    max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(doc=json_docs)
def test_documents_without_repeats_pass(doc: Any) -> None:
    body = orjson.dumps(doc)
    assert duplicate_key(body, orjson.loads(body)) is None


@pytest.mark.parametrize("path", ["/v1/score", "/v1/events"])
def test_a_repeated_key_is_refused(client: TestClient, sink: RecordingSink, path: str) -> None:
    body = (b'{"user_id": "u", "user_id": "v", "candidates": [{"ad_id": "a", '
            b'"advertiser_id": "b"}]}' if path == "/v1/score" else
            b'{"events": [{"type": "click", "impression_id": "i", "impression_id": "j", '
            b'"ts": 1767225600}]}')
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "duplicate key" in r.json()["detail"]
    assert sink.produced == [] and sink.logged == []
