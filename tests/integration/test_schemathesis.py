"""schemathesis over a real `ctrloop serve` (uvicorn, a socket, Kafka, Redis, published models),
every check on, a fixed seed and bounded examples: what tests/unit/test_service_fuzz.py does
in-process, from the outside, where a proxy-free client meets the real HTTP stack (issue 10:
the drift it found was found this way)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings

from ctrloop.core.features import NUMERIC_BUCKETS, FeatureSpec, Field
from ctrloop.core.models import build_model
from ctrloop.core.posterior import LogitPosterior
from ctrloop.core.snapshot import encode_snapshot
from ctrloop.dev.localservers import KafkaBroker, RedisServer
from ctrloop.io.kafka import create_topics
from ctrloop.io.registry import RedisRegistry

from .service_process import ServiceProcess

pytestmark = pytest.mark.integration

TOKEN = "outsider-admin-token"
NS = "schemathesis"
TOPICS = {"CTRLOOP_TOPIC_IMPRESSIONS": f"{NS}.impressions",
          "CTRLOOP_TOPIC_CLICKS": f"{NS}.clicks",
          "CTRLOOP_TOPIC_CONVERSIONS": f"{NS}.conversions",
          "CTRLOOP_TOPIC_DEAD_LETTER": f"{NS}.dead-letter"}
SPEC = FeatureSpec((
    Field("user.id", "categorical", "user", 256),
    Field("user.sessions_7d", "numeric", "user", NUMERIC_BUCKETS),
    Field("ad.id", "categorical", "ad", 256),
    Field("ad.advertiser_id", "categorical", "ad", 64),
))
# As tests/unit/test_service_fuzz.py: which statuses each check expects, and why.
CONFIG = schemathesis.config.SchemathesisConfig.from_dict({"checks": {
    "negative_data_rejection": {"expected-statuses": [400, 401, 403, 404, 405, 406, 409, 413,
                                                      415, 422]},
    "positive_data_acceptance": {"expected-statuses": ["2xx", 404, 409, 413, 422]},
}})


@pytest.fixture(scope="module")
def served(kafka_broker: KafkaBroker, redis_server: RedisServer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    create_topics(kafka_broker.bootstrap, TOPICS.values())
    registry = RedisRegistry.from_url(redis_server.url, NS)
    torch.manual_seed(0)
    model = build_model("fwfm", SPEC, dim=4).eval()
    model.posterior = LogitPosterior(SPEC)  # so options.explore reaches Thompson sampling
    for _ in range(2):  # versions 1 and 2: pin and rollback have somewhere to go
        v = registry.next_version()
        registry.publish(v, encode_snapshot(model, v), {})
    registry.r.close()
    env = {"CTRLOOP_KAFKA_BOOTSTRAP": kafka_broker.bootstrap,
           "CTRLOOP_REDIS_URL": redis_server.url, "CTRLOOP_REGISTRY_NAMESPACE": NS,
           "CTRLOOP_ADMIN_TOKEN": TOKEN, "CTRLOOP_MAX_BODY_BYTES": str(256 * 1024),
           "CTRLOOP_PRODUCE_TIMEOUT_S": "5", **TOPICS}
    with ServiceProcess(env, tmp_path_factory.mktemp("schemathesis")) as service:
        schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json", config=CONFIG)
        yield schema
        log = service.log_tail(1 << 20)
    assert "Traceback" not in log, log[-3000:]


schema = schemathesis.pytest.from_fixture("served")


@schema.parametrize()
@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.data_too_large])
def test_the_running_service_answers_by_its_schema(case: schemathesis.Case) -> None:
    response = case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"},
                                      timeout=30)
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        assert response.json()["detail"], response.text[:500]
