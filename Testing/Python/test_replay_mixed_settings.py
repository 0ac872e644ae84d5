"""Prompt logs recorded with different engine settings are refused only where those settings would be
applied in process: not where an option replaces exactly the settings that differ (``--edge-band``,
``--refine-depth``), nor where a server answers with its own (``--url``), which a warning then names
for each log. (The refusal had come to be made before anything else, so a combination of files that
was read before exited 2.) The shipped model and the bundled sample; a real server on loopback.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_server_fixtures import TOKENS, make_volume

from SegAssistLib.cli import main
from SegAssistLib.io import load_mask, load_volume, volume_to_sitk
from SegAssistLib.prompt_log import EngineSettings, ImageInfo, PromptLog
from SegAssistLib.prompts import PointPrompt

pytest_plugins = ["test_server_fixtures"]

SAMPLE = Path(__file__).resolve().parents[2] / "Resources" / "Samples" / "hippocampus_001_image.nii.gz"
DEFAULT = EngineSettings(refine_depth=1, max_refine_tiles=8, min_view_mm=64.0, correction_zoom_share=0.025,
                         edge_band=2.0, edge_beta=500.0, edge_max_voxels=200000)  # fmt: skip
FIRST, SECOND = PointPrompt(position=(16.0, 27.0, 15.0)), PointPrompt(position=(17.0, 26.0, 15.0))


def _segment(*args) -> int:
    return main(["segment", *[str(a) for a in args]])


def _logs(folder: Path, image: Path, a: EngineSettings, b: EngineSettings, prompts=(FIRST, SECOND)) -> list:
    info = ImageInfo.from_volume(load_volume(image))
    paths = []
    for name, settings, prompt in (("a.json", a, prompts[0]), ("b.json", b, prompts[1])):
        PromptLog(image=info, engine=settings, prompts=[prompt]).save(folder / name)
        paths.append(folder / name)
    return paths


@pytest.mark.parametrize(
    "differ, flag, used",
    [
        ({"edge_band": 0.0}, ("--edge-band", "2"), {}),
        ({"edge_band": 3.0, "edge_beta": 130.0}, ("--edge-band", "0"), {"edge_band": 0.0}),
        ({"refine_depth": 2, "max_refine_tiles": 27}, ("--refine-depth", "1"), {}),
    ],
    ids=["edge-band", "edge-band-and-beta", "refine-depth"],
)
def test_logs_that_differ_only_where_an_option_replaces_the_settings_are_replayed(
    tmp_path, shipped_checkpoint, capsys, differ, flag, used
):
    from SegAssistLib.engine.builtin import load_default_engine

    a, b = _logs(tmp_path, SAMPLE, DEFAULT.model_copy(update=differ), DEFAULT)
    out = tmp_path / "out.nii.gz"
    assert _segment(SAMPLE, "--prompts", a, "--prompts", b, "--out", out, *flag, "--threads", 1) == 0
    err = capsys.readouterr().err
    assert f"note: {' '.join(flag)} replace the engine settings the prompt log of {a} was recorded with (" in err, err
    settings = DEFAULT.model_copy(update=used)
    expected = load_default_engine(threads=1).open_session(load_volume(SAMPLE), [FIRST, SECOND],
                                                           settings=settings).result()  # fmt: skip
    assert np.array_equal(load_mask(out), expected) and expected.any()


def test_logs_that_differ_where_no_option_replaces_the_settings_are_still_refused(tmp_path, capsys):
    a, b = _logs(tmp_path, SAMPLE, DEFAULT.model_copy(update={"edge_band": 0.0}), DEFAULT)
    out = tmp_path / "out.nii.gz"
    assert _segment(SAMPLE, "--prompts", a, "--prompts", b, "--out", out, "--refine-depth", 2) == 2
    assert "were recorded with different engine settings (edge_band 0.0 vs 2.0): replay them separately" in (
        capsys.readouterr().err
    )
    assert not out.exists()


def test_a_server_replays_logs_of_different_settings_and_names_each_that_differs_from_its_own(
    tmp_path, shared_server, monkeypatch, capsys
):
    image = tmp_path / "blob.nii.gz"
    sitk.WriteImage(volume_to_sitk(make_volume()), str(image))
    prompts = (PointPrompt(position=(24, 20, 12)), PointPrompt(position=(30, 22, 12)))
    a, b = _logs(tmp_path, image, DEFAULT.model_copy(update={"edge_band": 0.0}),
                 DEFAULT.model_copy(update={"refine_depth": 2}), prompts)  # fmt: skip
    monkeypatch.setenv("SEGASSIST_REMOTE_TOKEN", TOKENS["alice"])
    out = tmp_path / "remote.nii.gz"
    assert _segment(image, "--prompts", a, "--prompts", b, "--out", out, "--url", shared_server.url,
                    "--send-images-to-remote") == 0  # fmt: skip
    err = capsys.readouterr().err
    assert f"warning: {a}: the prompts were recorded with engine settings other than those test" in err, err
    assert "(edge_band 0.0 vs 2.0; recorded vs used)" in err, err
    assert f"warning: {b}: the prompts were recorded with engine settings other than those test" in err, err
    assert "(refine_depth 2 vs 1; recorded vs used)" in err, err
    assert out.exists()
