"""``segassist eval`` and ``segassist bench`` never lose a run's results nor replace someone's files:
bench removed every picture in ``--out``'s plots/ and gallery/ without ``--overwrite``; a ``--json``
that appeared during the run was replaced; a name that passed the up-front check failed only at the
end with every result lost; Ctrl-C lost every case already finished."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from eval_fixtures import ball_dataset

from SegAssistLib.cli import main
from SegAssistLib.errors import SegAssistError
from SegAssistLib.evaluation import bench, runner
from SegAssistLib.evaluation.baselines import GrowCutEngine
from SegAssistLib.evaluation.runner import EvalConfig, check_json_output, evaluate, write_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _dataset(folder: Path, names=("a", "b")) -> Path:
    """Cases ``names``: a bright ball (label 1) on noise."""
    return ball_dataset(folder, names)


def _bench(folder: Path, out: Path, *extra: str) -> int:
    return main(["bench", str(folder), "--engines", "growcut", "--protocols", "clicks", "--clicks", "1",
                 "--out", str(out), *extra])


# --- 1. bench and the pictures in --out ---------------------------------------------------------
def test_bench_keeps_pictures_that_are_not_its_own(tmp_path, capsys):
    """A folder holding only the user's pictures passed the check, and every PNG was then deleted."""
    folder = _dataset(tmp_path / "one")
    out = tmp_path / "paper"
    (out / "plots").mkdir(parents=True)
    (out / "gallery").mkdir()
    (out / "plots" / "figure1.png").write_text("the user's figure")
    (out / "gallery" / "keep.png").write_text("the user's picture")
    assert _bench(folder, out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"segassist bench: error: --out {out} already holds 2 picture(s) (gallery/keep.png, "
                          "plots/figure1.png) where the report writes its own")
    assert not (out / "report.md").exists()
    assert (out / "plots" / "figure1.png").read_text() == "the user's figure"
    # --overwrite replaces an earlier run's pictures only: the user's stay
    assert _bench(folder, out, "--overwrite") == 0, capsys.readouterr().err
    assert (out / "plots" / "figure1.png").read_text() == "the user's figure"
    assert (out / "gallery" / "keep.png").read_text() == "the user's picture"
    assert (out / "plots" / "dice_one.png").read_bytes()[:8] == PNG_MAGIC
    # a later run on another dataset: the earlier report's pictures go, the user's still stay
    other = _dataset(tmp_path / "two")
    assert _bench(other, out, "--overwrite") == 0, capsys.readouterr().err
    assert not (out / "plots" / "dice_one.png").exists() and (out / "plots" / "dice_two.png").is_file()
    assert sorted(p.name for p in (out / "gallery").iterdir()) == ["keep.png", "two_best.png", "two_worst.png"]
    assert (out / "plots" / "figure1.png").read_text() == "the user's figure"


def test_bench_from_json_keeps_pictures_that_are_not_its_own(tmp_path, capsys):
    folder = _dataset(tmp_path / "one")
    run = tmp_path / "run"
    assert _bench(folder, run) == 0, capsys.readouterr().err
    out = tmp_path / "again"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "figure1.png").write_text("the user's figure")
    assert main(["bench", "--from-json", str(run / "results.json"), "--out", str(out)]) == 2
    assert "already holds 1 picture(s) (plots/figure1.png)" in capsys.readouterr().err
    assert (out / "plots" / "figure1.png").read_text() == "the user's figure" and not (out / "report.md").exists()


# --- 2. a --json that appears during the run ----------------------------------------------------
def _evaluate_then(action):
    """The real evaluation, with ``action`` done as it ends (another process writing meanwhile)."""
    real = runner.evaluate

    def evaluate_and_act(config, *args, **kwargs):
        result = real(config, *args, **kwargs)
        action()
        return result

    return evaluate_and_act


