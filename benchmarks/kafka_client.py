"""kafka-python's own rate, the ceiling the streaming trainer is measured against.

`raw_consume_rate` is what benchmarks/streaming.py compares the trainer with; `python -m
benchmarks.kafka_client` produces example events to a fresh topic and times a group join and
the raw consume rate (with and without JSON decoding) on its own.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from typing import Any

from ctrloop.io.kafka import create_topics, make_consumer, make_producer


def raw_consume_rate(
    bootstrap: str,
    topics: Iterable[str],
    n: int,
    *,
    decode_json: bool = False,
    timeout_s: float = 120.0,
    **overrides: Any,
) -> float:
    """Consume `n` records with a fresh consumer group and return records per second.

    This is the "raw kafka-python rate" the trainer is benchmarked against: no processing
    beyond `json.loads` of each value when `decode_json` is set. The clock starts at the first
    non-empty poll, so the group join (~3 s) is not counted; the records of that first poll
    are not counted either. Raises TimeoutError if fewer than `n` records arrive in time.

    Measured here with `python -m benchmarks.kafka_client` (313-byte JSON, one partition, 200k
    records, CONSUMER_DEFAULTS): ~80k msg/s raw (77–83k), ~55k msg/s with `json.loads`
    (43–68k); this shared 2-core machine varies by up to ±30% run to run.
    """
    consumer = make_consumer(
        bootstrap, f"ctrloop-rate-{uuid.uuid4().hex[:12]}", topics, **overrides
    )
    try:
        deadline = time.monotonic() + timeout_s
        seen = 0
        counted = 0
        started: float | None = None
        while seen < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"consumed {seen} of {n} records in {timeout_s:.0f} s")
            batches = consumer.poll(timeout_ms=500)
            if not batches:
                continue
            got = 0
            for records in batches.values():
                if decode_json:
                    for record in records:
                        json.loads(record.value)
                got += len(records)
            seen += got
            if started is None:
                started = time.perf_counter()
            else:
                counted += got
        if started is None or counted == 0:
            return float("nan")  # everything came in the first poll: too few records to time
        return counted / (time.perf_counter() - started)
    finally:
        consumer.close(autocommit=False)


def _example_event(i: int) -> bytes:
    """A ~300-byte impression like docs/events.md's example."""
    return json.dumps(
        {
            "impression_id": f"r{i:09d}",
            "ts": 1767225600.25 + i * 0.001,
            "user_id": f"u{i % 100_000}",
            "ad_id": f"a{i % 5000}",
            "advertiser_id": f"adv{i % 300}",
            "features": {
                "user.age": "25-34",
                "user.sessions_7d": 12,
                "ctx.device": "ios",
                "ctx.hour": "14",
                "ad.category": "games",
                "ad.bid": 1.8,
            },
            "position": 1,
            "model_version": "17",
            "propensity": 0.42,
        }
    ).encode()


def _bench(bootstrap: str, n: int) -> dict[str, float]:
    """Produce n events, then time a group join and the raw consume rate with/without JSON."""
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, [topic])
    values = [_example_event(i) for i in range(n)]
    producer = make_producer(bootstrap)
    try:
        producer.send(topic, values[0]).get(timeout=10)  # connect + producer id outside timing
        start = time.perf_counter()
        for i, value in enumerate(values):
            producer.send(topic, value, key=b"%d" % i)
        producer.flush()
        produce_s = time.perf_counter() - start
    finally:
        producer.close()

    consumer = make_consumer(bootstrap, f"ctrloop-join-{uuid.uuid4().hex[:12]}", [topic])
    try:
        start = time.perf_counter()
        while not consumer.assignment():
            consumer.poll(timeout_ms=100)
        join_s = time.perf_counter() - start
    finally:
        consumer.close(autocommit=False)

    return {
        "value_bytes": float(sum(map(len, values)) / n),
        "produce_msgs_per_s": n / produce_s,
        "group_join_s": join_s,
        "consume_raw_msgs_per_s": raw_consume_rate(bootstrap, [topic], n + 1),
        "consume_json_msgs_per_s": raw_consume_rate(bootstrap, [topic], n + 1, decode_json=True),
    }


def main(argv: list[str] | None = None) -> None:
    """`python -m benchmarks.kafka_client [--bootstrap HOST:PORT] [-n N]`: the numbers above."""
    import argparse
    import tempfile

    from ctrloop.dev.localservers import KafkaBroker

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--bootstrap", help="an existing broker (default: start a local Tansu)")
    parser.add_argument("-n", type=int, default=200_000, help="records (default 200000)")
    args = parser.parse_args(argv)
    if args.bootstrap:
        print(json.dumps(_bench(args.bootstrap, args.n), indent=1))
        return
    with (
        tempfile.TemporaryDirectory(prefix="ctrloop-bench-") as log_dir,
        KafkaBroker(log_dir) as broker,
    ):
        print(json.dumps(_bench(broker.bootstrap, args.n), indent=1))


if __name__ == "__main__":
    main()
