"""What training accepts as input: the cases it reads (as the engine and evaluation check them), the
network settings of its config, and a step whose loss is not finite."""

from __future__ import annotations

import json

import numpy as np
import torch
from training_fixtures import brats_like_folder

from SegAssistLib.cli import main

TINY_NETWORK = {"channels": [4, 8], "strides": [2], "patch_size": 16}


def _write_case(folder, name, image, labels, label_origin=(0.0, 0.0, 0.0), label_direction=None):
    import SimpleITK as sitk

    # NRRD, not NIfTI: SimpleITK reads a NaN written to NIfTI back as 0

    img = sitk.GetImageFromArray(image)
    lab = sitk.GetImageFromArray(labels)
    lab.SetOrigin(label_origin)
    if label_direction is not None:
        lab.SetDirection(label_direction)
    sitk.WriteImage(img, str(folder / "imagesTr" / f"{name}.nrrd"))
    sitk.WriteImage(lab, str(folder / "labelsTr" / f"{name}.nrrd"))


def test_cases_the_engine_or_evaluation_would_refuse_are_skipped_and_named(tmp_path, capsys):
    """One NaN voxel made every patch around it, the loss and then (AdamW) the weights NaN for good;
    a label of the image's shape but elsewhere (shifted, flipped) taught the wrong voxels."""
    from SegAssistLib.training.data import load_training_cases

    folder, image, labels = brats_like_folder(tmp_path)
    with_nan = image.copy()
    with_nan[6, 10, 12] = np.nan
    with_inf = image.copy()
    with_inf[0, 0, 0] = np.inf
    _write_case(folder, "brats_new_ok", image, labels)
    _write_case(folder, "brats_new_nan", with_nan, labels)
    _write_case(folder, "brats_new_inf", with_inf, labels)
    _write_case(folder, "brats_new_moved", image, labels, label_origin=(20.0, 0.0, 0.0))
    _write_case(folder, "brats_new_flipped", image, labels, label_direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))
    # the same label stored with i reversed, every voxel at its place (origin at the far end): read back
    last_i = image.shape[2] - 1
    _write_case(folder, "brats_new_reversed", image, np.ascontiguousarray(labels[:, :, ::-1]),
                label_origin=(float(last_i), 0.0, 0.0), label_direction=(-1, 0, 0, 0, 1, 0, 0, 0, 1))  # fmt: skip
    loaded = load_training_cases(tmp_path)
    assert [c.name for c in loaded["brats"]] == ["brats_new_ok", "brats_new_reversed"]
    assert np.array_equal(loaded["brats"][1].labels, loaded["brats"][0].labels)
    out = capsys.readouterr().out
    assert "skipped training case brats_new_nan: image has 1 NaN or infinite voxels" in out
    assert "skipped training case brats_new_inf: image has 1 NaN or infinite voxels" in out
    assert "skipped training case brats_new_moved: the label is not on the image's grid: its origin" in out
    assert "skipped training case brats_new_flipped: the label is not on the image's grid: its direction" in out


def test_a_step_whose_loss_is_not_finite_never_reaches_the_weights(tmp_path, capsys):
    from SegAssistLib.training.train import TrainConfig, Trainer

    cfg = TrainConfig(data_root="", network=TINY_NETWORK, batch_size=2, loader_workers=0, max_correction_rounds=0)
    trainer = Trainer(cfg, tmp_path / "run")
    real_loss = trainer.loss
    try:
        before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
        trainer.loss = lambda logits, y: real_loss(logits, y) * float("nan")
        stats = trainer.train_step()
        assert stats.get("skipped") and trainer.skipped_steps == 1
        after = trainer.net.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # not even weight decay
        assert "loss nan, not finite: step skipped (1 so far)" in capsys.readouterr().out
        trainer.loss = real_loss
        stats = trainer.train_step()
        assert not stats.get("skipped") and np.isfinite(stats["loss"])
        assert all(torch.isfinite(p).all() for p in trainer.net.parameters())
    finally:
        trainer.close()


def test_unknown_network_settings_are_refused_but_checkpoints_load_as_before(tmp_path, capsys):
    """A typo in the config's network section trained the default network without a word."""
    config = tmp_path / "cfg.json"
    config.write_text(
        json.dumps(
            {
                "data_root": "",
                "max_steps": 1,
                "loader_workers": 0,
                "network": {"chanels": [4, 8], "stride": [2], "patch_size": 16},
            }
        )
    )
    assert main(["train", "--out", str(tmp_path / "run"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "unknown network setting(s) chanels, stride (NetworkConfig has in_channels" in err
    assert "Traceback" not in err and err.count("\n") == 1 and not (tmp_path / "run").exists()

    from SegAssistLib.engine.network import NetworkConfig, build_network, load_checkpoint, save_checkpoint
    from SegAssistLib.errors import SegAssistError
    from SegAssistLib.training.train import TrainConfig, Trainer

    try:
        Trainer(TrainConfig(data_root="", network={"patch_sise": 16}, loader_workers=0), tmp_path / "direct")
        raise AssertionError("an unknown network setting was accepted")
    except SegAssistError as exc:
        assert "unknown network setting(s) patch_sise" in str(exc)
    # a checkpoint's config keeps loading as before (keys it does not know are dropped there)
    net_cfg = NetworkConfig.from_dict(TINY_NETWORK)
    save_checkpoint(tmp_path / "model.pt", build_network(net_cfg), net_cfg, {})
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    payload["config"]["added_later"] = 1
    torch.save(payload, tmp_path / "model.pt")
    assert load_checkpoint(tmp_path / "model.pt").config == net_cfg


def test_steps_skipped_for_a_loss_that_is_not_finite_are_still_counted_after_a_resume(tmp_path):
    """state.pt did not keep the count: a resumed run's log and final line said fewer than were skipped."""
    from SegAssistLib.training.train import TrainConfig, Trainer

    cfg = TrainConfig(data_root="", network=TINY_NETWORK, batch_size=1, loader_workers=0, max_correction_rounds=0)
    trainer = Trainer(cfg, tmp_path / "run")
    real_loss = trainer.loss
    try:
        trainer.loss = lambda logits, y: real_loss(logits, y) * float("nan")
        assert trainer.train_step().get("skipped")
        trainer.save()
    finally:
        trainer.close()
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["skipped_steps"] == 1
    for saved, expected in ((state, 1), ({k: v for k, v in state.items() if k != "skipped_steps"}, 0)):  # older
        resumed = Trainer(cfg, tmp_path / "resumed", saved)
        resumed.close()
        assert resumed.skipped_steps == expected
