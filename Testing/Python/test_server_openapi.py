"""The committed OpenAPI schema is the one the app serves, and it documents the error shape."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from SegAssistLib.api_models import ErrorCode

REPO = Path(__file__).resolve().parents[2]


def _exporter():
    spec = importlib.util.spec_from_file_location("export_openapi", REPO / "scripts" / "export_openapi.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_openapi_schema_is_current():
    exporter = _exporter()
    committed = (REPO / "docs" / "openapi.json").read_text()
    assert committed == exporter.render(exporter.build_schema()), "run python scripts/export_openapi.py"


def test_every_operation_documents_the_error_shape():
    schema = _exporter().build_schema()
    assert schema["info"]["version"].endswith("(API v1)")
    for path, operations in schema["paths"].items():
        assert path.startswith("/v1/")
        for method, operation in operations.items():
            for status in ("400", "401", "404", "422"):
                ref = operation["responses"][status]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorReply"), (method, path, status)
    assert all(code in schema["components"]["schemas"]["ErrorBody"]["properties"]["code"]["description"]
               for code in ErrorCode.all())  # fmt: skip


def test_the_schema_documents_what_the_server_answers():
    """An upload of a held image answers 200, a new one 201; a bug or a damaged datastore 500."""
    schema = _exporter().build_schema()
    upload = schema["paths"]["/v1/images"]["post"]["responses"]
    for status in ("200", "201"):
        assert upload[status]["content"]["application/json"]["schema"]["$ref"].endswith("/StoredImage"), status
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for status in ("415", "500"):
                ref = operation["responses"][status]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorReply"), (method, path, status)
    assert "corrupt_data" in operation["responses"]["500"]["description"]
