"""Schemathesis over the OpenAPI document: no generated input makes the API answer 5xx."""

from __future__ import annotations

import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.conftest import GatewayProcess
from tvgate import services
from tvgate.api.openapi import DOCUMENT
from tvgate.models import database

schema = schemathesis.openapi.from_dict(DOCUMENT)


@pytest.fixture(scope="module")
def fuzz_admin(gateway: GatewayProcess) -> str:
    """An admin of an org of its own, so generated writes cannot disturb other tests."""
    org = "fuzz-" + uuid.uuid4().hex[:6]
    gateway.bind()
    services.add_user(f"admin@{org}.test", org, admin=True)
    services.add_user(f"member@{org}.test", org)
    token, _ = services.issue_token(f"admin@{org}.test", org)
    database.close()
    return token


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_no_input_makes_the_api_fail(
    case: schemathesis.Case, gateway: GatewayProcess, fuzz_admin: str
) -> None:
    response = case.call(
        base_url=gateway.url, headers={"Authorization": f"Bearer {fuzz_admin}"}, timeout=30
    )
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["status"] == response.status_code and error["message"]
