"""`ctrloop serve` against a real Tansu broker: impressions logged by /v1/score reach the
impressions topic with the features that were scored; /v1/events acknowledges (202) only what
Kafka holds, answers 503 with Retry-After while the broker is down, and accepts the refused
batch again once a broker is back.

Tansu keeps everything in memory, so a stopped broker loses its topics: "nothing acknowledged
is lost" is checked by reading every acknowledged batch back from the topics *before* the
broker is stopped; after the restart the retried batch is read back from the new broker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import torch
from kafka import TopicPartition

from ctrloop.core.events import Impression, decode_event
from ctrloop.core.features import FeatureEncoder, FeatureSpec, Field
from ctrloop.core.models import build_model
from ctrloop.core.snapshot import encode_snapshot
from ctrloop.dev.localservers import KafkaBroker, RedisServer, free_port
from ctrloop.io.kafka import create_topics, make_consumer, missing_topics
from ctrloop.io.registry import RedisRegistry
from ctrloop.service.sink import EventSink, SinkUnavailable

from .service_process import ServiceProcess

pytestmark = pytest.mark.integration

SPEC = FeatureSpec((
    Field("user.id", "categorical", "user", 256),
    Field("user.age", "categorical", "user", 32),
    Field("user.premium", "categorical", "user", 8),
    Field("ctx.device", "categorical", "context", 16),
    Field("ad.id", "categorical", "ad", 256),
    Field("ad.advertiser_id", "categorical", "ad", 64),
    Field("ad.category", "categorical", "ad", 32),
))
PRODUCE_TIMEOUT_S = 2.0
KINDS = ("impressions", "clicks", "conversions")


def topics_of(prefix: str) -> dict[str, str]:
    return {kind: f"{prefix}{kind}" for kind in KINDS}


def service_env(prefix: str, bootstrap: str, redis_url: str) -> dict[str, str]:
    topics = topics_of(prefix)
    return {"CTRLOOP_KAFKA_BOOTSTRAP": bootstrap, "CTRLOOP_REDIS_URL": redis_url,
            "CTRLOOP_REGISTRY_NAMESPACE": prefix,
            "CTRLOOP_TOPIC_IMPRESSIONS": topics["impressions"],
            "CTRLOOP_TOPIC_CLICKS": topics["clicks"],
            "CTRLOOP_TOPIC_CONVERSIONS": topics["conversions"],
            "CTRLOOP_TOPIC_DEAD_LETTER": f"{prefix}dead-letter",
            "CTRLOOP_PRODUCE_TIMEOUT_S": str(PRODUCE_TIMEOUT_S), "CTRLOOP_RETRY_AFTER_S": "1",
            "CTRLOOP_RELOAD_POLL_S": "1"}


def read_topic(bootstrap: str, topic: str, want: int, timeout_s: float = 20.0
               ) -> list[tuple[bytes, dict[str, Any]]]:
    """(key, decoded value) of every record of a one-partition topic, once at least `want`
    are there (or the timeout passed)."""
    consumer = make_consumer(bootstrap, None, [], consumer_timeout_ms=500)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    out: list[tuple[bytes, dict[str, Any]]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < want and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                out.extend((r.key, orjson.loads(r.value)) for r in records)
    finally:
        consumer.close()
    return out


@pytest.fixture
def spec_model_published(redis_server: RedisServer, topic_prefix: str) -> Iterator[Any]:
    torch.manual_seed(3)
    model = build_model("fwfm", SPEC, dim=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    registry = RedisRegistry.from_url(redis_server.url, topic_prefix)
    v = registry.next_version()
    registry.publish(v, encode_snapshot(model.eval(), v), {})
    yield model
    registry.r.close()


def test_logged_impressions_reach_the_topic_with_the_scored_features(
    kafka_broker: KafkaBroker, redis_server: RedisServer, topic_prefix: str, tmp_path: Path,
    spec_model_published: Any
) -> None:
    topics = topics_of(topic_prefix)
    create_topics(kafka_broker.bootstrap, topics.values())
    env = service_env(topic_prefix, kafka_broker.bootstrap, redis_server.url)
    request = {
        "user_id": "u9", "ts": 1767225600.5,
        "features": {"user.age": "35-44", "user.premium": True, "ctx.device": "android"},
        "candidates": [
            {"ad_id": f"a{j}", "advertiser_id": f"adv{j % 2}", "bid": 100.0**j,
             "features": {"ad.category": f"c{j}", **({"ctx.device": "tv"} if j == 3 else {})}}
            for j in range(5)
        ],
        "options": {"top_k": 3, "log": True},
    }
    with ServiceProcess(env, tmp_path) as service:
        bodies = []
        for _ in range(3):
            r = httpx.post(f"{service.url}/v1/score", json=request, timeout=10)
            assert r.status_code == 200, r.text
            bodies.append(r.json())
        deadline = time.monotonic() + 20
        while service.metric("ctrloop_impressions_logged_total") < 9:
            assert time.monotonic() < deadline, service.log_tail()
            time.sleep(0.1)
        assert service.metric("ctrloop_impressions_log_failed_total") == 0

    shown = {c["impression_id"]: c for body in bodies for c in body["candidates"]}
    assert len(shown) == 9
    assert all(body["model_version"] == "1" and body["logged"] for body in bodies)
    records = read_topic(kafka_broker.bootstrap, topics["impressions"], 9)
    assert sorted(k.decode() for k, _ in records) == sorted(shown)
    encoder = FeatureEncoder(SPEC)
    for key, value in records:
        item = shown[key.decode()]
        imp = decode_event(orjson.dumps(value), "impression")
        assert isinstance(imp, Impression)
        cand = next(c for c in request["candidates"] if c["ad_id"] == item["ad_id"])
        merged = {**request["features"], **cand["features"], "user.premium": "true"}
        assert imp.features == merged
        assert (imp.user_id, imp.ad_id, imp.advertiser_id) == ("u9", cand["ad_id"],
                                                               cand["advertiser_id"])
        assert imp.ts == 1767225600.5
        assert imp.position == item["rank"]
        assert imp.model_version == "1"
        assert imp.propensity == 1.0
        # The trainer's encoding of this impression gives the pCTR the service answered.
        with torch.inference_mode():
            logit = spec_model_published(torch.tensor([encoder.encode(imp)]))
        assert item["pctr"] == pytest.approx(torch.sigmoid(logit).item(), rel=1e-5)
    assert {shown[k.decode()]["ad_id"] for k, _ in records} == {"a4", "a3", "a2"}  # by bid
    assert read_topic(kafka_broker.bootstrap, topics["clicks"], 1, timeout_s=1) == []


def batch(n: int, tag: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for j in range(n):
        imp_id = f"{tag}-{j}"
        kind = ("impression", "click", "conversion")[j % 3]
        event: dict[str, Any] = {"type": kind, "impression_id": imp_id,
                                 "ts": 1767225600.0 + j}
        if kind == "impression":
            event.update(user_id=f"u{j}", ad_id=f"a{j}", advertiser_id="adv",
                         features={"ctx.device": "ios", "n": j})
        elif kind == "conversion":
            event["conversion_type"] = "purchase"
        events.append(event)
    return events


def as_records(events: list[dict[str, Any]], topics: dict[str, str]
               ) -> list[tuple[str, bytes, bytes]]:
    """What the topics must hold for `events`: (topic, key, canonical JSON without `type`)."""
    out = []
    for e in events:
        body = {k: v for k, v in e.items() if k != "type"}
        out.append((topics[e["type"] + "s"], e["impression_id"].encode(),
                    orjson.dumps(body, option=orjson.OPT_SORT_KEYS)))
    return sorted(out)


def read_all(bootstrap: str, topics: dict[str, str], want: list[tuple[str, bytes, bytes]]
             ) -> list[tuple[str, bytes, bytes]]:
    """Every record of the topics, sorted, as (topic, key, canonical JSON); each topic is read
    until it holds at least as many records as `want` has for it."""
    got: list[tuple[str, bytes, bytes]] = []
    for topic in topics.values():
        n = sum(1 for t, _, _ in want if t == topic)
        for key, value in read_topic(bootstrap, topic, n, timeout_s=20 if n else 1):
            got.append((topic, key, orjson.dumps(value, option=orjson.OPT_SORT_KEYS)))
    return sorted(got)


def test_events_are_acknowledged_only_when_kafka_has_them(
    redis_server: RedisServer, topic_prefix: str, tmp_path: Path
) -> None:
    topics = topics_of(topic_prefix)
    port = free_port()
    broker = KafkaBroker(tmp_path / "kafka", port=port).start()
    try:
        create_topics(broker.bootstrap, topics.values())
        env = service_env(topic_prefix, broker.bootstrap, redis_server.url)
        with ServiceProcess(env, tmp_path) as service:
            url = f"{service.url}/v1/events"
            acked: list[dict[str, Any]] = []
            for b in range(5):
                events = batch(12, f"b{b}")
                r = httpx.post(url, json={"events": events}, timeout=30)
                assert r.status_code == 202, r.text
                assert r.json() == {"accepted": 12, "by_type": {"impression": 4, "click": 4,
                                                                "conversion": 4}}
                acked.extend(events)
            # Every acknowledged event is in its topic (read back before the broker goes).
            want = as_records(acked, topics)
            assert read_all(broker.bootstrap, topics, want) == want  # all there, once each

            broker.stop()
            refused = batch(9, "during-outage")
            t0 = time.monotonic()
            r = httpx.post(url, json={"events": refused}, timeout=30)
            took = time.monotonic() - t0
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            assert "retry it" in r.json()["detail"]
            assert took < PRODUCE_TIMEOUT_S + 2.0, f"503 after {took:.1f} s"
            r = httpx.post(url, json={"events": refused}, timeout=30)  # still down: 503 again
            assert r.status_code == 503
            assert service.metric("ctrloop_events_unavailable_total") >= 2
            # Scoring does not depend on Kafka.
            r = httpx.post(f"{service.url}/v1/score", timeout=10, json={
                "user_id": "u", "candidates": [{"ad_id": "a", "advertiser_id": "b"}]})
            assert r.status_code == 200

            broker = KafkaBroker(tmp_path / "kafka", port=port).start()  # memory: empty
            create_topics(broker.bootstrap, topics.values())
            deadline = time.monotonic() + 45
            while True:  # the client's retry loop, honouring Retry-After
                r = httpx.post(url, json={"events": refused}, timeout=30)
                if r.status_code == 202:
                    break
                assert r.status_code == 503, r.text
                assert time.monotonic() < deadline, f"still 503 after the restart: {r.text}"
                time.sleep(float(r.headers["retry-after"]))
            assert r.json()["accepted"] == 9
            want = as_records(refused, topics)
            # At-least-once: an attempt that timed out may have landed too (a duplicate), but
            # every event of the batch is there and nothing else is.
            assert set(read_all(broker.bootstrap, topics, want)) == set(want)
            assert service.metric('ctrloop_events_produced_total', 'type="click"') == 4 * 5 + 3
    finally:
        broker.stop()


def test_the_service_never_creates_a_topic(kafka_broker: KafkaBroker, topic_prefix: str) -> None:
    """Issue 10: after a broker restart the service's producer created `clicks` with 4
    partitions before the topics job ran. Tansu ignores allow_auto_create_topics, so the sink
    checks that its topics exist (a metadata request for all topics, which creates nothing)
    before it builds a producer, and says which are missing."""
    topics = list(topics_of(topic_prefix).values())
    sink = EventSink(kafka_broker.bootstrap, topics[0], produce_timeout_s=PRODUCE_TIMEOUT_S,
                     topics=topics)
    try:
        with pytest.raises(SinkUnavailable, match="do not exist") as refused:
            sink.produce([(topics[1], b"i1", b'{"impression_id": "i1", "ts": 1767225600}')])
        assert "create them" in str(refused.value)
        assert sink.log([(topics[0], b"i1", b"{}")]) is False
        assert missing_topics(kafka_broker.bootstrap, topics) == topics  # none was created
        create_topics(kafka_broker.bootstrap, topics)
        deadline = time.monotonic() + 30
        while True:  # the sink retries a failed producer build after a second
            try:
                sink.produce([(topics[1], b"i1", b'{"impression_id": "i1", "ts": 1767225600}')])
                break
            except SinkUnavailable:
                assert time.monotonic() < deadline, "the sink never recovered"
                time.sleep(0.2)
    finally:
        sink.close()
