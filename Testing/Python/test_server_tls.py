"""TLS served directly by the server (certificate and key), checked by the client."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

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


def test_segment_reaches_a_self_signed_server_with_ca_bundle_and_says_so_without(
    server_factory, certificate, tmp_path, capsys, monkeypatch
):
    """README's GPU recipe serves a self-signed certificate: `segment --url https://...` could not reach it
    (a raw urllib3 text after three tries) and had no option for it. --ca-bundle passes the certificate."""
    import json

    import SimpleITK as sitk
    from test_server_fixtures import make_volume

    from SegAssistLib.cli import main
    from SegAssistLib.io import volume_to_sitk

    cert, key = certificate
    server = server_factory.start(tls=(cert, key))
    image, prompts = tmp_path / "blob.nii.gz", tmp_path / "prompts.json"
    sitk.WriteImage(volume_to_sitk(make_volume()), str(image))
    prompts.write_text(json.dumps([PointPrompt(position=(24.0, 20.0, 12.0)).model_dump(mode="json")]))
    monkeypatch.setenv("SEGASSIST_REMOTE_TOKEN", TOKENS["alice"])
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)

    def segment(out, *extra) -> int:
        return main(["segment", str(image), "--prompts", str(prompts), "--out", str(out), "--url", server.url,
                     "--send-images-to-remote", *map(str, extra)])  # fmt: skip

    assert segment(tmp_path / "refused.nii.gz") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the TLS certificate of {server.url} could not be verified" in err, err
    assert "--ca-bundle PATH" in err and "Max retries" not in err and "HTTPSConnectionPool" not in err, err
    assert not (tmp_path / "refused.nii.gz").exists()

    assert segment(tmp_path / "trusted.nii.gz", "--ca-bundle", cert) == 0, capsys.readouterr().err
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "trusted.nii.gz"))).any()

    other = tmp_path / "other.pem"  # a bundle that does not hold the server's certificate
    other.write_text(Path(certifi_bundle()).read_text())
    assert segment(tmp_path / "other.nii.gz", "--ca-bundle", other) == 2
    err = capsys.readouterr().err
    assert f"did not verify with --ca-bundle {other}" in err and err.count("\n") == 1, err

    # the Python client: one typed error naming verify=, at once (the same certificate would come back)
    from SegAssistLib.client.http import TLS_UNTRUSTED

    with SegAssistClient(server.url, TOKENS["alice"]) as untrusting, pytest.raises(BackendUnavailableError) as raised:
        untrusting.health()
    assert raised.value.code == TLS_UNTRUSTED and "verify=PATH" in str(raised.value)
    assert raised.value.details["url"] == server.url and "self-signed" in raised.value.details["reason"]


def certifi_bundle() -> str:
    certifi = pytest.importorskip("certifi")  # requests' own dependency
    return certifi.where()


def test_the_slicer_backend_trusts_a_self_signed_server_by_its_certificate(server_factory, certificate, tmp_path,
                                                                          monkeypatch):
    """The module and the batch example could reach a self-signed server only when Slicer was started with
    REQUESTS_CA_BUNDLE; the remote settings now name the certificate to trust (``remote_ca_bundle``)."""
    from SegAssistLib.slicer.backend import REMOTE, BackendConfigError, BackendManager, BackendSettings

    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    cert, key = certificate
    server = server_factory.start(tls=(cert, key))
    plain = BackendSettings(mode=REMOTE, remote_url=server.url, remote_token=TOKENS["alice"], remote_opt_in=True)
    trusting = BackendManager(plain.with_changes(remote_ca_bundle=str(cert)))
    try:
        assert trusting.client().info().user == "alice"
    finally:
        trusting.close()
    untrusting = BackendManager(plain)
    try:
        untrusting.client().retries = 0
        with pytest.raises(BackendUnavailableError):
            untrusting.client().health()
    finally:
        untrusting.close()
    for bad, problem in (
        (plain.with_changes(remote_ca_bundle=str(tmp_path / "missing.pem")), "does not exist"),
        (plain.with_changes(remote_url=server.url.replace("https", "http"), remote_ca_bundle=str(cert)), "https"),
    ):
        with pytest.raises(BackendConfigError, match=problem):
            bad.validate()


def test_the_batch_example_reaches_a_self_signed_server_with_ca_bundle(server_factory, certificate, tmp_path,
                                                                       capsys, monkeypatch):
    """``batch_segment.py --url https://...`` had no way to name the certificate of a self-signed server."""
    import importlib.util

    pytest.importorskip("slicer")
    import SimpleITK as sitk

    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("segassist_batch_tls", root / "Resources/Examples/batch_segment.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    cert, key = certificate
    server = server_factory.start(tls=(cert, key))
    image = tmp_path / "sample.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(root / "Resources/Samples/hippocampus_001_image.nii.gz")), str(image))
    base = ["--image", str(image), "--prompts", str(root / "Resources/Examples/hippocampus_001_prompts.json"),
            "--url", server.url, f"--token={TOKENS['alice']}", "--send-images-to-remote"]  # fmt: skip
    assert example.main([*base, "--out", str(tmp_path / "refused.seg.nrrd")]) == 1
    assert "certificate" in capsys.readouterr().err and not (tmp_path / "refused.seg.nrrd").exists()
    out = tmp_path / "trusted.seg.nrrd"
    assert example.main([*base, "--out", str(out), "--ca-bundle", str(cert)]) == 0
    assert out.is_file()
    capsys.readouterr()
    # the certificate of no server: refused before anything runs
    assert example.main(["--image", str(image), "--prompts", str(image), "--out", str(out), "--ca-bundle",
                         str(cert)]) == 2  # fmt: skip
    assert "--ca-bundle verifies the certificate of an https --url" in capsys.readouterr().err
