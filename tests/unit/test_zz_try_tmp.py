from __future__ import annotations
import pytest, schemathesis
from hypothesis import settings, HealthCheck
from ctrloop.registry import InMemoryRegistry
from service.app import create_app
from service.settings import ServiceSettings

class Sink:
    def log(self, r): return True
    def produce(self, r): pass
    def queued(self): return 0
    def close(self, timeout=2.0): pass

@pytest.fixture(scope="module")
def api_schema():
    app = create_app(ServiceSettings(reload_poll_s=3600, admin_token="tok-12345678"), registry=InMemoryRegistry(), sink=Sink())
    return schemathesis.openapi.from_asgi("/openapi.json", app)

schema = schemathesis.pytest.from_fixture("api_schema")

@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_api(case):
    from schemathesis.specs.openapi.checks import negative_data_rejection
    case.call_and_validate(excluded_checks=[negative_data_rejection])
