"""An API fuzz run: schemathesis generates requests from the service's own OpenAPI schema and
sends them to the real service on 127.0.0.1. Bounded in count (examples per operation) and
time (per request); the only check is that nothing answers 5xx."""
from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings as hypothesis_settings
from schemathesis.checks import not_a_server_error

from crossmodal.indexer.builder import IndexBuilder
from crossmodal.indexer.sample_collection import write_sample_collection
from crossmodal.indexer.settings import Settings
from crossmodal.search.engine import SearchEngine
from crossmodal.search.service import create_app
from tests.conftest import serving

EXAMPLES_PER_OPERATION = 30


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory, encoder):
    root = write_sample_collection(tmp_path_factory.mktemp("fuzz") / "collection")
    # With a token set, fuzzed rebuild requests are refused (401) instead of indexing arbitrary folders.
    settings = Settings(index_dir=tmp_path_factory.mktemp("fuzz-index"), device="cpu", admin_token="fuzz-only",
                        max_upload_bytes=200_000)
    IndexBuilder(settings, encoder=encoder).build(root)
    with serving(create_app(settings, SearchEngine(settings, encoder=encoder))) as base:
        yield base


def operations(base_url: str):
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_no_generated_request_makes_the_service_fail(fuzz_target):
    """Every operation of the schema, EXAMPLES_PER_OPERATION generated requests each.

    (schemathesis's pytest plugin does not run under pytest 9, so its strategies are
    driven with hypothesis directly.)"""
    tested, statuses = [], Counter()
    for operation in operations(fuzz_target):
        @given(case=operation.as_strategy())
        @hypothesis_settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                             suppress_health_check=list(HealthCheck))
        def no_server_error(case):
            response = case.call_and_validate(base_url=fuzz_target, checks=[not_a_server_error], timeout=15)
            statuses[response.status_code] += 1

        no_server_error()
        tested.append(operation.label)
    print(f"\n{sum(statuses.values())} requests over {len(tested)} operations, statuses {dict(sorted(statuses.items()))}")
    assert len(tested) >= 14, tested
    assert sum(statuses.values()) >= 10 * len(tested) and not any(code >= 500 for code in statuses)
