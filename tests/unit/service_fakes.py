"""A stand-in for ctrloop.service.sink.EventSink in unit tests of the service (integration tests use
the real Kafka sink)."""

from __future__ import annotations

from collections.abc import Sequence

from ctrloop.service.sink import SinkUnavailable

Record = tuple[str, bytes, bytes]


class RecordingSink:
    """Stands in for ctrloop.service.sink.EventSink: keeps what it is given; `down` makes produce()
    raise SinkUnavailable and log() refuse, as the Kafka sink does while Kafka is down."""

    def __init__(self) -> None:
        self.logged: list[Record] = []
        self.produced: list[Record] = []
        self.down = False
        self.closed = False

    def log(self, records: list[Record]) -> bool:
        if self.down:  # as the Kafka sink: nothing is handed to a dead producer
            return False
        self.logged.extend(records)
        return True

    def produce(self, records: Sequence[Record]) -> None:
        if self.down:
            raise SinkUnavailable("Kafka at 127.0.0.1:1 is unreachable")
        self.produced.extend(records)

    def kafka_state(self) -> str:
        return "unavailable" if self.down else "connected"

    def queued(self) -> int:
        return 0

    def close(self, timeout: float = 2.0) -> None:
        self.closed = True
