"""The prompt log's published schema (docs/prompt-log.schema.json) and its reader agree.

A log without ``schema_version`` was valid under the schema and read by ``segassist segment`` as a bare
list of prompts: the image it was recorded on and its engine settings were dropped unchecked, and the
replay on an image of another spacing wrote a mask. The schema also took versions, settings and
polarities that the reader refused (and the reverse), and a log's prompts were counted from 0 where a
list's are counted from 1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegAssistLib.cli import main
from SegAssistLib.errors import PromptError
from SegAssistLib.headless import read_prompts
from SegAssistLib.image import Volume
from SegAssistLib.prompt_log import EngineSettings, ImageInfo, PromptLog
from SegAssistLib.prompts import PointPrompt, parse_prompt

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "docs" / "prompt-log.schema.json").read_text(encoding="utf-8"))
SETTINGS = EngineSettings(refine_depth=1, max_refine_tiles=8, min_view_mm=64.0, correction_zoom_share=0.025,
                          edge_band=0.0, edge_beta=500.0, edge_max_voxels=200000)  # fmt: skip


def _log_without_version(volume: Volume) -> dict:
    log = PromptLog(image=ImageInfo.from_volume(volume), engine=SETTINGS, prompts=[PointPrompt(position=(3, 4, 5))])
    data = log.model_dump(mode="json")
    del data["schema_version"]
    return data


def test_a_log_without_schema_version_is_refused_not_replayed_as_a_bare_list(tmp_path, capsys):
    recorded = Volume(np.zeros((12, 10, 8), np.float32), (1.0, 1.0, 1.0))
    log = tmp_path / "log.json"
    log.write_text(json.dumps(_log_without_version(recorded)))
    other = tmp_path / "thick.nii.gz"  # the same grid, spaced otherwise: the log's clicks land elsewhere
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 1, (12, 10, 8)).astype(np.float32))
    image.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(image, str(other))
    out = tmp_path / "out.nii.gz"
    assert main(["segment", str(other), "--prompts", str(log), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{log}: invalid prompt log: schema_version is missing" in err and err.count("\n") == 1, err
    assert not out.exists()
    with pytest.raises(PromptError, match="schema_version is missing"):
        read_prompts(log)
    with pytest.raises(PromptError, match="schema_version is missing"):
        PromptLog.load(log)
    # any key of a log makes it one: engine settings alone are not dropped either
    log.write_text(json.dumps({"engine": SETTINGS.model_dump(), "prompts": []}))
    with pytest.raises(PromptError, match="schema_version is missing"):
        read_prompts(log)
    # a plain object of prompts (the bundled example has a comment beside them) is still a list
    log.write_text(json.dumps({"comment": "clicks", "prompts": [{"kind": "point", "position": [1, 2, 3]}]}))
    assert read_prompts(log).prompts == [PointPrompt(position=(1, 2, 3))]
    # a log made in code is of this reader's schema, and writes it
    assert json.loads(PromptLog(prompts=[]).to_json())["schema_version"] == PromptLog().schema_version


def test_the_published_schema_requires_and_constrains_what_the_reader_does():
    assert "schema_version" in SCHEMA["required"]
    pattern = SCHEMA["properties"]["schema_version"]["pattern"]
    for version, readable in [("1.5", True), ("1.0", True), ("1.10", True), ("1", False), ("1.4.1", False),
                              ("2.0", False), ("v1.2", False)]:  # fmt: skip
        assert bool(re.search(pattern, version)) == readable, version
        text = json.dumps({"schema_version": version, "prompts": []})
        if readable:
            assert PromptLog.from_json(text).schema_version == version
        else:
            with pytest.raises(PromptError):
                PromptLog.from_json(text)
    band = SCHEMA["$defs"]["EngineSettings"]["properties"]["edge_band"]
    assert band["not"] == {"exclusiveMinimum": 0, "exclusiveMaximum": 1}  # 0 < edge_band < 1: invalid
    with pytest.raises(ValueError, match="edge_band must be 0"):
        EngineSettings.model_validate_json(SETTINGS.model_copy(update={"edge_band": 0.5}).model_dump_json())


def test_whole_numbers_written_as_floats_read_as_the_schema_reads_them():
    """JSON Schema's "integer" holds 1.0: the reader refused it."""
    assert SCHEMA["$defs"]["EngineSettings"]["properties"]["refine_depth"]["type"] == "integer"
    data = {**SETTINGS.model_dump(), "refine_depth": 1.0, "max_refine_tiles": 8.0, "edge_max_voxels": 2e5}
    settings = EngineSettings.model_validate_json(json.dumps(data))
    assert settings == SETTINGS and type(settings.refine_depth) is int
    for bad in (1.5, "1", True):  # not whole numbers: refused, as the schema refuses them
        with pytest.raises(ValueError):
            EngineSettings.model_validate_json(json.dumps({**data, "refine_depth": bad}))


