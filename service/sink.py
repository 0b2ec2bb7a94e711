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
  (max_block_ms=0 once warmed up). `log()` returns True only when the records went to a live
  producer: while Kafka is unavailable (not connected, or not acknowledging) they are dropped
  and counted, and /v1/score says logged:false. A full buffer while Kafka is live (a burst)
  puts them in a bounded queue that a background thread sends; when that is full too they are
  dropped and counted. Serving stays up and the loss is visible on /metrics.
- A monitor (the same background thread) checks Kafka every second and logs one WARNING per
  outage, saying what to do, and one line when it is back; `kafka_state()` feeds /readyz.

Each contract has its own producer, so a producer wedged by a broker restart (kafka-python's
idempotent producer can fail fatally when the broker forgets its producer id) is replaced
without touching the other.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError

from ctrloop.core.errors import CtrloopError
from ctrloop.io.kafka import TopicsMissing, make_producer

log = logging.getLogger(__name__)

Record = tuple[str, bytes, bytes]  # topic, key, value
LOG_QUEUE_SIZE = 100_000
LOG_LINGER_MS = 50
MONITOR_S = 1.0  # how often the drain thread checks that Kafka takes impressions


class SinkUnavailable(CtrloopError):
    """Kafka did not acknowledge in time; nothing was acknowledged to the caller."""


class _Producer:
    """A lazily (re)created KafkaProducer: the service starts, and recovers, without Kafka."""

    def __init__(self, bootstrap: str, block_s: float, client_id: str,
                 nonblocking_topic: str | None = None, linger_ms: int | None = None,
                 topics: Sequence[str] = ()) -> None:
        self.linger_ms = linger_ms
        self.topics = tuple(topics)
        self.bootstrap = bootstrap
        self.block_s = block_s
        self.client_id = client_id
        self.nonblocking_topic = nonblocking_topic
        self._producer: KafkaProducer | None = None
        self._lock = threading.Lock()
        self._next_try = 0.0
        self._last_error = ""

    def get(self) -> KafkaProducer:
        with self._lock:
            if self._producer is not None:
                return self._producer
            if time.monotonic() < self._next_try:
                raise SinkUnavailable(f"{self._last_error} (retrying)")
            try:
                self._producer = make_producer(
                    self.bootstrap, require_topics=self.topics, client_id=self.client_id,
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
            except (KafkaError, TopicsMissing) as e:
                # Not logged here: the sink says once per outage what is down and what to do.
                self._next_try = time.monotonic() + 1.0
                if self._producer is not None:  # built, but the topic's metadata never came
                    _close_quietly(self._producer, 0.0)
                    self._producer = None
                self._last_error = (str(e) if isinstance(e, TopicsMissing)
                                    else f"Kafka at {self.bootstrap} is unreachable: {e}")
                raise SinkUnavailable(self._last_error) from None
            return self._producer

    def ready(self) -> KafkaProducer | None:
        """The producer if it exists; never creates one (so never blocks)."""
        return self._producer

    def reset(self) -> None:
        with self._lock:
            p, self._producer = self._producer, None
        if p is not None:
            threading.Thread(target=_close_quietly, args=(p, 0.0), daemon=True).start()

    def close(self, timeout: float) -> None:
        with self._lock:
            p, self._producer = self._producer, None
        if p is not None:
            lost = _close_quietly(p, timeout)
            if lost:  # Kafka down at shutdown: what it still buffered is lost
                log.warning("%s: closed with records Kafka had not acknowledged (%s)",
                            self.client_id, lost)


def _close_quietly(p: KafkaProducer, timeout: float) -> str | None:
    """Close `p` for good without raising or leaving a traceback; returns why records were
    lost, or None.

    KafkaProducer.close() flushes first, and the flush raises KafkaTimeoutError while Kafka is
    down, *before* the producer is marked closed: the error escaped as a traceback from the
    closing thread, and kafka-python's __del__ then closed it again with a second one (issue
    10: 19 tracebacks in one outage). When the flush fails, the buffered records cannot be
    delivered anyway: close again without flushing, which force-closes the sender and fails
    its batches (counted by their errbacks)."""
    try:
        p.close(timeout=timeout)
        return None
    except Exception as e:  # KafkaTimeoutError, or anything a dying client raises
        lost = f"{type(e).__name__}: {e}"
    p.flush = lambda timeout=None: None  # type: ignore[method-assign]
    try:
        p.close(timeout=0)
    except Exception:  # nothing more can be done for a dead producer
        log.debug("force-closing a producer failed", exc_info=True)
    return lost


def _connections(p: KafkaProducer) -> float:
    """Open broker connections of `p` (kafka-python's public metrics): 0 within a second of a
    broker going away, back to 1 once it reconnected."""
    try:
        return float(p.metrics().get("producer-metrics", {}).get("connection-count", 0.0))
    except Exception:  # a closing producer: report no connection
        return 0.0


def _reachable(bootstrap: str, timeout_s: float = 1.0) -> bool:
    """Whether any bootstrap broker accepts a TCP connection. Asked only when the producer
    has no connection open: an idle producer closes its connection after
    connections_max_idle_ms, which is not an outage."""
    for address in bootstrap.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)),
                                          timeout=timeout_s):
                return True
        except (OSError, ValueError):
            continue
    return False


@dataclass
class SinkStats:
    produced: int = 0
    produce_failures: int = 0
    impressions_logged: int = 0
    impressions_log_failed: int = 0
    impressions_dropped: int = 0


