"""Where the service writes events: Kafka, with two delivery contracts.

- `/v1/events` (clicks, conversions, impressions from callers): `produce()` returns only after
  Kafka acknowledged every record (acks=all), else raises `SinkUnavailable` and the caller
  answers 503 with Retry-After. At-least-once: a record that timed out may still be delivered
  later, so a client retry can duplicate it; the trainer drops duplicate impressions by id and
  counts duplicate clicks.
- Impression logging from `/v1/score`: `log()` never waits on Kafka. Normally it hands the
  records to the producer inline (its buffer append; the producer's own IO thread sends them):
  a background Python thread doing the sends measured 4x slower serving, because every request
  then waits for the GIL behind it (the convoy effect). The logging producer never blocks
  (max_block_ms=0 once warmed up); while it cannot take records — Kafka down, buffer full, not
  yet connected — they go to a bounded queue that a background thread retries. When that queue
  is full too, impressions are dropped and counted (`impressions_dropped`): serving stays up and
  the loss is visible on /metrics.

Each contract has its own producer, so a producer wedged by a broker restart (kafka-python's
idempotent producer can fail fatally when the broker forgets its producer id) is replaced
without touching the other.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from ctrloop.errors import CtrloopError
from ctrloop.kafkaio import make_producer

log = logging.getLogger(__name__)

Record = tuple[str, bytes, bytes]  # topic, key, value
LOG_QUEUE_SIZE = 100_000
LOG_LINGER_MS = 50


class SinkUnavailable(CtrloopError):
    """Kafka did not acknowledge in time; nothing was acknowledged to the caller."""


class _Producer:
    """A lazily (re)created KafkaProducer: the service starts, and recovers, without Kafka."""

    def __init__(self, bootstrap: str, block_s: float, client_id: str,
                 nonblocking_topic: str | None = None, linger_ms: int | None = None) -> None:
        self.linger_ms = linger_ms
        self.bootstrap = bootstrap
        self.block_s = block_s
        self.client_id = client_id
        self.nonblocking_topic = nonblocking_topic
        self._producer: KafkaProducer | None = None
        self._lock = threading.Lock()
        self._next_try = 0.0
        self._down = False

    def get(self) -> KafkaProducer:
        with self._lock:
            if self._producer is not None:
                return self._producer
            if time.monotonic() < self._next_try:
                raise SinkUnavailable(f"Kafka at {self.bootstrap} is unreachable (retrying)")
            try:
                self._producer = make_producer(
                    self.bootstrap, client_id=self.client_id,
                    max_block_ms=int(self.block_s * 1000),
                    request_timeout_ms=max(1000, int(self.block_s * 1000)),
                    bootstrap_timeout_ms=int(self.block_s * 1000),
                    **({} if self.linger_ms is None else {"linger_ms": self.linger_ms}))
                if self.nonblocking_topic is not None:
                    # Fetch the topic's metadata now, then never block again: send() reads
                    # max_block_ms from the config on every call, and with 0 it raises at once
                    # when the buffer is full instead of stalling the event loop.
                    self._producer.partitions_for(self.nonblocking_topic)
                    self._producer.config["max_block_ms"] = 0
            except KafkaError as e:
                self._next_try = time.monotonic() + 1.0
                if not self._down:  # one line per outage, not one per retry
                    self._down = True
                    log.warning("%s: Kafka at %s is unreachable (%s); retrying every second",
                                self.client_id, self.bootstrap, e)
                raise SinkUnavailable(f"Kafka at {self.bootstrap} is unreachable: {e}") from None
            if self._down:
                self._down = False
                log.info("%s: Kafka at %s is reachable again", self.client_id, self.bootstrap)
            return self._producer

    def ready(self) -> KafkaProducer | None:
        """The producer if it exists; never creates one (so never blocks)."""
        return self._producer

    def reset(self) -> None:
        with self._lock:
            p, self._producer = self._producer, None
        if p is not None:
            threading.Thread(target=p.close, kwargs={"timeout": 0}, daemon=True).start()

    def close(self, timeout: float) -> None:
        with self._lock:
            p, self._producer = self._producer, None
        if p is not None:
            try:
                p.close(timeout=timeout)
            except KafkaError as e:  # Kafka down at shutdown: unacknowledged records are lost
                log.warning("closing the %s producer: %s", self.client_id, e)


@dataclass
class SinkStats:
    produced: int = 0
    produce_failures: int = 0
    impressions_logged: int = 0
    impressions_log_failed: int = 0
    impressions_dropped: int = 0


class EventSink:
    def __init__(self, bootstrap: str, log_topic: str, produce_timeout_s: float = 5.0,
                 on_logged: Callable[[int], None] | None = None,
                 on_log_failed: Callable[[int], None] | None = None) -> None:
        self.timeout_s = produce_timeout_s
        self.stats = SinkStats()
        self._acked = _Producer(bootstrap, produce_timeout_s, "ctrloop-service-events")
        # Impressions wait up to LOG_LINGER_MS to share a batch: each batch costs the
        # producer's IO thread Python work (and the GIL), so fewer, larger batches serve faster.
        self._logger = _Producer(bootstrap, produce_timeout_s, "ctrloop-service-log",
                                 nonblocking_topic=log_topic, linger_ms=LOG_LINGER_MS)
        self._queue: queue.Queue[list[Record] | None] = queue.Queue(maxsize=LOG_QUEUE_SIZE)
        self._on_logged = on_logged
        self._on_log_failed = on_log_failed
        self._last_reset = 0.0
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="impression-log", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------- acknowledged path

    def produce(self, records: Sequence[Record]) -> None:
        """Send and wait for every acknowledgement; blocking (run it off the event loop)."""
        deadline = time.monotonic() + self.timeout_s
        try:
            producer = self._acked.get()
            futures = [producer.send(t, key=k, value=v) for t, k, v in records]
            producer.flush(timeout=max(0.0, deadline - time.monotonic()))
            for f in futures:
                f.get(timeout=max(0.001, deadline - time.monotonic()))
        except SinkUnavailable:
            self.stats.produce_failures += 1
            raise
        except (KafkaError, AssertionError) as e:
            # A timed-out or failed producer is replaced: its buffer may hold records the
            # broker will never take (e.g. after a restart forgot our producer id).
            self.stats.produce_failures += 1
            self._acked.reset()
            raise SinkUnavailable(f"Kafka did not acknowledge within {self.timeout_s:g} s: "
                                  f"{type(e).__name__}: {e}") from None
        self.stats.produced += len(records)

    # ------------------------------------------------------------- fire-and-forget log

    def log(self, records: list[Record]) -> bool:
        """Hand impression records to Kafka without waiting; False (and counted) if dropped."""
        producer = self._logger.ready()
        if producer is not None and self._queue.empty():  # a backlog goes first, in order
            sent = self._send(producer, records)
            if sent == len(records):
                return True
            records = records[sent:]
        try:
            self._queue.put_nowait(records)
            return True
        except queue.Full:
            self.stats.impressions_dropped += len(records)
            if self._on_log_failed:
                self._on_log_failed(len(records))
            return False

    def _send(self, producer: KafkaProducer, records: list[Record]) -> int:
        """Send what the producer takes without blocking; returns how many it took."""
        n = len(records)
        last: Any = None
        for i, (t, k, v) in enumerate(records):
            try:
                f = producer.send(t, key=k, value=v)
            except KafkaError:  # buffer full or metadata gone: the caller queues the rest
                if last is not None:
                    self._count_ok_when(last, i)
                return i
            f.add_errback(self._logged_failed)
            last = f
        self._count_ok_when(last, n)
        return n

    def _count_ok_when(self, future: Any, n: int) -> None:
        # One success callback per batch: a batch's records share a partition batch or arrive
        # in order, and per-record callbacks cost more than the counting is worth.
        future.add_callback(lambda _: self._logged_ok(n))

    def _drain(self) -> None:
        while not self._closing.is_set():  # connect early, so log() takes the inline path
            try:
                self._logger.get()
                break
            except SinkUnavailable:
                self._closing.wait(1.0)
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            self._send_logged(batch)

    def _send_logged(self, batch: list[Record]) -> None:
        while batch:
            with contextlib.suppress(SinkUnavailable):
                batch = batch[self._send(self._logger.get(), batch):]
            if batch:
                if self._closing.is_set():
                    self.stats.impressions_log_failed += len(batch)
                    return
                time.sleep(0.5)  # Kafka down or buffer full: hold this batch; the queue bounds

    def _logged_ok(self, n: int) -> None:
        self.stats.impressions_logged += n
        if self._on_logged:
            self._on_logged(n)

    def _logged_failed(self, e: Exception) -> None:
        self.stats.impressions_log_failed += 1
        if self._on_log_failed:
            self._on_log_failed(1)
        if self.stats.impressions_log_failed % 1000 == 1:
            log.warning("impression log delivery failed: %s", e)
        now = time.monotonic()
        if now - self._last_reset > 5.0:  # a wedged producer fails every record: replace it
            self._last_reset = now
            self._logger.reset()

    def queued(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float = 2.0) -> None:
        self._closing.set()
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout=timeout)
        self._acked.close(timeout)
        self._logger.close(timeout)
