"""`ctrloop train` from a real Kafka-protocol broker with several conversion types: every
conversion reaches its type's delay policy, and the published pCVR head is one multi-task
model whose record carries a delay report per type."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from ctrloop.core.snapshot import build_from_snapshot, decode_snapshot
from ctrloop.dev.localservers import KafkaBroker, RedisServer
from ctrloop.io.kafka import create_topics, make_producer
from ctrloop.io.registry import RedisRegistry
from ctrloop.sim import CONVERSION_MIXES, ConversionType, WorldConfig
from ctrloop.sim.stream import generate

pytestmark = pytest.mark.integration

FAST_FUNNEL = (ConversionType("signup", 0.3, 5.0, 30.0, "streaming", 0.7, 0.3),
               ConversionType("purchase", 0.1, 20.0, 120.0, "advertiser", 1.0, 0.3))


def _events() -> list[tuple[str, dict]]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(CONVERSION_MIXES, "fast_funnel", FAST_FUNNEL)
        cfg = WorldConfig(seed=11, impressions_per_second=100.0, base_ctr=0.2,
                          burst_gap_min_s=30.0, burst_gap_max_s=90.0, bursty_share=0.4,
                          conversion_mix="fast_funnel")
        out = []
        for event, truth in generate(cfg, 6000):
            kind = ("impressions" if truth is not None
                    else "conversions" if "conversion_type" in event else "clicks")
            out.append((kind, event))
    return out


def test_streaming_trainer_learns_each_conversion_type(
    kafka_broker: KafkaBroker, redis_server: RedisServer, topic_prefix: str, tmp_path: Path
) -> None:
    events = _events()
    n_conv = {t: sum(1 for k, e in events if k == "conversions" and e["conversion_type"] == t)
              for t in ("signup", "purchase")}
    assert min(n_conv.values()) > 20
    topics = {k: f"{topic_prefix}{k}" for k in ("impressions", "clicks", "conversions")}
    dlq = f"{topic_prefix}dead-letter"
    create_topics(kafka_broker.bootstrap, [*topics.values(), dlq])
    producer = make_producer(kafka_broker.bootstrap)
    for kind, e in events:
        producer.send(topics[kind], key=e["impression_id"].encode(), value=orjson.dumps(e))
    producer.flush()
    producer.close()
    env = dict(os.environ,
               CTRLOOP_KAFKA_BOOTSTRAP=kafka_broker.bootstrap, CTRLOOP_REDIS_URL=redis_server.url,
               CTRLOOP_REGISTRY_NAMESPACE=topic_prefix, CTRLOOP_GROUP_ID=f"{topic_prefix}trainer",
               CTRLOOP_TOPIC_IMPRESSIONS=topics["impressions"],
               CTRLOOP_TOPIC_CLICKS=topics["clicks"],
               CTRLOOP_TOPIC_CONVERSIONS=topics["conversions"], CTRLOOP_TOPIC_DEAD_LETTER=dlq,
               CTRLOOP_CHECKPOINT_DIR=str(tmp_path / "ckpt"), CTRLOOP_CLICK_WINDOW="10",
               CTRLOOP_ALLOWED_LATENESS="2", CTRLOOP_IDLE_ADVANCE_S="0.5",
               CTRLOOP_MIN_PUBLISH_INTERVAL_S="0.2", CTRLOOP_DELAY_POLICY="fixed:60",
               CTRLOOP_CONVERSION_TYPES="signup,purchase")
    summary_path, log = tmp_path / "summary.json", tmp_path / "trainer.log"
    proc = subprocess.run([sys.executable, "-m", "ctrloop.cli", "train", "--summary-out",
                           str(summary_path), "--stop-when-idle-s", "10"], env=env,
                          stdout=log.open("wb"), stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode == 0, log.read_text()[-3000:]
    summary = orjson.loads(summary_path.read_bytes())
    assert summary["pipeline"]["conversions"] == sum(n_conv.values())
    assert summary["pipeline"]["cvr_other_types"] == 0
    by_type = summary["cvr"]["by_type"]
    for t, n in n_conv.items():
        # Each type's policy saw exactly that type's conversions, and learned samples.
        assert by_type[t]["delay_policy"]["conversions"] == n, by_type[t]
        assert by_type[t]["metrics"]["samples"] > 0

    head = RedisRegistry.from_url(redis_server.url, topic_prefix).head("pcvr")
    record = head.current()
    assert record is not None
    assert record.meta["tasks"] == ["signup", "purchase"]
    assert set(record.meta["delays_by_type"]) == {"signup", "purchase"}
    model = build_from_snapshot(decode_snapshot(head.fetch(record.version)))
    assert model.name == "stem" and model.tasks == ("signup", "purchase")
