"""Reply codecs: a client that reads neither zstd nor zlib is still answered uncompressed, up to a limit.

Above ``max_uncompressed_reply_bytes`` (default 16 MiB of raw array) such a reply is refused with
406 ``not_acceptable`` before anything is done: base64 in JSON, a whole CT mask is 100 MB per reply,
and a few at once cost the server gigabytes. A real server on loopback with its default limits.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_server_fixtures import TOKENS, assert_error, make_volume, raw

from SegAssistLib.api_models import ACCEPT_CODECS_HEADER, ArrayPayload
from SegAssistLib.client import SegAssistClient
from SegAssistLib.image import Volume

pytest_plugins = ["test_server_fixtures"]


def _refused(reply) -> dict:
    """The reply is the 406 (checked first with a short message: the old server sent 23 MB here)."""
    assert reply.status_code == 406, (reply.status_code, reply.text[:300])
    return assert_error(reply, 406, "not_acceptable")

UNKNOWN_ONLY = {ACCEPT_CODECS_HEADER: "snappy"}  # no codec the server writes: the fallback is "none"
ZLIB = {ACCEPT_CODECS_HEADER: "zlib"}


@pytest.fixture
def big_volume() -> Volume:
    """17.4 million voxels of uint8: the whole mask, one byte a voxel, is above the 16 MiB default."""
    rng = np.random.default_rng(0)
    array = np.zeros((5, 2048, 1700), np.uint8)
    array[1:4, 800:1200, 700:1000] = 200
    array[:, ::64, ::64] = rng.integers(0, 50, array[:, ::64, ::64].shape, dtype=np.uint8)
    return Volume(array)


def test_an_uncompressed_reply_above_the_limit_is_refused_before_anything_is_done(
    server_factory, tmp_path, big_volume
):
    server = server_factory.start(learn_store=tmp_path / "store")
    with SegAssistClient(server.url, TOKENS["alice"], timeout=(5.0, 120.0)) as alice:
        big = alice.open_session(big_volume)
        path = f"/v1/sessions/{big.session_id}"

        error = _refused(raw(server, "GET", path + "/result", headers=UNKNOWN_ONLY))
        assert "zlib" in error["message"] and ACCEPT_CODECS_HEADER in error["message"]
        assert error["details"]["limit"] == 16 * 1024**2
        # a change whose reply could be that large is refused before it is made
        click = {"prompt": {"kind": "point", "position": [850.0, 1000.0, 2.0]}}
        _refused(raw(server, "POST", path + "/prompts", json=click, headers=UNKNOWN_ONLY))
        _refused(raw(server, "POST", path + "/reset", headers=UNKNOWN_ONLY))
        assert big.status().n_prompts == 0 and not big.status().can_undo

        whole = raw(server, "GET", path + "/result", headers=ZLIB)  # compressed, it is answered
        assert whole.status_code == 200 and whole.json()["mask"]["codec"] == "zlib"
        np.testing.assert_array_equal(big.fetch_result(), np.zeros(big_volume.array.shape, np.uint8))

        # a case's image: the frame is the whole image
        case = alice.learning.import_image(big_volume, name="big")
        image = f"/v1/learn/cases/{case.id}/image"
        _refused(raw(server, "GET", image, headers=UNKNOWN_ONLY))
        assert raw(server, "GET", image, headers=ZLIB).status_code == 200
        big.close()

        # below the limit, a client that reads neither zstd nor zlib is answered uncompressed, as before
        with alice.open_session(make_volume(seed=3)) as small:
            path = f"/v1/sessions/{small.session_id}"
            click = {"prompt": {"kind": "point", "position": [24.0, 20.0, 12.0]}}
            reply = raw(server, "POST", path + "/prompts", json=click, headers=UNKNOWN_ONLY)
            assert reply.status_code == 200, reply.text
            assert reply.json()["mask"]["codec"] == "none" and reply.json()["n_prompts"] == 1
            result = raw(server, "GET", path + "/result", headers=UNKNOWN_ONLY)
            assert result.status_code == 200 and result.json()["mask"]["codec"] == "none"
            uncompressed = ArrayPayload.model_validate(result.json()["mask"]).to_array()
            assert uncompressed.any()
            np.testing.assert_array_equal(uncompressed, small.fetch_result())  # as the client's own codec says
