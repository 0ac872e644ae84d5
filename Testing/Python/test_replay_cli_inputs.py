"""``segassist segment`` refuses bad inputs before any work, with one line that names the problem:
local-model options given with --url (they were silently ignored), a --log that would replace one of
the --prompts files, files with no prompt or with a prompt outside the image (found only after the
model had loaded and earlier prompts had run, or the image had been uploaded, and named without its
file or number), and a Slicer markups file."""

from __future__ import annotations

import json
from pathlib import Path

from SegAssistLib.cli import main

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "Resources" / "Samples" / "hippocampus_001_image.nii.gz"
SAMPLE_PROMPTS = ROOT / "Resources" / "Examples" / "hippocampus_001_prompts.json"
MARKUPS = ROOT / "Resources" / "Examples" / "hippocampus_001_clicks.mrk.json"
NOBODY = "http://127.0.0.1:9"  # nothing listens: a refusal that came after the upload would say so


def _segment(*args) -> int:
    return main(["segment", *[str(a) for a in args]])


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.err.startswith("segassist segment: error:") and captured.err.count("\n") == 1, captured.err
    assert "Opening a session" not in captured.out  # no model ran, nothing was sent
    return captured.err


def test_local_model_options_are_refused_with_a_url(tmp_path, capsys):
    out = tmp_path / "out.nii.gz"
    remote = ("--url", NOBODY, "--send-images-to-remote")
    for extra, named in [
        (("--model", tmp_path / "other.pt"), "--model sets the local model"),
        (("--device", "cuda:7"), "--device sets the local model"),
        (("--threads", 2), "--threads sets the local model"),
        (("--threads", 0), "--threads sets the local model"),
        (("--model", tmp_path / "other.pt", "--device", "cpu"), "--model and --device set the local model"),
    ]:
        assert _segment(SAMPLE, "--prompts", SAMPLE_PROMPTS, "--out", out, *remote, *extra) == 2
        err = _one_line_error(capsys)
        assert named in err and "a server (--url) answers with its own model" in err, err
    assert not out.exists()


def test_the_log_never_replaces_a_prompt_file(tmp_path, capsys):
    mine = tmp_path / "mine.json"
    mine.write_bytes(SAMPLE_PROMPTS.read_bytes())
    before = mine.read_bytes()
    out = tmp_path / "out.nii.gz"
    for log in (mine, tmp_path / "sub" / ".." / "mine.json"):
        for extra in ((), ("--overwrite",)):
            assert _segment(SAMPLE, "--prompts", mine, "--out", out, "--log", log, *extra) == 2
            assert f"--log is one of the --prompts files: {log}" in _one_line_error(capsys)
    assert mine.read_bytes() == before and not out.exists()


def test_no_prompts_is_said_before_the_model_loads(tmp_path, capsys):
    empty, also_empty = tmp_path / "empty.json", tmp_path / "none.json"
    empty.write_text("[]")
    also_empty.write_text('{"prompts": []}')
    broken_model = tmp_path / "broken.pt"
    broken_model.write_text("not a checkpoint")  # never read: the refusal comes first
    assert _segment(SAMPLE, "--prompts", empty, "--prompts", also_empty, "--out", tmp_path / "o.nii.gz",
                    "--model", broken_model) == 2  # fmt: skip
    assert f"no prompts in {empty}, {also_empty}" in _one_line_error(capsys)


def test_a_prompt_outside_the_image_is_named_by_file_and_number_before_any_work(tmp_path, capsys):
    first, second = tmp_path / "first.json", tmp_path / "outside.json"
    first.write_text(json.dumps([{"kind": "point", "position": [16, 27, 15]}]))
    second.write_text(json.dumps({"prompts": [{"kind": "point", "position": [16, 27, 15]},
                                              {"kind": "point", "position": [100, 27, 15]}]}))  # fmt: skip
    out = tmp_path / "out.nii.gz"
    for backend in ((), ("--url", NOBODY, "--send-images-to-remote")):
        assert _segment(SAMPLE, "--prompts", first, "--prompts", second, "--out", out, *backend) == 2
        err = _one_line_error(capsys)
        assert f"{second}: prompt 2 of 2: point [100.0, 27.0, 15.0] lies outside the image" in err, err
    assert not out.exists()


def test_a_markups_file_is_refused_naming_the_batch_script(tmp_path, capsys):
    out = tmp_path / "out.nii.gz"
    assert _segment(SAMPLE, "--prompts", MARKUPS, "--out", out) == 2
    err = _one_line_error(capsys)
    assert f"{MARKUPS} is a Slicer markups file" in err and "Resources/Examples/batch_segment.py" in err, err
    assert not out.exists()
