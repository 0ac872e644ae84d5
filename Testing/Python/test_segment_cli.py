"""``segassist segment``: prompt files in, a label map or .seg.nrrd out, on the in-process model or a
real server on loopback; outputs are never replaced without --overwrite."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_server_fixtures import TOKENS, make_volume

from SegAssistLib.cli import main
from SegAssistLib.engine.builtin import BuiltinEngine, load_default_engine
from SegAssistLib.io import load_mask, load_volume, volume_to_sitk
from SegAssistLib.prompt_log import PromptLog
from SegAssistLib.prompts import BoxPrompt, PointPrompt

pytest_plugins = ["test_server_fixtures"]

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "Resources" / "Samples" / "hippocampus_001_image.nii.gz"
SAMPLE_PROMPTS = REPO / "Resources" / "Examples" / "hippocampus_001_prompts.json"


def _segment(*args) -> int:
    return main(["segment", *[str(a) for a in args]])


def _voxels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_the_sample_is_segmented_like_the_engine_does_it_and_its_log_replays(tmp_path, shipped_checkpoint, capsys):
    seg, log = tmp_path / "out" / "hippo.seg.nrrd", tmp_path / "out" / "log.json"
    assert _segment(SAMPLE, "--prompts", SAMPLE_PROMPTS, "--out", seg, "--log", log, "--segment-name", "Hippo",
                    "--threads", 1) == 0
    printed = capsys.readouterr().out
    assert "Prompt 2 of 2: box" in printed and "2 prompts ->" in printed

    volume = load_volume(SAMPLE)
    prompts = [PointPrompt(position=(16, 27, 15)), BoxPrompt(min_corner=(9, 20, 13), max_corner=(27, 41, 13))]
    expected = load_default_engine(threads=1).open_session(volume, prompts).result()
    image = sitk.ReadImage(str(seg))
    assert np.array_equal(sitk.GetArrayFromImage(image), expected) and expected.sum() > 500
    assert image.GetMetaData("Segment0_Name") == "Hippo" and image.GetSpacing() == volume.spacing
    assert np.allclose(image.GetOrigin(), volume.origin)

    recorded = PromptLog.load(log)
    assert recorded.prompts == prompts and tuple(recorded.image.shape_ijk) == volume.shape_ijk
    assert np.allclose(recorded.image.origin, volume.origin) and np.allclose(recorded.image.direction, volume.direction)
    replay = tmp_path / "replay.nii.gz"
    assert _segment(SAMPLE, "--prompts", log, "--out", replay, "--threads", 1) == 0
    assert np.array_equal(_voxels(replay), expected)

    # the same scan stored with its j axis the other way (sitk.Flip keeps every voxel where it was in
    # space): the log's prompts move to the voxels they named, and segment the same hippocampus
    original = sitk.ReadImage(str(SAMPLE))
    sitk.WriteImage(sitk.Flip(original, [False, True, False]), str(tmp_path / "reordered.nii.gz"))
    assert _segment(tmp_path / "reordered.nii.gz", "--prompts", log, "--out", tmp_path / "same.nii.gz",
                    "--threads", 1) == 0  # fmt: skip
    back = _voxels(tmp_path / "same.nii.gz")[:, ::-1, :] > 0
    assert 2 * np.sum(back & (expected > 0)) / (back.sum() + (expected > 0).sum()) > 0.8
    # the scan's voxels placed as their mirror image in space (j's direction reversed, the same origin):
    # the log's clicks would land elsewhere
    mirror = sitk.Image(original)
    direction = np.asarray(original.GetDirection()).reshape(3, 3) * [1.0, -1.0, 1.0]
    mirror.SetDirection(direction.ravel().tolist())
    sitk.WriteImage(mirror, str(tmp_path / "mirror.nii.gz"))
    capsys.readouterr()
    assert _segment(tmp_path / "mirror.nii.gz", "--prompts", log, "--out", tmp_path / "no.nii.gz") == 2
    assert "placed otherwise in space" in capsys.readouterr().err and not (tmp_path / "no.nii.gz").exists()


def test_outputs_are_replaced_only_with_overwrite(tmp_path, shipped_checkpoint, capsys):
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(b"someone's work")
    assert _segment(SAMPLE, "--prompts", SAMPLE_PROMPTS, "--out", out) == 2
    assert "exists: add --overwrite" in capsys.readouterr().err and out.read_bytes() == b"someone's work"
    assert _segment(SAMPLE, "--prompts", SAMPLE_PROMPTS, "--out", out, "--overwrite", "--threads", 1) == 0
    assert _voxels(out).sum() > 500
    assert [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]  # no temporary file left


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompts": [{"kind": "point", "position": [1, 2, 3]}, {"kind": "box"}]}', "prompt 2 of 2"),
        ('{"points": []}', "expected a list of prompts"),
        ("not json", "cannot read prompts"),
        ('[{"kind": "point", "position": [16, 27, 99]}]', "lies outside the image"),
        (json.dumps(PromptLog(image={"shape_ijk": (35, 51, 36), "spacing": (1, 1, 1)},
                              prompts=[PointPrompt(position=(1, 2, 3))]).model_dump(mode="json")),
         "recorded on an image of \\[35, 51, 36\\] voxels"),
        ("[" * 50_000 + "]" * 50_000, "nested too deeply to be prompts"),  # was a RecursionError traceback
        ('[{"kind": "point", "position": [NaN, 1, 1]}]', "prompt 1 of 1: invalid prompt: point.position: point "
                                                         "position has a non-finite coordinate"),
    ],
)
def test_bad_prompt_files_are_refused_with_the_reason_and_nothing_is_written(
    tmp_path, shipped_checkpoint, capsys, content, message
):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(content)
    out = tmp_path / "out.nii.gz"
    assert _segment(SAMPLE, "--prompts", prompts, "--out", out, "--threads", 1) == 2
    err = capsys.readouterr().err
    assert err.startswith("segassist segment: error:") and re.search(message, err), err
    assert err.count("\n") == 1, err  # one line: no traceback, no pydantic dump
    assert not out.exists()


def test_bad_usage_is_refused_before_the_model_loads(tmp_path, capsys):
    out = tmp_path / "out.nii.gz"
    missing_model = tmp_path / "no-such-model.pt"  # never read: each refusal comes first
    cases = [
        (["--out", out, "--log", out], "same file"),
        (["--out", out, "--token", "t", "--model", missing_model], "need --url"),
        (["--out", out, "--url", "http://127.0.0.1:9"], "needs your consent"),
        (["--out", tmp_path], "is a folder"),
        (["--out", SAMPLE], "is the image itself"),  # said first: --overwrite would not help
        (["--out", SAMPLE, "--overwrite"], "is the image itself"),
    ]
    for extra, message in cases:
        assert _segment(SAMPLE, "--prompts", SAMPLE_PROMPTS, *extra) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_remote_server_gives_the_answer_of_the_same_weights_in_process(
    tmp_path, shared_server, server_checkpoint, monkeypatch
):
    volume = make_volume()
    image = tmp_path / "blob.nii.gz"
    sitk.WriteImage(volume_to_sitk(volume), str(image))
    volume = load_volume(image)
    prompts = [PointPrompt(position=(24, 20, 12)), PointPrompt(position=(24, 20, 20), positive=False)]
    (tmp_path / "prompts.json").write_text(json.dumps([p.model_dump(mode="json") for p in prompts]))
    expected = BuiltinEngine.from_checkpoint(server_checkpoint).open_session(volume, prompts).result()

    monkeypatch.setenv("SEGASSIST_REMOTE_TOKEN", TOKENS["alice"])
    remote = tmp_path / "remote.seg.nrrd"
    assert _segment(image, "--prompts", tmp_path / "prompts.json", "--out", remote,
                    "--url", shared_server.url, "--send-images-to-remote") == 0
    assert np.array_equal(_voxels(remote), expected) and expected.any()

    monkeypatch.setenv("SEGASSIST_REMOTE_TOKEN", "wrong-token-0123456789")
    refused = tmp_path / "refused.nii.gz"
    assert _segment(image, "--prompts", tmp_path / "prompts.json", "--out", refused,
                    "--url", shared_server.url, "--send-images-to-remote") == 2
    assert not refused.exists()


def test_a_core_install_segments_on_a_server_and_names_the_extra_for_the_local_model(tmp_path, shared_server):
    """Without torch (Slicer's Python, a thin client machine) the remote path works; the local one
    says which extra to install."""
    import subprocess
    import sys

    from test_packaging import BLOCKER

    volume = make_volume()
    image = tmp_path / "blob.nrrd"
    sitk.WriteImage(volume_to_sitk(volume), str(image))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"prompts": [PointPrompt(position=(24, 20, 12)).model_dump(mode="json")]}))

    def run(*argv) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", BLOCKER, "segment", str(image), "--prompts", str(prompts),
                               *[str(a) for a in argv]], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "SEGASSIST_REMOTE_TOKEN": TOKENS["alice"]})

    remote = run("--out", tmp_path / "remote.nii.gz", "--url", shared_server.url, "--send-images-to-remote")
    assert remote.returncode == 0, remote.stderr[-800:]
    assert _voxels(tmp_path / "remote.nii.gz").any()
    local = run("--out", tmp_path / "local.nii.gz")
    assert local.returncode == 2 and "pip install 'segassist[engine]'" in local.stderr, local.stderr[-800:]
    assert not (tmp_path / "local.nii.gz").exists()


@pytest.mark.parametrize("name", ["res.png", "res.txt", "res", "res.dcm", "res.seg.nhdr"])
def test_an_output_of_no_mask_format_is_refused_before_the_model_loads(tmp_path, capsys, name):
    """``--out res.png`` wrote a 2D PNG slice (exit 0); ``.txt`` or no suffix ran the model, then died with a
    SimpleITK traceback."""
    out = tmp_path / name
    missing_model = tmp_path / "no-such-model.pt"  # never read: the refusal comes first
    assert _segment(SAMPLE, "--prompts", SAMPLE_PROMPTS, "--out", out, "--model", missing_model) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"segassist segment: error: --out {out}: write the result as "
                          ".seg.nrrd, .nii.gz, .nrrd, .nii, .mha")  # fmt: skip
    assert err.count("\n") == 1 and not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["--url", "gpu-server:8470"], {}, "--url gpu-server:8470: give the server as http(s)://host:port, "
                                           "for example https://gpu-server:8470"),
        (["--url", "http://10.0.0.5:8470", "--token", "abc"], {},
         "refusing to send the token (--token) in clear text to 10.0.0.5: use an https:// --url, or add "
         "--allow-insecure-http"),
        (["--url", "http://10.0.0.5:8470"], {"SEGASSIST_REMOTE_TOKEN": "abc"},
         "refusing to send the token ($SEGASSIST_REMOTE_TOKEN) in clear text"),
        (["--url", "https://10.0.0.5:8470", "--token", "a b"], {}, "the token (--token) holds spaces"),
    ],
)
def test_a_bad_url_or_token_is_one_line_naming_the_flag_before_the_image_is_read(
    tmp_path, capsys, monkeypatch, argv, env, message
):
    """A URL without its scheme, or a token over plain http to another host, ended in a ValueError traceback
    (exit 1) naming the Python argument allow_insecure_token, not the flag."""
    monkeypatch.delenv("SEGASSIST_REMOTE_TOKEN", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out.nii.gz"
    missing = tmp_path / "no-such-image.nii.gz"  # never read: the refusal comes first
    assert _segment(missing, "--prompts", SAMPLE_PROMPTS, "--out", out, "--send-images-to-remote", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("segassist segment: error: ") and message in err and err.count("\n") == 1, err
    assert "allow_insecure_token" not in err and not out.exists()


@pytest.fixture(scope="module")
def sample_result() -> np.ndarray:
    """What the shipped model makes of the sample's prompts."""
    prompts = [PointPrompt(position=(16, 27, 15)), BoxPrompt(min_corner=(9, 20, 13), max_corner=(27, 41, 13))]
    return load_default_engine(threads=1).open_session(load_volume(SAMPLE), prompts).result()


@pytest.mark.parametrize("name", ["RESULT.NII.GZ", "result.Nii", "result.MHA", "scan.img.nii.gz", "x.nii.nii.gz",
                                  "R.SEG.NRRD"])  # fmt: skip
def test_every_output_name_accepted_up_front_is_written_under_that_name(
    tmp_path, shipped_checkpoint, capsys, sample_result, name
):
    """Accepted before the model ran, then: a "Bad Nifti file name" traceback (RESULT.NII.GZ, result.Nii), a
    .mhd and .zraw pair left under temporary names (result.MHA), or "the writer did not create" and an
    Analyze .hdr.gz left behind (scan.img.nii.gz, x.nii.nii.gz)."""
    out = tmp_path / name
    assert _segment(SAMPLE, "--prompts", SAMPLE_PROMPTS, "--out", out, "--segment-name", "Hippo", "--threads", 1) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == [name]
    assert np.array_equal(load_mask(out), sample_result)
    if name.endswith(".SEG.NRRD"):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(out))
        reader.ReadImageInformation()
        assert reader.GetMetaData("Segment0_Name") == "Hippo"


