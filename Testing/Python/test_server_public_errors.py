"""A server's error replies never show where its files are; the CLI's messages still name them.

Training refused because the base model's checkpoint or the datastore is missing named their absolute
paths in the reply; the reply now says the same without them (``public``), as the datastore's own
access errors do.
"""

from __future__ import annotations

import shutil

import pytest
from test_server_fixtures import Servers, assert_error, raw

from SegAssistLib.learning.jobs import start_training
from SegAssistLib.learning.loop_errors import TrainingError

pytest_plugins = ["test_server_fixtures"]


def test_training_refused_for_a_missing_checkpoint_does_not_show_its_path(server_checkpoint, tmp_path):
    pytest.importorskip("torch")
    checkpoint = shutil.copy(server_checkpoint, tmp_path / "model.pt")
    servers = Servers(checkpoint)
    try:
        server = servers.start(learn_store=tmp_path / "store")
        (tmp_path / "model.pt").unlink()  # gone from under the running server
        error = assert_error(raw(server, "POST", "/v1/learn/train", json={"kind": "salt"}), 422, "training_refused")
        assert "checkpoint" in error["message"]
        assert str(tmp_path) not in error["message"] and "model.pt" not in error["message"]
    finally:
        servers.stop_all()


def test_the_cli_keeps_the_paths_the_reply_leaves_out(server_checkpoint, tmp_path):
    pytest.importorskip("torch")
    with pytest.raises(TrainingError) as missing_store:
        start_training(tmp_path / "nothing here", server_checkpoint)
    assert str(tmp_path / "nothing here") in str(missing_store.value)  # the CLI prints this
    assert str(tmp_path) not in missing_store.value.public and "datastore" in missing_store.value.public
