"""``segassist bench``: selection, a tiny real run (the model with a tiny checkpoint, the ablation and
Grow from seeds on real hippocampus cases), the report with its PNGs, and the command line."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest
from eval_fixtures import ball_dataset

from SegAssistLib.datasets import REPO_ROOT, list_cases, split_cases
from SegAssistLib.errors import ModelError, SegAssistError
from SegAssistLib.evaluation import bench
from SegAssistLib.evaluation.bench import BenchConfig, build_engines, run_bench, scribble_for, select_jobs
from SegAssistLib.evaluation.progress import ProgressBar
from SegAssistLib.evaluation.report import render_report
from SegAssistLib.evaluation.selection import DEFAULT_SELECTION, default_jobs, spec_for_folder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segassist")
    bench.register(parser.add_subparsers(dest="command", required=True))
    return parser


# --- selection ---------------------------------------------------------------------------------
def test_default_selection_takes_the_first_evaluation_cases(shared_data):
    jobs, missing = default_jobs(shared_data)
    by_dataset = {}
    for job in jobs:
        by_dataset.setdefault(job.dataset, []).append(job)
    expected = split_cases(list_cases(shared_data / "hippocampus"), "evaluation")[:10]
    assert [j.case.name for j in by_dataset["hippocampus"]] == [c.name for c in expected]
    names = {s.name for s in by_dataset["hippocampus"][0].structures}
    assert names == {"anterior hippocampus", "posterior hippocampus"}
    present = [s.name for s in DEFAULT_SELECTION if (shared_data / s.name / "imagesTr").is_dir()]
    assert sorted(by_dataset) == sorted(present) and sorted(missing) == sorted(
        s.name for s in DEFAULT_SELECTION if s.name not in present)
    quick, _ = default_jobs(shared_data, quick=True)
    assert sum(len(j.structures) for j in quick) < sum(len(j.structures) for j in jobs) / 3
    assert "left_atrium" not in {j.dataset for j in quick}


def test_a_folder_outside_the_selection_uses_its_dataset_json(hippocampus_dir, tmp_path):
    spec = spec_for_folder(hippocampus_dir, "1+2", cases=2)
    assert spec.cases == 2 and spec.structures[0].name == "anterior hippocampus + posterior hippocampus"
    with pytest.raises(SegAssistError, match="not found"):
        select_jobs(BenchConfig(folders=[tmp_path / "nowhere"]))
    with pytest.raises(SegAssistError, match="unknown dataset"):
        default_jobs(hippocampus_dir.parent, datasets=["liver"])


def test_scribbles_cycle_through_orientations_and_sources():
    config = BenchConfig(engines=("growcut",))
    specs = [scribble_for("d", f"c{i}", "s", i, config) for i in range(8)]
    assert [s.orientation for s in specs[:4]] == ["axial", "coronal", "sagittal", "oblique"]
    assert {s.source for s in specs[:4]} == {"skeleton"} and {s.source for s in specs[4:]} == {"contour"}
    assert specs[0].jitter_mm == 1.5 and specs[0].seed != specs[1].seed


def test_config_errors_are_explained(tmp_path):
    with pytest.raises(SegAssistError, match="unknown engine"):
        BenchConfig(engines=("sam",))
    with pytest.raises(SegAssistError, match="unknown protocol"):
        BenchConfig(protocols=("lasso",))
    with pytest.raises(ModelError, match="not found"):
        build_engines(BenchConfig(engines=("builtin",), model=str(tmp_path / "missing.pt")))
    from SegAssistLib.engine.builtin import DEFAULT_CHECKPOINT

    if not DEFAULT_CHECKPOINT.is_file():  # before the shipped weights exist: say what to do instead
        with pytest.raises(ModelError, match="--engines growcut,randomwalker"):
            build_engines(BenchConfig(engines=("ablation",)))
    assert BenchConfig(quick=True).clicks == 5 and BenchConfig().refine_clicks == 5
    with pytest.raises(SegAssistError, match="--refine-clicks must be at least 1"):
        BenchConfig(refine_clicks=0)  # once a ValueError from the AUC of no clicks, after the work
    assert BenchConfig().randomwalker_max_voxels is None  # every dataset gets every baseline by default


def test_a_label_on_another_grid_of_the_same_shape_stops_the_run(hippocampus_dir, tmp_path):
    """``segassist eval`` refused it; ``bench`` compared shapes only and scored against a moved label."""
    import shutil

    import SimpleITK as sitk

    folder = tmp_path / "moved"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    shutil.copy(hippocampus_dir / "dataset.json", folder / "dataset.json")
    shutil.copy(hippocampus_dir / "imagesTr" / "hippocampus_001.nii.gz", folder / "imagesTr")
    label = sitk.ReadImage(str(hippocampus_dir / "labelsTr" / "hippocampus_001.nii.gz"))
    label.SetOrigin(tuple(o + 23.0 for o in label.GetOrigin()))
    sitk.WriteImage(label, str(folder / "labelsTr" / "hippocampus_001.nii.gz"))
    config = BenchConfig(folders=[folder], cases=1, labels="1", engines=("growcut",), clicks=1, refine_clicks=1,
                         out=tmp_path / "out")  # fmt: skip
    with pytest.raises(SegAssistError, match="not on the image's grid: its origin"):  # nothing readable
        run_bench(config, build_engines(config), stream=io.StringIO())
    # beside a good case, the moved one is skipped with its reason and the run goes on
    shutil.copy(hippocampus_dir / "imagesTr" / "hippocampus_008.nii.gz", folder / "imagesTr")
    shutil.copy(hippocampus_dir / "labelsTr" / "hippocampus_008.nii.gz", folder / "labelsTr")
    config = BenchConfig(folders=[folder], cases=2, labels="1", engines=("growcut",), clicks=1, refine_clicks=1,
                         protocols=("clicks",), out=tmp_path / "out")  # fmt: skip
    result = run_bench(config, build_engines(config), stream=io.StringIO())
    assert {r["case"] for r in result["records"]} == {"hippocampus_008"}
    assert any(s["case"] == "hippocampus_001" and "case not read" in s["reason"] for s in result["skipped"])


# --- a tiny real run and its report ------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(hippocampus_dir, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    config = BenchConfig(
        folders=[hippocampus_dir], cases=2, labels="1", engines=("builtin", "ablation", "growcut", "randomwalker"),
        clicks=2, refine_clicks=1, model=str(tiny_checkpoint), threads=1, randomwalker_max_voxels=10, out=out,
    )
    engines = build_engines(config)
    stream = io.StringIO()
    result = run_bench(config, engines, stream=stream, command="segassist bench (test)")
    bench.write_results(result, out)
    report = render_report(result, out, engines=engines)
    return result, report, out, stream.getvalue()


def test_every_engine_gets_the_same_interactions(tiny_run):
    result, _, _, log = tiny_run
    records = result["records"]
    assert {r["engine"] for r in records} == {"builtin", "ablation", "growcut"}
    assert len(records) == 2 * 3 * 3  # cases x protocols x engines (the random walker is over its limit)
    for protocol in ("box+clicks", "scribble+clicks", "clicks"):
        for case in {r["case"] for r in records}:
            firsts = [r["prompts"][0] for r in records if r["protocol"] == protocol and r["case"] == case]
            assert len(firsts) == 3 and all(p == firsts[0] for p in firsts)
    for r in records:
        n = 2  # two clicks, or the box or scribble and one click
        assert len(r["dice"]) == len(r["hd95_mm"]) == n
        assert r["dataset"] == "hippocampus" and r["structure"] == "anterior hippocampus"
        assert 0 <= r["dice_auc_norm"] <= 1 and r["peak_rss_mb"] > 0
    scribbles = [r["scribble"]["orientation"] for r in records if r["protocol"] == "scribble+clicks"]
    assert set(scribbles) == {"axial", "coronal"}  # the two structures of the dataset, in turn
    skipped = result["skipped"]
    assert len(skipped) == 2 * 3 and all(s["engine"] == "randomwalker" and "voxels" in s["reason"] for s in skipped)
    assert "sessions" in log and "100%" in log


def test_report_renders_tables_plots_and_gallery(tiny_run):
    result, report, out, _ = tiny_run
    text = report.read_text()
    for heading in ("# SegAssist benchmark", "## How it was measured", "## Cases", "## At a glance",
                    "## Box then clicks (CVPR 2025 challenge protocol)", "## Per dataset", "## Per structure",
                    "## Scribbles by orientation", "## Latency and memory", "## Gallery", "## Skipped sessions"):
        assert heading in text, heading
    assert "hippocampus_001" in text and "| hippocampus | SegAssist model |" in text
    assert "segassist bench (test)" in text and result["machine"]["cpu_count"] >= 1
    pngs = ["plots/dice_hippocampus.png", "plots/latency.png", "gallery/hippocampus_best.png",
            "gallery/hippocampus_worst.png"]
    for name in pngs:
        path = out / name
        assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC, name
        assert f"]({name})" in text
    per_case = (out / "per_case.md").read_text()
    assert per_case.count("| hippocampus |") == 2 * 3
    saved = json.loads((out / "results.json").read_text())
    assert saved["format"] == "segassist-bench" and len(saved["records"]) == len(result["records"])


def test_report_renders_from_json_alone(tiny_run, tmp_path):
    result, _, _, _ = tiny_run
    report = render_report(json.loads(json.dumps(result)), tmp_path)
    assert "gallery left out" in report.read_text()
    assert (tmp_path / "plots" / "dice_hippocampus.png").is_file()


def test_a_mean_over_fewer_datasets_says_so(tiny_run, tmp_path):
    """An engine absent from a dataset (the random walker left out of big images) had its mean of
    datasets printed beside the others' as if it were comparable."""
    result, _, _, _ = tiny_run
    result = json.loads(json.dumps(result))
    copies = [{**r, "dataset": "hippocampus_copy"} for r in result["records"] if r["engine"] != "growcut"]
    result["records"] += copies
    text = render_report(result, tmp_path).read_text()
    means = [line for line in text.splitlines() if line.startswith("| **mean of datasets**")]
    assert means and all(line.count("(1 of 2 datasets)") == 1 for line in means)  # growcut's cell only