def test_an_output_that_names_the_image_another_way_is_refused(tmp_path, capsys):
    """``--out sub/../in.nii.gz --overwrite`` replaced the input image with the mask: the paths were compared
    without resolving '..' or links."""
    image, sub, mask = tmp_path / "in.nii.gz", tmp_path / "sub", tmp_path / "mask.nii.gz"
    image.write_bytes(SAMPLE.read_bytes())
    mask.write_bytes(b"an earlier mask")
    sub.mkdir()
    (sub / "link.nii.gz").symlink_to(image)  # a link to the image
    (sub / "mask-link.nii.gz").symlink_to(mask)
    missing_model = tmp_path / "no-such-model.pt"  # never read: each refusal comes first
    cases = [
        (image, ["--out", sub / ".." / "in.nii.gz"], "--out is the image itself"),
        (image, ["--out", sub / "link.nii.gz"], "--out is the image itself"),
        (sub / "link.nii.gz", ["--out", image], "--out is the image itself"),  # the image given through a link
        (sub / ".." / "in.nii.gz", ["--out", image], "--out is the image itself"),
        (image, ["--out", mask, "--log", sub / ".." / "in.nii.gz"], "--log is the image itself"),
        (image, ["--out", mask, "--log", sub / ".." / "mask.nii.gz"], "--log and --out are the same file"),
        (image, ["--out", sub / "mask-link.nii.gz", "--log", mask], "--log and --out are the same file"),
        (image, ["--out", sub / ".." / "new.nii.gz", "--log", tmp_path / "new.nii.gz"], "the same file"),  # neither yet
    ]
    for source, extra, message in cases:
        assert _segment(source, "--prompts", SAMPLE_PROMPTS, *extra, "--overwrite", "--model", missing_model) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)
    assert image.read_bytes() == SAMPLE.read_bytes() and mask.read_bytes() == b"an earlier mask"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nii.gz", "mask.nii.gz", "sub"]