class EventSink:
    def __init__(self, bootstrap: str, log_topic: str, produce_timeout_s: float = 5.0,
                 topics: Sequence[str] = (),
                 on_logged: Callable[[int], None] | None = None,
                 on_log_failed: Callable[[int], None] | None = None,
                 on_state: Callable[[bool], None] | None = None) -> None:
        self.bootstrap = bootstrap
        self.timeout_s = produce_timeout_s
        self.stats = SinkStats()
        # `topics`: what the service writes to; a producer is built only once they exist, so
        # the service never creates one (ctrloop.io.kafka.make_producer).
        topics = tuple(dict.fromkeys((log_topic, *topics)))
        self._acked = _Producer(bootstrap, produce_timeout_s, "ctrloop-service-events",
                                topics=topics)
        # Impressions wait up to LOG_LINGER_MS to share a batch: each batch costs the
        # producer's IO thread Python work (and the GIL), so fewer, larger batches serve faster.
        self._logger = _Producer(bootstrap, produce_timeout_s, "ctrloop-service-log",
                                 nonblocking_topic=log_topic, linger_ms=LOG_LINGER_MS,
                                 topics=topics)
        self._queue: queue.Queue[list[Record] | None] = queue.Queue(maxsize=LOG_QUEUE_SIZE)
        self._on_logged = on_logged
        self._on_log_failed = on_log_failed
        self._on_state = on_state
        self._last_reset = 0.0
        # Whether Kafka takes impressions: None until the first check, then set by the
        # monitor (the drain thread) only, so each outage is logged once and its end once.
        self._available: bool | None = None
        # When the oldest send not yet acknowledged was handed over (monotonic), else None:
        # a producer connected but not acknowledging for timeout_s is wedged.
        self._unacked_since: float | None = None
        self._backlog = False  # the drain thread holds records taken off the queue
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="impression-log", daemon=True)
        self._thread.start()

    def kafka_state(self) -> str:
        """"connected", "unavailable", or "connecting" (not checked yet): /readyz shows it."""
        up = self._available
        return "connecting" if up is None else ("connected" if up else "unavailable")

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
        """Hand impression records to a live producer without waiting; True only then.

        While Kafka is unavailable (no producer, no connection, or no acknowledgement for
        timeout_s) the records are dropped and counted, and the caller answers logged:false
        without impression ids: a record held for later could reach the trainer after the
        caller was told it was not logged. A full producer buffer while Kafka is live is a
        burst, not an outage: those records wait in the bounded queue."""
        producer = self._logger.ready()
        if producer is None or not self._available:
            self._dropped(len(records))
            return False
        if self._unacked_since is None:
            self._unacked_since = time.monotonic()
        if self._queue.empty() and not self._backlog:  # a backlog goes first, in order
            sent = self._send(producer, records)
            if sent == len(records):
                return True
            records = records[sent:]
        try:
            self._queue.put_nowait(records)
            return True
        except queue.Full:
            self._dropped(len(records))
            return False

    def _dropped(self, n: int) -> None:
        self.stats.impressions_dropped += n
        if self._on_log_failed:
            self._on_log_failed(n)

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
        """The monitor: checks Kafka every MONITOR_S (connecting early, so log() takes the
        inline path) and sends what log() had to queue."""
        pending: list[Record] = []
        self._check()  # at once: until Kafka is known to be live, nothing is logged
        while True:
            if not pending:
                self._backlog = False
                try:
                    batch = self._queue.get(timeout=MONITOR_S)
                except queue.Empty:
                    batch = []
                if batch is None:
                    return
                pending = batch
                self._backlog = bool(pending)
            self._check()
            producer = self._logger.ready()
            if pending and producer is not None and self._available:
                pending = pending[self._send(producer, pending):]
            if pending:
                if self._closing.is_set():
                    self.stats.impressions_log_failed += len(pending)
                    return
                self._closing.wait(0.5)  # Kafka down or buffer full: hold it; the queue bounds

    def _check(self) -> None:
        producer = self._logger.ready()
        if producer is None:
            try:
                producer = self._logger.get()  # blocks up to timeout_s, off the request path
            except SinkUnavailable as e:
                self._set_available(False, str(e).removeprefix(
                    f"Kafka at {self.bootstrap} is unreachable: "))
                return
            self._unacked_since = None
        since = self._unacked_since
        if since is not None and time.monotonic() - since > self.timeout_s:
            self._logger.reset()  # wedged (e.g. the broker forgot our producer id): replace it
            self._unacked_since = None
            self._set_available(False, f"no acknowledgement in {self.timeout_s:g} s")
        elif _connections(producer) > 0 or _reachable(self.bootstrap):
            self._set_available(True, "")
        else:
            self._set_available(False, "no connection to any broker")

    def _set_available(self, up: bool, why: str) -> None:
        was, self._available = self._available, up
        if up == was:
            return
        if self._on_state:
            self._on_state(up)
        if up:
            if was is False:
                log.info("Kafka at %s is reachable again: impressions are logged and "
                         "/v1/events accepts events", self.bootstrap)
        else:
            self._unacked_since = None
            log.warning(
                "Kafka at %s is unavailable (%s): scoring goes on, but /v1/score answers "
                "logged:false (its impressions are dropped, counted in "
                "ctrloop_impressions_log_failed_total) and /v1/events answers 503 until it is "
                "back. Start the broker or fix CTRLOOP_KAFKA_BOOTSTRAP; /readyz shows "
                "\"kafka\". Logged once per outage.", self.bootstrap, why)

    def _logged_ok(self, n: int) -> None:
        self._unacked_since = None
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
