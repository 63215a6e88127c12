"""lorakit.serving.server._Guard, the API-key and body-size middleware, on a plain Starlette app (no model)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from starlette.applications import Starlette  # noqa: E402
from starlette.responses import PlainTextResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from lorakit.serving.server import _Guard  # noqa: E402


def _client(api_key: str | None) -> TestClient:
    async def ok(request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/v1/models", ok), Route("/health", ok)])
    return TestClient(_Guard(app, api_key=api_key, max_body_bytes=100))


def test_the_key_is_checked_on_v1_only():
    client = _client("s3cret")
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).text == "ok"
    for headers in ({}, {"Authorization": "Bearer s3cre"}, {"Authorization": "Bearer s3cret "},
                    {"Authorization": "s3cret"}):
        r = client.get("/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", headers
    assert client.get("/health").text == "ok"
    assert _client(None).get("/v1/models").text == "ok"


def test_a_non_ascii_key_matches_its_utf8_bytes():
    """Was: the header (decoded by Starlette as latin-1) was compared with the key as text, so a key with a
    non-ASCII character (LORAKIT_API_KEY="clé") refused every client that sent it."""
    client = _client("clé")
    assert client.get("/v1/models", headers={"Authorization": "Bearer clé".encode()}).text == "ok"
    assert client.get("/v1/models", headers={"Authorization": "Bearer cle"}).status_code == 401


def test_a_body_over_the_limit_is_refused_from_its_content_length():
    r = _client(None).post("/v1/models", content=b"x" * 101)
    assert r.status_code == 413 and "101 bytes" in r.json()["error"]["message"]