def test_a_log_that_cannot_be_written_leaves_no_new_mask(tmp_path, shipped_checkpoint, capsys, monkeypatch):
    """The mask was written, then the log failed: the mask stayed (over the earlier one, with --overwrite)
    and a rerun was refused for the mask that exists."""
    import SegAssistLib.headless as headless

    out, log = tmp_path / "mask.nii.gz", tmp_path / "log.json"
    out.write_bytes(b"someone's work")
    run_prompts = headless.run_prompts

    def run_then_put_a_folder_where_the_log_goes(*args, **kwargs):  # after the checks made up front
        run = run_prompts(*args, **kwargs)
        log.mkdir()
        return run

    monkeypatch.setattr(headless, "run_prompts", run_then_put_a_folder_where_the_log_goes)
    for extra in (["--overwrite"], []):
        assert _segment(SAMPLE, "--prompts", SAMPLE_PROMPTS, "--out", out, "--log", log, "--threads", 1, *extra) == 2
        err = capsys.readouterr().err
        assert not extra or out.read_bytes() == b"someone's work"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["log.json", "mask.nii.gz"][: len(extra) + 1])
        assert f"--out {out} and --log {log} not written, nothing replaced" in err and str(log) in err, err
        log.rmdir()
        out.unlink(missing_ok=True)
    assert list(tmp_path.iterdir()) == []


