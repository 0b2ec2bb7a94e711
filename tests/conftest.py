"""Shared fixtures: a real Kafka-protocol broker and redis-server for integration tests.

The servers are started once per test session, lazily — a run of unit tests alone
(`pytest -m "not integration"`) never spawns them. Server logs go under pytest's temporary
directory (`pytest --basetemp DIR` to keep them somewhere known).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from ctrloop.dev.localservers import BinaryNotFoundError, KafkaBroker, RedisServer

_SERVER_FIXTURES = frozenset({"kafka_broker", "redis_server"})


def pytest_configure(config: pytest.Config) -> None:
    # kafka-python 3.0.12 loads its protocol schemas with importlib.resources.read_text, whose
    # inner open_text call warns from inside importlib (so pyproject's "kafka.*" filter misses
    # it) and filterwarnings=error would fail every test module that imports kafka. Lines added
    # here come after pyproject's, so they take precedence.
    config.addinivalue_line(
        "filterwarnings", "ignore::DeprecationWarning:importlib.resources._legacy"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Deselecting with `-m "not integration"` must reliably skip every server start, so a test
    # that uses a server fixture without the marker is a mistake, reported at collection.
    unmarked = [
        item.nodeid
        for item in items
        if _SERVER_FIXTURES & set(getattr(item, "fixturenames", ()))
        and item.get_closest_marker("integration") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests using kafka_broker/redis_server must be marked pytest.mark.integration: "
            + ", ".join(unmarked)
        )


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A started Tansu broker on 127.0.0.1 (memory storage), shared by the whole session."""
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka-logs"))
    try:
        broker.start()
    except BinaryNotFoundError as exc:
        pytest.skip(str(exc))
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A started redis-server on 127.0.0.1 without persistence, shared by the whole session."""
    server = RedisServer(tmp_path_factory.mktemp("redis-logs"))
    try:
        server.start()
    except BinaryNotFoundError as exc:
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def topic_prefix(request: pytest.FixtureRequest) -> str:
    """A prefix unique to this test, for Kafka topics, groups and Redis keys/channels.

    The session's broker is shared, so tests must not see each other's topics; the test name
    is kept in it so a broker log line can be traced back to its test.
    """
    name = re.sub(r"[^a-zA-Z0-9_-]", "_", request.node.name)[:60]
    return f"{name}-{uuid.uuid4().hex[:8]}."