# --- command line and progress -----------------------------------------------------------------
def test_list_prints_the_selection(hippocampus_dir, capsys):
    args = _parser().parse_args(["bench", str(hippocampus_dir), "--cases", "3", "--list"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("hippocampus: 3 case(s)") and "posterior hippocampus" in out


def test_cli_defaults():
    args = _parser().parse_args(["bench"])
    config = bench.config_from_args(args)
    assert config.out == REPO_ROOT / "docs" / "benchmarks" and config.engines == bench.BENCH_ENGINES
    assert config.protocols == ("clicks", "box+clicks", "scribble+clicks") and config.clicks == 10


def test_progress_bar_on_a_log_and_on_a_terminal():
    log = io.StringIO()
    bar = ProgressBar(4, stream=log, log_every_s=3600, interactive=False)
    for _ in range(4):
        bar.update(1, label="case")
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("[" + "#" * 24 + "] 4/4 100%")
    tty = io.StringIO()
    bar = ProgressBar(2, stream=tty, interactive=True)
    bar.update(1, label="x")
    bar.message("note")
    bar.close()
    assert "\r[" in tty.getvalue() and "1/2" in tty.getvalue() and "note\n" in tty.getvalue()
    assert np.isfinite(bar.started)


def test_cli_refuses_bad_numbers_outputs_and_results_files_before_any_work(tmp_path, capsys):
    bad_numbers = (["--threads", "-2"], ["--scribble-jitter", "-3"], ["--cases", "0"],
                   ["--randomwalker-max-voxels", "-1"])
    for argv in bad_numbers:
        with pytest.raises(SystemExit):
            _parser().parse_args(["bench", *argv])
        assert "must be" in capsys.readouterr().err
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    args = _parser().parse_args(["bench", "--out", str(a_file), "--engines", "growcut"])
    with pytest.raises(SegAssistError, match="is a file, not a folder"):
        args.func(args)
    for content in ("{not json", "[1, 2]"):
        results = tmp_path / "results.json"
        results.write_text(content)
        args = _parser().parse_args(["bench", "--from-json", str(results), "--out", str(tmp_path / "o")])
        with pytest.raises(SegAssistError, match="cannot read the results file|not a segassist bench results"):
            args.func(args)


def test_an_earlier_runs_results_and_report_are_replaced_only_with_overwrite(tmp_path, capsys):
    """``bench --out D`` replaced an earlier run's results.json and report without a word; the default
    --out, docs/benchmarks, holds the committed report."""
    from SegAssistLib.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("an earlier run")
    missing = tmp_path / "no-such-model.pt"  # never loaded: the refusal comes first
    assert main(["bench", str(tmp_path / "nowhere"), "--model", str(missing), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"segassist bench: error: --out {out} already holds results.json of an earlier run: pass "
                   "--overwrite to replace them, or choose another --out\n")
    assert (out / "results.json").read_text() == "an earlier run"
    # --overwrite lets it go on, to the next problem here (no dataset)
    assert main(["bench", str(tmp_path / "nowhere"), "--model", str(missing), "--out", str(out), "--overwrite"]) == 2
    assert "not found" in capsys.readouterr().err


# --- small synthetic datasets: 4D images, --quick with --cases, damaged results files ----------
_synthetic = ball_dataset


@pytest.mark.filterwarnings("error::UserWarning")  # the plots too: HD95 all 0 there, no log scale to fail
def test_the_report_of_a_dataset_of_4d_images_replays_the_gallery_on_the_case_channel(tmp_path, capsys):
    """The gallery reloaded each image without its channel: results.json written, then "image is 4D"."""
    from SegAssistLib.cli import main

    folder = _synthetic(tmp_path / "four", names=("a",), channels=2)
    out = tmp_path / "out"
    argv = ["bench", str(folder), "--engines", "growcut", "--protocols", "clicks", "--clicks", "1", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "gallery" / "four_best.png").read_bytes()[:8] == PNG_MAGIC
    saved = json.loads((out / "results.json").read_text())
    assert [r["channel"] for r in saved["records"]] == [0]
    for r in saved["records"]:  # a results file written before the channel was recorded: channel 0, the bench's
        del r["channel"]
    (out / "results.json").write_text(json.dumps(saved))
    (out / "gallery" / "four_best.png").unlink()
    assert main(["bench", "--from-json", str(out / "results.json"), "--out", str(out)]) == 2  # its report: kept
    assert "already holds report.md, per_case.md of an earlier run: pass --overwrite" in capsys.readouterr().err
    assert main(["bench", "--from-json", str(out / "results.json"), "--out", str(out), "--overwrite"]) == 0
    assert (out / "gallery" / "four_best.png").is_file() and "gallery left out" not in (out / "report.md").read_text()


def test_the_default_out_is_the_repositorys_docs_benchmarks_wherever_bench_runs(tmp_path, capsys, monkeypatch):
    """Run from another folder, ``bench`` wrote (and checked for an earlier report) ``./docs/benchmarks``
    there, leaving the repository's committed report stale without a word; ``--data`` is found from the
    repository."""
    from SegAssistLib.cli import main

    results = tmp_path / "results.json"
    results.write_text(json.dumps({"format": "segassist-bench", "config": {"engines": ["growcut"], "cases": {}},
                                   "records": [], "skipped": []}))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    committed = REPO_ROOT / "docs" / "benchmarks"
    assert (committed / "report.md").is_file()  # so the default is refused without --overwrite, untouched
    before = (committed / "report.md").read_bytes()
    assert main(["bench", "--from-json", str(results)]) == 2
    err = capsys.readouterr().err
    assert f"--out {committed} already holds report.md" in err, err
    assert not (tmp_path / "docs").exists() and (committed / "report.md").read_bytes() == before
    bench_parser = bench.register(argparse.ArgumentParser(prog="segassist").add_subparsers())
    help_text = " ".join(bench_parser.format_help().split())
    assert "docs/benchmarks of the repository" in help_text


def test_a_report_from_json_says_what_it_is_doing(tmp_path, capsys):
    """``bench --from-json`` replayed the gallery sessions for about 50 s printing nothing but the last
    line; each slow part (engines, plots, each gallery session) is now announced on stderr as it starts."""
    from SegAssistLib.cli import main

    folder = _synthetic(tmp_path / "balls", names=("a", "b", "c"))
    out = tmp_path / "out"
    argv = ["bench", str(folder), "--engines", "growcut", "--protocols", "clicks", "--clicks", "1", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["bench", "--from-json", str(out / "results.json"), "--out", str(tmp_path / "again")]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines() or [""]
    assert lines[0] == (f"bench: 3 session(s) read from {out / 'results.json'}; loading the engines growcut to "
                        "replay the gallery sessions"), lines  # fmt: skip
    assert f"bench: writing the report to {tmp_path / 'again'}" in lines
    assert "bench: summarising and plotting balls" in lines and any("latency" in line for line in lines)
    replayed = [line for line in lines if line.startswith("bench: gallery: replaying balls ")]
    assert len(replayed) == 3 and all(line.endswith("with growcut") for line in replayed), lines
    assert captured.out == f"wrote {tmp_path / 'again' / 'report.md'}\n"


def test_cases_given_win_over_the_quick_selection(tmp_path):
    """``--quick`` took its own count of cases whatever ``--cases`` said."""
    from SegAssistLib.datasets import load_splits

    folder = _synthetic(tmp_path / "mine", names=("a", "b", "c", "d"))

    def quick(cases):
        return select_jobs(BenchConfig(folders=[folder], quick=True, cases=cases, engines=("growcut",)))

    assert len(quick(None)[0]) == 1 and len(quick(3)[0]) == 3
    labelled = BenchConfig(folders=[folder], quick=True, cases=2, labels="1", engines=("growcut",))
    assert len(select_jobs(labelled)[0]) == 2
    # a dataset of the default selection, under its own name: its evaluation cases
    root = tmp_path / "data"
    _synthetic(root / "hippocampus", names=tuple(load_splits()["hippocampus"][:4]))
    _synthetic(root / "left_atrium", names=tuple(load_splits()["left_atrium"][:2]))

    def jobs(cases):
        return default_jobs(root, quick=True, datasets=["hippocampus", "left_atrium"], cases=cases)[0]

    assert len(jobs(None)) == 3 and len(jobs(2)) == 2 and len(jobs(4)) == 4
    assert {j.dataset for j in jobs(2)} == {"hippocampus"}  # --quick still leaves the left atrium out
    assert len(default_jobs(root, datasets=["left_atrium"], cases=1)[0]) == 1


def test_a_damaged_results_file_is_refused_in_one_line(tmp_path, capsys):
    """``{"format": "segassist-bench"}`` without its config ended in a KeyError traceback."""
    from SegAssistLib.cli import main

    record = {"dataset": "d", "case": "c", "structure": "s", "engine": "growcut", "protocol": "clicks",
              "dice": [0.5], "latency_s": [0.1], "interactions": ["point"], "prompts": [], "labels": [1],
              "noc": {"80": 1, "85": 1, "90": 1}, "reached": {"80": False, "85": False, "90": False},
              "final_dice": 0.5, "final_hd95_mm": 1.0, "peak_rss_mb": 10.0}
    config = {"engines": ["growcut"], "model": None, "refine_clicks": 5}
    damaged = [
        ({"format": "segassist-bench"}, "it has no config"),
        ({"format": "segassist-bench", "config": {"model": None}, "records": []}, "lists no engines"),
        ({"format": "segassist-bench", "config": config}, "no list of records"),
        ({"format": "segassist-bench", "config": config, "records": [{**record, "dice": None}]}, "record 0: bad dice"),
        ({"format": "segassist-bench", "config": config, "records": [{k: v for k, v in record.items() if k != "noc"}]},
         "record 0 has no noc"),
        ({"format": "segassist-bench", "config": {**config, "refine_clicks": "5"}, "records": [record]},
         "no refine_clicks"),
    ]
    results = tmp_path / "results.json"
    for content, message in damaged:
        results.write_text(json.dumps(content))
        assert main(["bench", "--from-json", str(results), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (content, err)


def test_the_gallery_draws_the_result_in_the_orange_the_report_names(tmp_path):
    """The caption says orange result, red negative prompts; the result was drawn red (a negative
    click inside a spill vanished in it)."""
    import matplotlib.image

    from SegAssistLib.evaluation.gallery import render_case
    from SegAssistLib.image import Volume

    k, j, i = np.mgrid[:24, :32, :32]
    blob = ((k - 12) ** 2 + (j - 16) ** 2 + (i - 16) ** 2 < 64).astype(np.uint8)
    volume = Volume((blob * 100.0 + 50.0).astype(np.float32), spacing=(1.0, 1.0, 1.0))
    path = render_case(volume, blob, blob, [], tmp_path / "case.png")
    rgb = matplotlib.image.imread(str(path))[..., :3]
    tinted = rgb[(rgb[..., 0] - rgb[..., 2]) > 0.2]  # the result's pixels: red well above blue
    assert len(tinted) > 100
    green_share = (tinted[:, 1] - tinted[:, 2]) / (tinted[:, 0] - tinted[:, 2])
    assert np.median(green_share) > 0.3  # orange #ff8c1a: about 0.5; red: 0


def _record(dataset: str, case: str, final: float, engine: str = "growcut") -> dict:
    """A results.json record with what the report reads (one click)."""
    return {"dataset": dataset, "case": case, "structure": "s", "target": "1", "engine": engine,
            "protocol": "clicks", "dice": [final], "hd95_mm": [1.0], "latency_s": [0.1], "interactions": ["point"],
            "prompts": [], "labels": [1], "noc": {"80": 1, "85": 1, "90": 1},
            "reached": {"80": True, "85": True, "90": True}, "final_dice": final, "final_hd95_mm": 1.0,
            "dice_auc": 0.0, "dice_auc_norm": final, "peak_rss_mb": 10.0}


def test_the_bootstrap_resamples_patients_and_the_report_counts_them(tmp_path):
    """The interval resampled cases: Sunnybrook's two phases (or ACDC's two frames) of one patient
    counted as two independent draws, an interval [0.70, 0.90] from one patient."""
    from SegAssistLib.evaluation.aggregate import summarise

    one_patient = [_record("sunnybrook", "SCD0000101_phase08", 0.7), _record("sunnybrook", "SCD0000101_phase19", 0.9)]
    s = summarise(one_patient)
    assert s.final_dice.format() == "0.800"  # one patient: no interval, not [0.700, 0.900]
    assert (s.n, s.patients) == (2, 1)
    two = one_patient + [_record("acdc", "patient001_frame01", 0.5), _record("acdc", "patient001_frame12", 0.6),
                         _record("acdc", "patient002_frame01", 0.9)]
    assert summarise(two).patients == 3
    result = {"format": "segassist-bench", "records": two, "skipped": [],
              "config": {"engines": ["growcut"], "clicks": 1, "refine_clicks": 1,
                         "cases": {"sunnybrook": ["SCD0000101_phase08", "SCD0000101_phase19"],
                                   "acdc": ["patient001_frame01", "patient001_frame12", "patient002_frame01"]}}}
    text = render_report(result, tmp_path).read_text()
    assert "| sessions (patients) |" in text and "(cases)" not in text
    assert "| clicks | Grow from seeds | 2 (1) |" in text and "| clicks | Grow from seeds | 3 (2) |" in text
    assert "resamples of patients" in text


def test_the_gallery_draws_a_label_stored_with_an_axis_reversed_where_it_was_scored(tmp_path, monkeypatch):
    """A label written with j reversed (direction diag(1, -1, 1), origin at the other end: every voxel at
    its place) is scored reversed back onto the image's grid; the gallery drew it as stored, mirrored."""
    import SimpleITK as sitk

    from SegAssistLib.evaluation import report as report_module

    folder = tmp_path / "flipped"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "dataset.json").write_text(json.dumps({"labels": {"1": "thing"}}))
    truth = np.zeros((12, 30, 30), np.uint8)
    truth[3:9, 2:10, 8:20] = 1  # off-centre in j: mirrored, it would not overlap
    image = sitk.GetImageFromArray((truth + np.random.default_rng(0).normal(0, 0.1, truth.shape)).astype(np.float32))
    image.SetSpacing((1.0, 1.5, 2.0))
    image.SetOrigin((10.0, 20.0, 30.0))
    sitk.WriteImage(image, str(folder / "imagesTr" / "c.nii.gz"))
    label = sitk.GetImageFromArray(truth[:, ::-1, :].copy())
    label.SetSpacing((1.0, 1.5, 2.0))
    label.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    label.SetOrigin((10.0, 20.0 + 29 * 1.5, 30.0))
    sitk.WriteImage(label, str(folder / "labelsTr" / "c.nii.gz"))
    config = BenchConfig(folders=[folder], engines=("growcut",), protocols=("clicks",), clicks=2, out=tmp_path / "o")
    engines = build_engines(config)
    result = run_bench(config, engines, stream=io.StringIO())
    assert result["records"][0]["final_dice"] > 0.9  # scored against the label reversed back
    drawn = []
    real = report_module.render_case

    def render_case(volume, mask, reference, *args, **kwargs):
        drawn.append(reference.copy())
        return real(volume, mask, reference, *args, **kwargs)

    monkeypatch.setattr(report_module, "render_case", render_case)
    text = render_report(result, tmp_path / "o", engines=engines).read_text()
    assert drawn and all(np.array_equal(reference, truth) for reference in drawn)
    assert "flipped_best.png" in text


def test_eval_and_bench_warm_up_on_a_later_case_when_the_first_lacks_every_target(tmp_path):
    """The first readable case held none of the targets: the warm-up clicked nothing and the loop
    stopped there, so the first record paid the engine's lazy start."""
    import SimpleITK as sitk

    from SegAssistLib.evaluation.baselines import GrowCutEngine
    from SegAssistLib.evaluation.runner import EvalConfig, evaluate

    folder = tmp_path / "partly"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "dataset.json").write_text(json.dumps({"labels": {"1": "one", "2": "two"}}))
    rng = np.random.default_rng(0)
    for name, has_two in (("a0", False), ("a1", True), ("a2", True)):
        labels = np.zeros((10, 24, 24), np.uint8)
        labels[3:7, 3:10, 6:18] = 1
        if has_two:
            labels[3:7, 14:21, 6:18] = 2
        image = (labels > 0) + rng.normal(0, 0.1, labels.shape)
        sitk.WriteImage(sitk.GetImageFromArray(image.astype(np.float32)), str(folder / "imagesTr" / f"{name}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(labels), str(folder / "labelsTr" / f"{name}.nii.gz"))

    class Counted(GrowCutEngine):
        opened = 0

        def open_session(self, volume, prompts=None):
            Counted.opened += 1
            return super().open_session(volume, prompts)

    evaluated = evaluate(EvalConfig(folder, targets=[(2,)], max_clicks=1), engine=Counted(), progress=lambda line: None)
    opened = [Counted.opened]
    config = BenchConfig(folders=[folder], labels="2", engines=("growcut",), protocols=("clicks",), clicks=1,
                         out=tmp_path / "o")  # fmt: skip
    benched = run_bench(config, {"growcut": Counted()}, stream=io.StringIO())
    opened.append(Counted.opened - opened[0])
    assert len(evaluated["records"]) == len(benched["records"]) == 2
    assert opened == [2 + 1, 2 + 1]  # eval's, bench's: the records' sessions and one warm-up


@pytest.mark.parametrize("labels, structures", [
    ({"background": 0, "both": [1, 2]}, {"both": (1, 2)}),  # regions only: bench refused the folder
    ({"background": 0, "left": 1, "right": 2, "both": [1, 2]}, {"left": (1,), "right": (2,), "both": (1, 2)}),
])
def test_bench_takes_the_nnunet_regions_eval_takes_by_default(tmp_path, labels, structures):
    """Bench built its default structures from the labels alone: a region was dropped, and a
    dataset.json naming only regions stopped the run ("names only nnU-Net regions")."""
    import SimpleITK as sitk

    from SegAssistLib.evaluation.runner import default_targets

    folder = tmp_path / "regions"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    (folder / "dataset.json").write_text(json.dumps({"labels": labels}))
    truth = np.zeros((10, 24, 24), np.uint8)
    truth[3:7, 3:11, 6:18] = 1
    truth[3:7, 11:20, 6:18] = 2
    image = (truth > 0) + np.random.default_rng(0).normal(0, 0.1, truth.shape)
    sitk.WriteImage(sitk.GetImageFromArray(image.astype(np.float32)), str(folder / "imagesTr" / "c.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(truth), str(folder / "labelsTr" / "c.nii.gz"))
    assert [s.labels for s in spec_for_folder(folder, None, None).structures] == default_targets(folder)
    config = BenchConfig(folders=[folder], engines=("growcut",), protocols=("clicks",), clicks=1, out=tmp_path / "o")
    result = run_bench(config, build_engines(config), stream=io.StringIO())
    assert {r["structure"]: tuple(r["labels"]) for r in result["records"]} == structures
    assert spec_for_folder(folder, "1+2", None).structures[0].name == "both"  # --labels names a region by its name