def test_eval_does_not_replace_a_json_that_appeared_during_the_run(tmp_path, capsys, monkeypatch):
    folder = _dataset(tmp_path / "ds")
    out = tmp_path / "race.json"
    monkeypatch.setattr(runner, "evaluate", _evaluate_then(lambda: out.write_text('{"precious": 1}')))
    argv = ["eval", str(folder), "--engine", "growcut", "--max-clicks", "1", "--json", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert out.read_text() == '{"precious": 1}'  # the other run's results, untouched
    rescued = sorted(tmp_path.glob("race.unsaved-*.json"))
    assert len(rescued) == 1
    assert err == (f"segassist eval: error: --json {out} not written: it appeared while the run went on (another "
                   "run's results?) and --overwrite was not given; the results were saved to "
                   f"{rescued[0]}\n")
    saved = json.loads(rescued[0].read_text())
    assert saved["config"]["cases"] == ["a", "b"] and saved["summary"]["records"] == 2
    # with --overwrite the file that appeared is replaced, as asked
    assert main(argv + ["--overwrite"]) == 0
    assert json.loads(out.read_text())["summary"]["records"] == 2


def test_write_json_replaces_only_with_overwrite(tmp_path):
    from SegAssistLib.evaluation.output import ResultsSavedElsewhere

    path = tmp_path / "eval.json"
    path.write_text("earlier")
    with pytest.raises(ResultsSavedElsewhere) as caught:
        write_json({"records": []}, path)
    assert path.read_text() == "earlier" and json.loads(caught.value.saved_to.read_text()) == {"records": []}
    assert caught.value.saved_to.parent == tmp_path and caught.value.saved_to.name.startswith("eval.unsaved-")
    write_json({"records": [1]}, path, overwrite=True)
    assert json.loads(path.read_text()) == {"records": [1]}


# --- 3. a --json name that cannot be written at the end ---------------------------------------
def test_a_json_name_too_long_for_the_write_is_refused_before_the_run(tmp_path, capsys):
    """The atomic write's temporary name is 18 characters longer: a 245-character name can be
    created, its temporary file cannot, and the run failed at the end with nothing kept."""
    name = "r" * 240 + ".json"
    (tmp_path / name).touch()  # the name itself is fine
    (tmp_path / name).unlink()
    with pytest.raises(SegAssistError, match=r"a file cannot be created under its name: File name too long"):
        check_json_output(tmp_path / name, overwrite=False)
    assert list(tmp_path.iterdir()) == []  # the probe left nothing behind
    folder = _dataset(tmp_path / "ds")
    assert main(["eval", str(folder), "--engine", "growcut", "--json", str(tmp_path / name)]) == 2
    err = capsys.readouterr()
    assert "File name too long" in err.err and "[1/" not in err.out  # before any case was run


def test_results_that_cannot_be_written_are_saved_in_the_temporary_folder(tmp_path, monkeypatch):
    """Beside the output cannot be written either (the name is too long there too): the temporary folder."""
    from SegAssistLib.evaluation.output import ResultsSavedElsewhere

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    path = tmp_path / ("r" * 250 + ".json")
    with pytest.raises(ResultsSavedElsewhere, match=r"not written: File name too long; the results were saved to ") \
            as caught:
        write_json({"records": [1]}, path)
    assert caught.value.saved_to.parent == tmp_path / "tmp"
    assert caught.value.saved_to.name.startswith("segassist-unsaved-")
    assert json.loads(caught.value.saved_to.read_text()) == {"records": [1]}


# --- an interrupted run ------------------------------------------------------------------------
def _interrupt_after_first_case(progress):
    def interrupting(line):
        progress(line)
        if line.startswith("[1/"):
            raise KeyboardInterrupt

    return interrupting


def test_ctrl_c_keeps_the_cases_finished(tmp_path):
    from SegAssistLib.evaluation.runner import EvaluationInterrupted

    folder = _dataset(tmp_path / "ds", names=("a", "b", "c"))
    lines = []
    with pytest.raises(EvaluationInterrupted) as caught:
        evaluate(EvalConfig(folder, max_clicks=1, engine="growcut", split="all"),
                 progress=_interrupt_after_first_case(lines.append))
    partial = caught.value.partial
    assert isinstance(caught.value, KeyboardInterrupt)
    assert partial["config"]["interrupted"] == "interrupted after 1 of 3 case(s)"
    assert [r["case"] for r in partial["records"]] == ["a"] and partial["summary"]["records"] == 1


def test_eval_writes_the_partial_results_on_ctrl_c(tmp_path, capsys, monkeypatch):
    folder = _dataset(tmp_path / "ds", names=("a", "b", "c"))
    out = tmp_path / "eval.json"
    real = runner.evaluate
    monkeypatch.setattr(runner, "evaluate",
                        lambda config, progress=print: real(config, progress=_interrupt_after_first_case(progress)))
    assert main(["eval", str(folder), "--engine", "growcut", "--max-clicks", "1", "--json", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"interrupted after 1 of 3 case(s): partial results written to {out}\n" in err
    saved = json.loads(out.read_text())
    assert saved["config"]["interrupted"] == "interrupted after 1 of 3 case(s)" and len(saved["records"]) == 1


class InterruptedGrowCut(GrowCutEngine):
    """Grow from seeds, and Ctrl-C as its third session opens (the warm-up's, then one record's)."""

    opened = 0

    def open_session(self, volume, prompts=None):
        InterruptedGrowCut.opened += 1
        if InterruptedGrowCut.opened == 3:
            raise KeyboardInterrupt
        return super().open_session(volume, prompts)


def test_bench_writes_the_partial_results_on_ctrl_c(tmp_path, capsys, monkeypatch):
    folder = _dataset(tmp_path / "ds", names=("a", "b", "c"))
    out = tmp_path / "out"
    InterruptedGrowCut.opened = 0
    monkeypatch.setattr(bench, "build_engines", lambda config: {"growcut": InterruptedGrowCut()})
    assert _bench(folder, out) == 130
    err = capsys.readouterr().err
    assert f"interrupted in case 2 of 3, after 1 session(s): partial results written to {out / 'results.json'}" in err
    saved = json.loads((out / "results.json").read_text())
    assert saved["interrupted"] == "interrupted in case 2 of 3, after 1 session(s)"
    assert [r["case"] for r in saved["records"]] == ["a"] and not (out / "report.md").exists()
    # its report says it holds partial results
    assert main(["bench", "--from-json", str(out / "results.json"), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "**Partial results**: the run was interrupted in case 2 of 3" in text
