"""GET /metrics: Prometheus text that moves with queries and rebuilds, without paths or query text."""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import solid_image


def scrape(base: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{base}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == w for k, w in labels.items()))


def test_metrics_move_with_queries_and_a_rebuild_and_leak_nothing(live_server, collection):
    before = scrape(live_server)
    assert value(before, "crossmodal_index_vectors", kind="images") == 18
    first_build = value(before, "crossmodal_served_build_id")
    secret_query = "zebra-unicorn-private-words"
    with httpx.Client(base_url=live_server) as http:
        for i in range(5):
            assert http.get("/v1/images/search", params={"q": f"{secret_query} {i}"}).status_code == 200
        assert http.get("/v1/images/999999").status_code == 404
        solid_image((9, 99, 199)).save(collection / "metrics.png")
        job = http.post("/v1/index/jobs", json={"collection": str(collection)}).json()
        while http.get(f"/v1/index/jobs/{job['id']}").json()["state"] not in ("done", "failed"):
            pass
    text = httpx.get(f"{live_server}/metrics").text
    after = scrape(live_server)
    route = "/v1/images/search"
    assert value(after, "crossmodal_http_request_duration_seconds_count", route=route, status="200") - \
        value(before, "crossmodal_http_request_duration_seconds_count", route=route, status="200") == 5
    assert value(after, "crossmodal_http_request_duration_seconds_count", route="/v1/images/{image_id}",
                 status="404") == 1
    assert value(after, "crossmodal_text_encoder_batch_size_count") >= 5
    assert value(after, "crossmodal_text_encoder_queue_wait_seconds_count") >= 5
    assert value(after, "crossmodal_search_stage_seconds_count", stage="faiss") >= 5
    assert value(after, "crossmodal_search_stage_seconds_count", stage="rerank") >= 5
    assert value(after, "crossmodal_rebuilds_total", outcome="done") == 1
    assert value(after, "crossmodal_rebuild_duration_seconds_count") == 1
    assert value(after, "crossmodal_rebuild_items_done", phase="images") >= 1
    assert value(after, "crossmodal_served_build_id") > first_build and value(after, "crossmodal_build_swaps_total") == 1
    assert value(after, "crossmodal_index_vectors", kind="images") == 19
    assert secret_query not in text and str(collection) not in text and "metrics.png" not in text
