"""Streaming throughput: `ctrloop train` end to end from Kafka vs kafka-python's raw consume rate
on the same topics, in one run, plus the trainer's peak memory.

    python -m benchmarks.streaming --impressions 200000
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import orjson

from benchmarks.kafka_client import raw_consume_rate
from ctrloop.dev.localservers import KafkaBroker, RedisServer
from ctrloop.io.kafka import create_topics, make_producer
from ctrloop.sim import WorldConfig, write_files
from ctrloop.trainer.settings import TrainerSettings
from ctrloop.trainer.streaming import StreamingTrainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impressions", type=int, default=200_000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ctrloop-bench-stream"))
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    events = args.workdir / f"events-{args.impressions}.jsonl"
    if not events.exists():
        write_files(WorldConfig(), args.impressions, events, args.workdir / "truth.jsonl")
    with tempfile.TemporaryDirectory() as logs, KafkaBroker(Path(logs)) as kafka, \
            RedisServer(Path(logs)) as redis_server:
        ts = TrainerSettings(kafka_bootstrap=kafka.bootstrap, redis_url=redis_server.url,
                             checkpoint_dir=Path(logs) / "ckpt", stop_when_idle_s=2.0,
                             log_interval_s=5.0)
        topics = [ts.topic_impressions, ts.topic_clicks, ts.topic_conversions]
        create_topics(kafka.bootstrap, [*topics, ts.topic_dead_letter])
        producer = make_producer(kafka.bootstrap)
        n = 0
        t0 = time.perf_counter()
        with open(events, "rb") as f:
            for line in f:
                d = orjson.loads(line)
                producer.send(d.pop("type") + "s", key=d["impression_id"].encode(),
                              value=orjson.dumps(d))
                n += 1
        producer.flush()
        produce_rate = n / (time.perf_counter() - t0)
        raw = raw_consume_rate(kafka.bootstrap, topics, n - 3000)
        raw_json = raw_consume_rate(kafka.bootstrap, topics, n - 3000, decode_json=True)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        trainer = StreamingTrainer(ts)
        t0 = time.monotonic()
        summary = trainer.run()
        # Up to the last record consumed: afterwards the trainer only waits to be sure the
        # stream is quiet (idle_advance_s, then stop_when_idle_s).
        assert trainer.last_record_at is not None
        wall = trainer.last_record_at - t0
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {
        "messages": n, "produce_msgs_per_s": produce_rate, "raw_consume_msgs_per_s": raw,
        "raw_consume_json_msgs_per_s": raw_json,
        "trainer_events_per_s": summary["consumed"] / wall,
        "trainer_seconds_incl_group_join": wall, "ratio_vs_raw_json": summary["consumed"] / wall
        / raw_json, "peak_rss_mb_before_trainer": rss0 / 1024, "peak_rss_mb": rss1 / 1024,
        "learned": summary["pipeline"]["learned"], "pending": summary.get("pending"),
        "published": summary["published"],
        "checkpoints": summary["checkpoints"],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
