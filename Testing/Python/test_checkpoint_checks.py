"""A checkpoint the engine cannot run is refused when it loads, with what is wrong, instead of failing at
the first prompt (a raw torch error), answering empty masks (NaN weights), using the wrong output, or
asking for gigabytes from a config of a few bytes."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from SegAssistLib.engine.network import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    NetworkConfig,
    build_network,
    load_checkpoint,
    save_checkpoint,
)
from SegAssistLib.errors import ModelError
from SegAssistLib.learning.errors import AdapterError

TINY = NetworkConfig(channels=(4, 8), strides=(2,), patch_size=16)


def _saved(tmp_path, name: str, config: NetworkConfig):
    return save_checkpoint(tmp_path / name, build_network(config), config, {})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"in_channels": 5}, "takes 5 input channels; the engine encodes 7"),
        ({"out_channels": 3}, "gives 3 output channels; the engine reads one logit"),
        ({"patch_size": 0}, "patch_size 0 must be 8 to 512"),
        ({"patch_size": 17}, "a multiple of the strides' product 2"),
    ],
)
def test_a_network_the_engine_cannot_run_is_refused_on_loading(tmp_path, change, message):
    config = NetworkConfig(**{**TINY.__dict__, **change})
    with pytest.raises(ModelError, match=message):
        load_checkpoint(_saved(tmp_path, "odd.pt", config))


def test_a_few_bytes_of_config_cannot_ask_for_gigabytes(tmp_path):
    for channels in ([30000, 30000], [-1, 5]):
        payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                   "config": {**TINY.__dict__, "channels": channels}, "state_dict": {}, "meta": {}}  # fmt: skip
        torch.save(payload, tmp_path / "hostile.pt")
        started = time.perf_counter()
        with pytest.raises(ModelError, match=r"channels must be 1 to \d+"):
            load_checkpoint(tmp_path / "hostile.pt")
        assert time.perf_counter() - started < 5.0  # refused before any network is built


def test_nan_weights_are_refused_not_answered_with_empty_masks(tmp_path):
    network = build_network(TINY)
    with torch.no_grad():
        next(iter(network.parameters())).fill_(float("nan"))
    path = save_checkpoint(tmp_path / "nan.pt", network, TINY, {})
    with pytest.raises(ModelError, match="NaN or infinite weights"):
        load_checkpoint(path)
    assert load_checkpoint(_saved(tmp_path, "fine.pt", TINY)).config == TINY  # the same network, finite: loads


def _with(tmp_path, name: str, change, config: NetworkConfig = TINY) -> Path:
    """A real checkpoint of ``config`` whose payload ``change`` edits, as a hand-edited file would be."""
    payload = torch.load(_saved(tmp_path, "base.pt", config), weights_only=True)
    change(payload)
    torch.save(payload, tmp_path / name)
    return tmp_path / name


def test_a_checkpoint_without_its_config_is_refused_not_given_the_default_network(tmp_path):
    # weights of the default network: without its config, they loaded as the defaults, silently
    path = _with(tmp_path, "no_config.pt", lambda payload: payload.pop("config"), NetworkConfig())
    with pytest.raises(ModelError, match=r"has no network config \(its 'config' entry is missing\)"):
        load_checkpoint(path)


def test_a_config_edited_after_training_is_refused_and_one_that_agrees_loads(tmp_path):
    trained = {**TINY.__dict__, "channels": list(TINY.channels), "strides": list(TINY.strides)}  # as JSON gives it

    def edited(payload):  # the network was trained at 16; its config now says 32 (the weights still fit)
        payload["meta"] = {"train_config": {"network": trained}}
        payload["config"]["patch_size"] = 32

    with pytest.raises(ModelError, match=r"disagrees with the one it was trained with \(patch_size 32 in its config, "
                                         r"16 in meta.train_config.network\)"):  # fmt: skip
        load_checkpoint(_with(tmp_path, "edited.pt", edited))

    def agreeing(payload):  # a training config may give only some fields, and fields a newer version added
        payload["meta"] = {"train_config": {"network": {"patch_size": 16, "channels": [4, 8], "added_later": 1}}}

    assert load_checkpoint(_with(tmp_path, "agrees.pt", agreeing)).config == TINY
    for meta in ({"train_config": {}}, {"train_config": {"network": None}}, {"name": "x"}):  # nothing to compare
        assert (
            load_checkpoint(_with(tmp_path, "plain.pt", lambda payload, meta=meta: payload.update(meta=meta))).config
            == TINY
        )


META = {"data_root": Path("/data/msd"), "dice": np.float32(0.75), "steps": np.int64(3), "splits": ("a", "b")}
PLAIN = {"data_root": "/data/msd", "dice": 0.75, "steps": 3, "splits": ["a", "b"]}


def _writers(tmp_path):
    """Each writer of a SegAssist torch file with free-form meta: (save, read its meta back through the
    file's own loader, the error)."""
    from SegAssistLib.learning.adapters import apply_adapter, read_adapter_file
    from SegAssistLib.learning.deploy import load_full_version, save_full_version

    base = load_checkpoint(_saved(tmp_path, "base.pt", TINY))

    def full_version_meta(path):
        load_full_version(base, path)  # its loader has no meta to give: it must accept the file, then the meta
        return torch.load(path, weights_only=True)["meta"]

    return {
        "checkpoint": (lambda path, meta: save_checkpoint(path, build_network(TINY), TINY, meta),
                       lambda path: load_checkpoint(path).meta, ModelError),
        "fine-tuned weights": (lambda path, meta: save_full_version(path, base.network, TINY, base.identity, meta),
                               full_version_meta, AdapterError),
        "adapter": (lambda path, meta: apply_adapter(build_network(TINY), "lora").save(path, meta),
                    lambda path: read_adapter_file(path).meta, AdapterError),
    }


@pytest.mark.parametrize("what", ["checkpoint", "fine-tuned weights", "adapter"])
def test_meta_its_loader_would_refuse_is_made_plain_or_refused_before_writing(tmp_path, what):
    """A Path or a numpy number in meta was saved without a word, and the file's own loader
    (weights_only=True) refused it: a finished run could not be loaded."""
    save, read_meta, error = _writers(tmp_path)[what]
    save(tmp_path / "plain.pt", META)
    assert read_meta(tmp_path / "plain.pt") == PLAIN
    with pytest.raises(error, match=r"must be plain data \(JSON-compatible\): a value of type object at "
                                    r"\['train'\]\['data'\]\[1\]"):  # fmt: skip
        save(tmp_path / "refused.pt", {"train": {"data": ["ok", object()]}})
    assert not (tmp_path / "refused.pt").exists()
