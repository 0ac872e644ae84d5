"""TLS served directly by the server (certificate and key), checked by the client."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from test_server_fixtures import TOKENS

from SegAssistLib.client import BackendUnavailableError, SegAssistClient
from SegAssistLib.prompts import PointPrompt

pytest_plugins = ["test_server_fixtures"]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_tls_served_directly(server_factory, certificate, blob_volume):
    cert, key = certificate
    server = server_factory.start(tls=(cert, key))
    assert server.url.startswith("https://")
    with SegAssistClient(server.url, TOKENS["alice"], verify=str(cert)) as client:
        assert client.info().user == "alice"
        with client.open_session(blob_volume) as session:
            session.add_prompt(PointPrompt(position=(24.0, 20.0, 12.0)))
            assert (session.result() == session.fetch_result()).all()
    with SegAssistClient(server.url, TOKENS["alice"], retries=0) as untrusting, pytest.raises(BackendUnavailableError):
        untrusting.health()  # a certificate no known authority signed is refused
    plain = server.url.replace("https://", "http://")
    with SegAssistClient(plain, TOKENS["alice"], retries=0) as client, pytest.raises(BackendUnavailableError):
        client.health()