def test_a_nifti_image_with_nan_voxels_is_refused_as_in_nrrd(tmp_path, shipped_checkpoint, capsys):
    """ITK's NIfTI reader turns NaN voxels into 0: the same scan was refused as NRRD and segmented as NIfTI."""
    image = sitk.Cast(sitk.ReadImage(str(SAMPLE)), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[3, 4, 5] = np.nan
    array[6, 7, 8] = np.inf
    nan_image = sitk.GetImageFromArray(array)
    nan_image.CopyInformation(image)
    errors = []
    for index, name in enumerate(("nan.nrrd", "nan.nii.gz", "nan.nii")):
        sitk.WriteImage(nan_image, str(tmp_path / name))
        out = tmp_path / f"out{index}.nii.gz"
        assert _segment(tmp_path / name, "--prompts", SAMPLE_PROMPTS, "--out", out, "--threads", 1) == 2
        errors.append(capsys.readouterr().err.strip().splitlines()[-1])
        assert not out.exists()
    assert errors[0].endswith("image has 2 NaN or infinite voxels: fill or mask them before segmenting"), errors
    assert errors == [errors[0]] * 3


def test_a_log_replays_with_the_engine_settings_it_was_recorded_with_unless_a_flag_replaces_them(
    tmp_path, shipped_checkpoint, capsys
):
    """A session on a server started with --edge-band 0 records it; `segassist segment` replays its log
    with it (the default engine gave another mask); --edge-band replaces it, with a note."""
    from SegAssistLib.prompt_log import ImageInfo

    volume = load_volume(SAMPLE)
    prompts = [PointPrompt(position=(16, 27, 15)), BoxPrompt(min_corner=(9, 20, 13), max_corner=(27, 41, 13))]
    session = load_default_engine(threads=1, edge_snap=None).open_session(volume, prompts)
    recorded = session.result()
    log = session.prompt_log().model_copy(update={"image": ImageInfo.from_volume(volume)})
    log.save(tmp_path / "recorded.json")
    default = load_default_engine(threads=1).open_session(volume, prompts).result()
    assert not np.array_equal(default, recorded) and recorded.sum() > 500

    out, out_log = tmp_path / "replay.nii.gz", tmp_path / "replay.json"
    assert _segment(SAMPLE, "--prompts", tmp_path / "recorded.json", "--out", out, "--log", out_log,
                    "--threads", 1) == 0
    assert np.array_equal(_voxels(out), recorded)
    assert "warning" not in capsys.readouterr().err
    assert PromptLog.load(out_log).engine == log.engine  # its own log replays the same way again

    overridden = tmp_path / "overridden.nii.gz"
    assert _segment(SAMPLE, "--prompts", tmp_path / "recorded.json", "--out", overridden, "--edge-band", 2,
                    "--threads", 1) == 0
    assert np.array_equal(_voxels(overridden), default)
    err = capsys.readouterr().err
    assert "note: --edge-band 2 replace the engine settings the prompt log was recorded with (edge_band 0.0 vs " \
           "2.0; recorded vs used): the mask may differ" in err, err

    # two logs of different settings: no one setting replays both
    load_default_engine(threads=1).open_session(volume, prompts[:1]).prompt_log().save(tmp_path / "default.json")
    refused = tmp_path / "refused.nii.gz"
    assert _segment(SAMPLE, "--prompts", tmp_path / "recorded.json", "--prompts", tmp_path / "default.json",
                    "--out", refused) == 2
    assert "were recorded with different engine settings (edge_band 0.0 vs 2.0)" in capsys.readouterr().err
    assert not refused.exists()


def test_a_server_answering_with_other_settings_than_the_log_is_named_in_a_warning(
    tmp_path, shared_server, server_checkpoint, monkeypatch, capsys
):
    volume = make_volume()
    image = tmp_path / "blob.nii.gz"
    sitk.WriteImage(volume_to_sitk(volume), str(image))
    volume = load_volume(image)
    session = BuiltinEngine.from_checkpoint(server_checkpoint, edge_snap=None, refine_depth=2).open_session(
        volume, [PointPrompt(position=(24, 20, 12))])
    session.prompt_log().save(tmp_path / "log.json")

    monkeypatch.setenv("SEGASSIST_REMOTE_TOKEN", TOKENS["alice"])
    out = tmp_path / "remote.nii.gz"
    remote = ("--url", shared_server.url, "--send-images-to-remote")
    assert _segment(image, "--prompts", tmp_path / "log.json", "--out", out, *remote) == 0
    err = capsys.readouterr().err
    assert "warning: the prompts were recorded with engine settings other than those test " in err, err
    assert "(refine_depth 2 vs 1; max_refine_tiles 27 vs 8; edge_band 0.0 vs 2.0; recorded vs used)" in err, err
    assert out.exists()
    # the server's settings are its own: the local model's flags are refused before the image is sent
    for flag in ("--edge-band", "--refine-depth"):
        assert _segment(image, "--prompts", tmp_path / "log.json", "--out", tmp_path / "x.nii.gz", flag, 1,
                        *remote) == 2
        assert f"{flag} sets the local model: a server (--url) answers with its own" in capsys.readouterr().err


def test_refine_depth_takes_the_engines_range_in_every_command(tmp_path, capsys, server_checkpoint, shipped_checkpoint):
    """segment and serve took 1-4 (argparse choices), eval and the engine 1-16: a log recorded at depth 5
    replayed in the library but `segment --refine-depth 5` refused it. One limit now, the engine's."""
    from SegAssistLib.cli import build_parser
    from SegAssistLib.prompt_log import MAX_REFINE_DEPTH
    from SegAssistLib.server.cli import settings_from_args

    parser = build_parser()
    commands = {"segment": ["segment", "img.nii.gz", "--prompts", "p.json", "--out", "o.nii.gz"], "serve": ["serve"],
                "eval": ["eval", "data", "--json", "r.json"]}
    for name, argv in commands.items():
        assert parser.parse_args([*argv, "--refine-depth", "5"]).refine_depth == 5, name
        assert parser.parse_args([*argv, "--refine-depth", str(MAX_REFINE_DEPTH)]).refine_depth == MAX_REFINE_DEPTH
        for refused in (str(MAX_REFINE_DEPTH + 1), "0"):
            with pytest.raises(SystemExit):
                parser.parse_args([*argv, "--refine-depth", refused])
            assert "argument --refine-depth: must be" in capsys.readouterr().err, name
    serve = parser.parse_args(["serve", "--refine-depth", str(MAX_REFINE_DEPTH), "--model", str(server_checkpoint)])
    assert settings_from_args(serve).refine_depth == MAX_REFINE_DEPTH  # the server's settings take it too

    out = tmp_path / "depth5.nii.gz"  # and the engine answers at that depth
    assert _segment(SAMPLE, "--prompts", SAMPLE_PROMPTS, "--out", out, "--refine-depth", 5, "--threads", 1) == 0
    assert _voxels(out).any()


def test_ca_bundle_is_checked_before_the_image_is_read(tmp_path, capsys):
    out = tmp_path / "out.nii.gz"
    cases = [
        (["--ca-bundle", SAMPLE], "--ca-bundle need --url"),
        (["--url", "http://127.0.0.1:9", "--send-images-to-remote", "--ca-bundle", SAMPLE], "plain http has none"),
        (["--url", "https://127.0.0.1:9", "--send-images-to-remote", "--ca-bundle", tmp_path / "none.pem"],
         "none.pem: no such file"),
    ]
    for extra, message in cases:
        assert _segment(tmp_path / "not-read.nii.gz", "--prompts", SAMPLE_PROMPTS, "--out", out, *extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)
    assert not out.exists()