@pytest.mark.parametrize(
    "prompt, field",
    [
        ({"kind": "point", "position": [1, 2, 3], "positive": "yes"}, "positive"),
        ({"kind": "point", "position": [1, 2, 3], "positive": 1}, "positive"),
        ({"kind": "scribble", "points": [[1, 2, 3], [4, 2, 3]], "positive": "false"}, "positive"),
        ({"kind": "scribble", "points": [[1, 2, 3], [4, 2, 3]], "width": "2"}, "width"),
        ({"kind": "scribble", "points": [[1, 2, 3], [4, 2, 3]], "width": True}, "width"),
    ],
)
def test_a_prompt_the_schema_refuses_is_refused_by_the_reader(prompt, field):
    kind = SCHEMA["$defs"][f"{prompt['kind'].capitalize()}Prompt"]["properties"][field]
    assert kind["type"] in ("boolean", "number")  # "yes", 1, "2", true are none of these JSON types
    with pytest.raises(PromptError, match=field):
        parse_prompt(prompt)
    assert parse_prompt({**prompt, field: True if field == "positive" else 2.0}).kind == prompt["kind"]


def test_an_image_of_text_numbers_is_refused_as_the_schema_refuses_it():
    image = {"shape_ijk": [35, 51, 35], "spacing": [1.0, 1.0, 1.0]}
    assert PromptLog.model_validate({"schema_version": "1.5", "image": image}).image.shape_ijk == (35, 51, 35)
    for bad in ({"shape_ijk": ["35", 51, 35]}, {"shape_ijk": [True, 51, 35]}, {"spacing": ["1", 1, 1]}):
        with pytest.raises(ValueError):
            PromptLog.model_validate({"schema_version": "1.5", "image": {**image, **bad}})


def test_a_logs_prompts_are_counted_from_one_as_a_lists_are(tmp_path):
    bad = [{"kind": "point", "position": [1, 2, 3]}, {"kind": "undo"}]
    as_list, as_log = tmp_path / "list.json", tmp_path / "log.json"
    as_list.write_text(json.dumps(bad))
    as_log.write_text(json.dumps({"schema_version": "1.5", "prompts": bad}))
    for path in (as_list, as_log):
        with pytest.raises(PromptError, match=r"prompt 2 of 2: .*Input tag 'undo'") as refused:
            read_prompts(path)
        assert "prompts.1" not in str(refused.value)


def test_logs_and_prompt_files_are_utf8_whatever_the_locale(tmp_path):
    """Read and written in the locale's encoding: in Slicer on Windows (cp1252) a UTF-8 comment failed to
    read, and a log's non-ASCII text was written in cp1252. Here the locale is ASCII, UTF-8 mode off."""
    prompts = tmp_path / "prompts.json"
    comment = "hippocampe gauche — clics d’Élodie"
    prompts.write_bytes(json.dumps({"comment": comment, "prompts": [{"kind": "point", "position": [1, 2, 3]}]},
                                   ensure_ascii=False).encode("utf-8"))  # fmt: skip
    log = tmp_path / "log.json"
    script = (
        "import sys; from SegAssistLib.headless import read_prompts; from SegAssistLib.prompt_log import PromptLog; "
        "print(len(read_prompts(sys.argv[1]).prompts)); "
        "PromptLog(model='mod\\u00e8le-v2', prompts=[]).save(sys.argv[2]); print(PromptLog.load(sys.argv[2]).model)"
    )
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "utf-8", "PYTHONPATH": str(ROOT)}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script, str(prompts), str(log)], env=env, capture_output=True,
                          text=True, encoding="utf-8", timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["1", "modèle-v2"]
    assert json.loads(log.read_bytes().decode("utf-8"))["model"] == "modèle-v2"
