"""The server never redirects, a 405 names every method the path takes, and each route's 409 says
which codes that route sends."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from test_server_fixtures import assert_error, make_volume, raw

pytest_plugins = ["test_server_fixtures"]

REPO = Path(__file__).resolve().parents[2]


def _schema() -> dict:
    spec = importlib.util.spec_from_file_location("export_openapi", REPO / "scripts" / "export_openapi.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_schema()


def test_a_trailing_slash_is_no_endpoint_not_a_redirect(shared_server, alice):
    with alice.open_session(make_volume(shape=(8, 9, 10), seed=95)) as session:
        for path in (f"/v1/sessions/{session.session_id}/", "/v1/info/", "/v1/sessions/"):
            reply = raw(shared_server, "GET", path, allow_redirects=False)
            error = assert_error(reply, 404, "not_found")
            assert "location" not in reply.headers and path in error["message"]


def test_a_405_names_every_method_the_path_takes(shared_server, alice):
    with alice.open_session(make_volume(shape=(8, 9, 10), seed=96)) as session:
        reply = raw(shared_server, "PUT", f"/v1/sessions/{session.session_id}")
        error = assert_error(reply, 405, "method_not_allowed")
        assert reply.headers["allow"] == "DELETE, GET"
        assert "DELETE, GET" in error["message"] and "PUT" in error["message"]
    reply = raw(shared_server, "GET", "/v1/images")
    assert_error(reply, 405, "method_not_allowed")
    assert reply.headers["allow"] == "POST"


def test_each_routes_409_names_the_codes_it_sends():
    paths = _schema()["paths"]

    def conflict(path: str, method: str) -> str:
        return paths[path][method]["responses"].get("409", {}).get("description", "")

    assert conflict("/v1/images", "post").startswith("image_conflict")
    assert "prompt_limit" in conflict("/v1/sessions", "post")
    assert "prompt_limit" in conflict("/v1/sessions/{session_id}/prompts", "post")
    for op in ("undo", "redo"):
        assert conflict(f"/v1/sessions/{{session_id}}/{op}", "post").startswith("session_state")
    assert "case_locked" in conflict("/v1/learn/next", "post")
    for path, method in (("/v1/images/{image_id}", "get"), ("/v1/sessions/{session_id}", "get"), ("/v1/info", "get")):
        assert conflict(path, method) == "", (path, method)
