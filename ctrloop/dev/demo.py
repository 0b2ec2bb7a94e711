"""`ctrloop demo`: the learning loop end to end on a laptop, no Docker.

1. simulate a seeded ad world (true CTRs known);
2. replay it through the joiner + online FwFM trainer and score the served predictions against
   the simulator's oracle;
3. stream part of it through a real Kafka-protocol broker (Tansu) into the streaming trainer,
   which publishes model versions to a real redis-server.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson

from ctrloop.core.evaluate import evaluate
from ctrloop.dev.localservers import KafkaBroker, RedisServer
from ctrloop.io.kafka import create_topics, make_producer
from ctrloop.io.registry import RedisRegistry
from ctrloop.sim import WorldConfig, write_files
from ctrloop.trainer.replay import outputs_for, print_progress, replay
from ctrloop.trainer.settings import LearningSettings, TrainerSettings
from ctrloop.trainer.streaming import StreamingTrainer


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_demo(workdir: Path, impressions: int, stream_events: int, seed: int = 0) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    events, truth = workdir / "events.jsonl", workdir / "truth.jsonl"
    _say(f"== 1/3 simulating {impressions:,} impressions -> {events}")
    sim = write_files(WorldConfig(seed=seed), impressions, events, truth)
    _say(f"   {sim['clicks']:,} clicks, mean true CTR {sim['mean_true_ctr']:.4f}, "
         f"{sim['new_ads']} new ads during the stream")

    _say("== 2/3 replaying through the joiner + online FwFM trainer (each sample predicted "
         "before it is learned)")
    settings = LearningSettings(seed=seed)
    preds = workdir / "predictions.jsonl"
    summary = replay(events, outputs_for(preds), None, settings.pipeline_config(), seed,
                     progress=print_progress, progress_every=100_000)
    ev = evaluate(preds, truth, settings.click_window)["after_skip"]
    _say(f"   {summary['events_per_s']:,.0f} events/s; served pCTR after the first 20%: "
         f"AUC {ev['auc']:.4f} vs oracle {ev['oracle_auc']:.4f}, logloss {ev['logloss']:.4f} "
         f"vs oracle {ev['oracle_logloss']:.4f}, calibration {ev['calibration']:.3f}")

    _say(f"== 3/3 streaming {stream_events:,} events: Kafka (Tansu) -> trainer -> Redis")
    with tempfile.TemporaryDirectory() as logs, KafkaBroker(Path(logs)) as kafka, \
            RedisServer(Path(logs)) as redis_server:
        _say(f"   broker {kafka.bootstrap}, redis {redis_server.url}")
        ts = TrainerSettings(kafka_bootstrap=kafka.bootstrap, redis_url=redis_server.url,
                             checkpoint_dir=workdir / "checkpoint", stop_when_idle_s=4.0,
                             idle_advance_s=0.5, log_interval_s=2.0, seed=seed)
        create_topics(kafka.bootstrap, [ts.topic_impressions, ts.topic_clicks,
                                        ts.topic_conversions, ts.topic_dead_letter])
        producer = make_producer(kafka.bootstrap)
        with open(events, "rb") as f:
            for n, line in enumerate(f):
                if n >= stream_events:
                    break
                d = orjson.loads(line)
                topic = {"impression": ts.topic_impressions, "click": ts.topic_clicks,
                         "conversion": ts.topic_conversions}[d.pop("type")]
                producer.send(topic, key=d["impression_id"].encode(), value=orjson.dumps(d))
        producer.flush()
        producer.close()
        stream = StreamingTrainer(ts).run()
        current = RedisRegistry.from_url(redis_server.url).current()
    _say(f"   consumed {stream['consumed']:,} messages, learned {stream['pipeline']['learned']:,}"
         f" samples, published {stream['published']} model versions (current: "
         f"v{current.version if current else '-'}, {current.size / 1e6 if current else 0:.1f} MB)")
    return {"simulate": sim, "replay": summary, "served": ev, "stream": stream}
