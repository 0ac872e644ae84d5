"""A session's record of its last request (for a repeat of its request id) holds the changed box's place,
not its voxels: a repeat is answered the same, its voxels read again from the unchanged mask."""

from __future__ import annotations

import numpy as np
from test_server_fixtures import make_volume, raw

from SegAssistLib.api_models import REQUEST_ID_HEADER, MaskUpdateReply

pytest_plugins = ["test_server_fixtures"]


def _kept_bytes(record: object) -> int:
    """Bytes of numpy arrays anywhere inside a session's record of its last request."""
    if isinstance(record, np.ndarray):
        return record.nbytes
    if isinstance(record, (tuple, list)):
        return sum(_kept_bytes(x) for x in record)
    if hasattr(record, "__dict__"):
        return sum(_kept_bytes(x) for x in vars(record).values())
    return 0


def _mask(reply) -> np.ndarray:
    update = MaskUpdateReply.model_validate_json(reply.content)
    return update.mask.to_array() if update.mask is not None else np.zeros((0, 0, 0), np.uint8)


def test_a_repeat_is_answered_the_same_without_the_voxels_kept(shared_server, alice):
    volume = make_volume(seed=97)
    state = shared_server.app.state.segassist
    with alice.open_session(volume) as session:
        path = f"/v1/sessions/{session.session_id}"
        steps = [
            ("prompts", {"prompt": {"kind": "point", "position": [24.0, 20.0, 12.0]}}),
            ("prompts", {"prompt": {"kind": "point", "position": [30.0, 22.0, 12.0]}}),
            ("undo", None),
            ("reset", None),  # its box holds every voxel the prompts set
        ]
        for n, (op, body) in enumerate(steps):
            headers = {REQUEST_ID_HEADER: f"memory-{n}"}
            first = raw(shared_server, "POST", f"{path}/{op}", json=body, headers=headers)
            assert first.status_code == 200, first.text
            record = state.sessions.get("alice", session.session_id).last_request
            assert record[0] == f"memory-{n}" and _kept_bytes(record) < 1024, (op, _kept_bytes(record))
            again = raw(shared_server, "POST", f"{path}/{op}", json=body, headers=headers)
            assert again.status_code == 200, again.text
            a, b = first.json(), again.json()
            for key in ("offset", "shape", "can_undo", "can_redo", "n_prompts", "model_version", "latency_s"):
                assert a[key] == b[key], (op, key)
            assert np.array_equal(_mask(first), _mask(again)), op
            assert _mask(first).size > 0, op  # a box of voxels each time, not an empty update
        assert raw(shared_server, "GET", path).json()["n_prompts"] == 2  # no repeat was applied twice
