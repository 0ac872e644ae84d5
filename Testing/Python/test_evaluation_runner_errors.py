"""One case the engine cannot segment (a constant image, refused when its session opens) is skipped
with its reason by ``segassist eval`` and ``segassist bench``; the run goes on and its results are
written. It once stopped the whole run and lost every case done before it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegAssistLib.cli import main
from SegAssistLib.errors import ImageError
from SegAssistLib.evaluation.bench import BenchConfig, build_engines, run_bench
from SegAssistLib.evaluation.runner import EvalConfig, evaluate


def _dataset(folder: Path, blank: tuple = ()) -> Path:
    """Cases ``a``, ``b``, ``c``: a bright ball (label 1) on noise; the cases in ``blank`` have an all-zero
    image (their label is fine)."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "ball"}}))
    k, j, i = np.mgrid[:10, :24, :24]
    ball = ((k - 5) ** 2 + (j - 12) ** 2 + (i - 12) ** 2 <= 16).astype(np.uint8)
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        image = 100.0 * ball + rng.normal(0, 5, ball.shape)
        if name in blank:
            image = np.zeros_like(image)
        sitk.WriteImage(sitk.GetImageFromArray(image.astype(np.float32)), str(folder / "imagesTr" / f"{name}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(ball), str(folder / "labelsTr" / f"{name}.nii.gz"))
    return folder


@pytest.mark.parametrize("blank", [("b",), ("a",)])  # in the middle; first, where the warm-up runs
def test_eval_skips_an_image_the_engine_refuses_and_goes_on(tmp_path, blank):
    folder = _dataset(tmp_path / "ds", blank)
    lines = []
    result = evaluate(EvalConfig(folder, max_clicks=1, engine="growcut"), progress=lines.append)
    assert sorted(r["case"] for r in result["records"]) == sorted({"a", "b", "c"} - set(blank))
    assert result["skipped"] == [{"case": blank[0], "target": "1",
                                  "reason": "image rejected: image is constant: there is nothing to segment"}]
    assert any(f"] {blank[0]} target 1: skipped (image rejected: image is constant" in line for line in lines)


def test_eval_command_writes_its_results_despite_a_refused_image(tmp_path, capsys):
    folder = _dataset(tmp_path / "ds", ("b",))
    out = tmp_path / "eval.json"
    assert main(["eval", str(folder), "--engine", "growcut", "--max-clicks", "1", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["summary"]["records"] == 2 and saved["skipped"][0]["case"] == "b"
    assert "2 records, 1 skipped" in capsys.readouterr().out


def test_eval_says_why_when_no_case_can_be_evaluated(tmp_path, capsys):
    folder = _dataset(tmp_path / "ds", ("a", "b", "c"))
    with pytest.raises(ImageError, match="image is constant"):
        evaluate(EvalConfig(folder, max_clicks=1, engine="growcut"), progress=lambda line: None)
    out = tmp_path / "eval.json"
    assert main(["eval", str(folder), "--engine", "growcut", "--max-clicks", "1", "--json", str(out)]) == 2
    assert "image is constant" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("blank", [("b",), ("a",)])
def test_bench_skips_an_image_the_engine_refuses_and_goes_on(tmp_path, blank):
    folder = _dataset(tmp_path / "ds", blank)
    config = BenchConfig(folders=[folder], engines=("growcut",), protocols=("clicks", "box+clicks"), clicks=1,
                         refine_clicks=1, out=tmp_path / "out")  # fmt: skip
    stream = io.StringIO()
    result = run_bench(config, build_engines(config), stream=stream)
    assert sorted({r["case"] for r in result["records"]}) == sorted({"a", "b", "c"} - set(blank))
    assert len(result["records"]) == 2 * 2
    reasons = [(s["case"], s["protocol"], s["reason"]) for s in result["skipped"]]
    refused = "image rejected: image is constant: there is nothing to segment"
    assert reasons == [(blank[0], "clicks", refused), (blank[0], "box+clicks", refused)]
    assert f"{blank[0]}: growcut skipped (image rejected" in stream.getvalue()


def test_bench_command_writes_results_and_report_despite_a_refused_image(tmp_path):
    folder = _dataset(tmp_path / "ds", ("b",))
    out = tmp_path / "out"
    argv = ["bench", str(folder), "--engines", "growcut", "--protocols", "clicks", "--clicks", "1", "--out", str(out)]
    assert main(argv) == 0
    assert len(json.loads((out / "results.json").read_text())["records"]) == 2
    assert "image rejected: image is constant" in (out / "report.md").read_text()
