"""The upload frame's header is as strict as a JSON body: an unknown field is refused by name, a bad one
answers one line with ``details.errors``, and a modality is spelt as a Volume takes it."""

from __future__ import annotations

import numpy as np
import pytest
from test_server_fixtures import assert_error, make_volume, raw

from SegAssistLib.image import Volume
from SegAssistLib.transport import encode_frame

pytest_plugins = ["test_server_fixtures"]

FRAME = {"Content-Type": "application/x-segassist-frame"}


def _upload(server, array: np.ndarray, header: dict):
    return raw(server, "POST", "/v1/images", data=encode_frame(array, header, codec="zlib"), headers=FRAME)


@pytest.mark.parametrize(
    "header, unknown",
    [
        ({"spacnig": [3.0, 0.7, 0.7]}, "spacnig"),
        ({"Spacing": [3.0, 0.7, 0.7]}, "Spacing"),
        ({"spacing": [3.0, 0.7, 0.7], "orgin": [10.0, 20.0, 30.0]}, "orgin"),
        ({"Modality": "CT"}, "Modality"),
    ],
)
def test_an_unknown_header_field_is_refused_by_name_and_nothing_is_stored(shared_server, header, unknown):
    array = make_volume(shape=(8, 9, 10), seed=71).array
    error = assert_error(_upload(shared_server, array, header), 422, "invalid_request")
    assert repr(unknown) in error["message"] and "\n" not in error["message"]
    assert [unknown] in [e["loc"] for e in error["details"]["errors"]]
    # the image it would have been stored as (default geometry for a misspelt key) is not held
    for spacing in ((1.0, 1.0, 1.0), tuple(header.get("spacing", (1.0, 1.0, 1.0)))):
        image_id = Volume(array, spacing=spacing).content_hash()
        assert_error(raw(shared_server, "GET", f"/v1/images/{image_id}"), 404, "image_not_found")


def test_the_python_clients_own_header_passes_the_strict_check(alice):
    volume = Volume(make_volume(shape=(8, 9, 10), seed=72).array, spacing=(3.0, 0.7, 0.7), origin=(1, 2, 3),
                    modality="MR")  # fmt: skip
    stored = alice.upload_image(volume)
    assert stored.uploaded and stored.spacing == (3.0, 0.7, 0.7) and stored.origin == (1.0, 2.0, 3.0)
    assert stored.modality == "MR" and stored.image_id == volume.content_hash()


def test_a_header_of_wrong_types_answers_one_line_with_each_error_in_details(shared_server):
    array = make_volume(shape=(8, 9, 10), seed=73).array
    reply = _upload(shared_server, array, {"spacing": [1.0, "2", True], "modality": "PET"})
    error = assert_error(reply, 400, "malformed_body")
    message = error["message"]
    assert "\n" not in message and "pydantic" not in message and "input_value" not in message
    assert message.startswith("image header is invalid: spacing.1: ")
    locs = [e["loc"] for e in error["details"]["errors"]]
    assert locs == [["spacing", "1"], ["spacing", "2"], ["modality"]]


@pytest.mark.parametrize("spelt, stored", [("mri", "MR"), (" ct ", "CT"), ("Mr", "MR")])
def test_a_header_modality_is_spelt_as_a_volume_takes_it(shared_server, spelt, stored):
    array = make_volume(shape=(8, 9, 10), seed=74 + len(spelt)).array
    reply = _upload(shared_server, array, {"modality": spelt})
    assert reply.status_code in (200, 201), reply.text
    assert reply.json()["modality"] == stored == Volume(array, modality=spelt).modality
