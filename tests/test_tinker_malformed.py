"""Malformed bodies on the Tinker routes: bad protobuf, corrupt zstd, broken JSON get clean errors, never a 5xx."""

from __future__ import annotations

import httpx
import pytest
import zstandard

import eztinker

HEADERS = {"X-API-Key": "tml-test"}


@pytest.fixture(scope="module")
def url(tmp_path_factory, tiny_model_dir):
    with eztinker.serve(data_dir=tmp_path_factory.mktemp("malformed"), models=[str(tiny_model_dir)]) as url:
        yield url


def failed_future(url: str, response: httpx.Response) -> str:
    """The error a request's future settles with (the SDK's way to hear of a refused op)."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        return response.text
    request_id = response.json()["request_id"]
    answer = httpx.post(
        f"{url}/api/v1/retrieve_future", json={"request_id": request_id}, headers=HEADERS, timeout=30
    )
    assert answer.status_code < 500, answer.text
    return answer.text


@pytest.mark.parametrize(
    ("content", "headers", "expected"),
    [
        (b"\xff\x00not a protobuf at all\x01", {"content-type": "application/x-protobuf"}, "protobuf"),
        (
            b"\x28\xb5\x2f\xfd garbage after a zstd magic",
            {"content-type": "application/x-protobuf", "content-encoding": "zstd"},
            "zstd",
        ),
        (b"not zstd either", {"content-type": "application/x-protobuf", "content-encoding": "zstd"}, "zstd"),
        (b'{"model_id": "x", "forward_backward_input": ', {"content-type": "application/json"}, "json"),
    ],
)
def test_a_malformed_forward_backward_body_gets_a_clean_error(
    url: str, content: bytes, headers: dict, expected: str
) -> None:
    response = httpx.post(
        f"{url}/api/v1/forward_backward", content=content, headers={**HEADERS, **headers}, timeout=30
    )
    assert expected in failed_future(url, response).lower()


def test_a_zstd_bomb_is_refused_not_expanded(url: str, monkeypatch) -> None:
    from eztinker.api import tinker_wire

    monkeypatch.setattr(tinker_wire, "MAX_DECOMPRESSED_BYTES", 1 << 20)
    monkeypatch.setattr(tinker_wire._decompress, "__defaults__", (1 << 20,))
    bomb = zstandard.ZstdCompressor().compress(b"\x00" * (8 << 20))  # 8 MiB of zeros in a few hundred bytes
    response = httpx.post(
        f"{url}/api/v1/forward_backward",
        content=bomb,
        headers={**HEADERS, "content-type": "application/x-protobuf", "content-encoding": "zstd"},
        timeout=30,
    )
    assert "decompresses to more than" in failed_future(url, response)


@pytest.mark.parametrize(
    "route", ["create_session", "create_model", "optim_step", "asample", "save_weights", "retrieve_future"]
)
def test_broken_json_on_json_routes_gets_a_4xx(url: str, route: str) -> None:
    response = httpx.post(
        f"{url}/api/v1/{route}",
        content=b"{not json",
        headers={**HEADERS, "content-type": "application/json"},
        timeout=30,
    )
    assert 400 <= response.status_code < 500, response.text
