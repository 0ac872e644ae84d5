"""Smoke tests of the issue-5 benchmark scripts: their core functions run for real on tiny settings
(the tiny random network, three small hippocampus cases, a training step or two) and produce
results of the documented structure. The figures themselves are meaningless at this size; the
committed results come from the full runs."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

pytest.importorskip("torch")

from SegAssistLib.engine.edges import EdgeSnap  # noqa: E402
from SegAssistLib.errors import SegAssistError  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]


def _script(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (not a package) as a module."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_campaign_cases_of_an_unknown_dataset_are_evaluation_and_keep_their_channel(hippocampus_dir: Path,
                                                                                   tmp_path: Path) -> None:
    """A dataset the split file does not know is all evaluation (the library's rule; the campaign
    once starred every case as trained on), a 4D image gives the chosen channel, and a label off
    the image's grid is skipped with a message."""
    import SimpleITK as sitk

    campaign = _script("campaign")
    folder = tmp_path / "my_scans"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    label = hippocampus_dir / "labelsTr" / "hippocampus_001.nii.gz"
    for name, source in (("scan_a", "hippocampus_001"), ("scan_b", "hippocampus_001"), ("scan_c", "hippocampus_008")):
        image = sitk.ReadImage(str(hippocampus_dir / "imagesTr" / f"{source}.nii.gz"), sitk.sitkFloat32)
        inverted = sitk.GetImageFromArray(sitk.GetArrayFromImage(image).max() - sitk.GetArrayFromImage(image))
        inverted.CopyInformation(image)
        sitk.WriteImage(sitk.JoinSeries([image, inverted]), str(folder / "imagesTr" / f"{name}.nii.gz"))
        shutil.copy(label, folder / "labelsTr" / f"{name}.nii.gz")  # scan_c: another grid than its label
        if name == "scan_a":
            expected = sitk.GetArrayFromImage(inverted)
    spec = campaign.StructureSpec("mine", "my_scans", 1, channel=1)
    cases = campaign.campaign_cases(tmp_path, spec, None)
    assert [c.name for c in cases] == ["scan_a", "scan_b"] and not any(c.seen_in_base_training for c in cases)
    assert np.allclose(cases[0].volume.array, expected)


def test_campaign_runs_every_mode_and_writes_results(hippocampus_dir: Path, tiny_checkpoint: Path, tmp_path: Path,
                                                     one_thread) -> None:
    campaign = _script("campaign")
    spec = campaign.STRUCTURES["hippocampus"]
    cases = campaign.campaign_cases(hippocampus_dir.parent, spec, 3)
    assert [c.name for c in cases] == ["hippocampus_001", "hippocampus_008", "hippocampus_019"]  # evaluation first
    assert not any(c.seen_in_base_training for c in cases)
    # accept_proposal=0: every non-empty proposal becomes the initial mask (the random network's are poor)
    cfg = campaign.CampaignConfig(modes=("none", "lora", "full"), k=2, max_clicks=2, train_seconds=30.0,
                                  train_steps=1, perturbations=1, accept_proposal=0.0)
    result = campaign.run_campaign(spec, cases, tiny_checkpoint, cfg, work=tmp_path / "work", log=lambda _: None)

    assert list(result["modes"]) == ["none", "lora", "full"]
    for mode, res in result["modes"].items():
        assert [r["case"] for r in res["cases"]] == [c.name for c in cases]
        assert all(0 <= r["clicks"] <= 2 and 0.0 <= r["final_dice"] <= 1.0 for r in res["cases"])
        assert all(r["proposal_dice"] is not None for r in res["cases"])  # proposals on in every mode
        if mode == "none":
            assert res["retrains"] == [] and res["trainable_share"] == 0.0
        else:  # one retraining after case 2 of 3, one step, within its budget
            (retrain,) = res["retrains"]
            assert retrain["after_case"] == 2 and retrain["state"] == "done" and retrain["steps"] == 1
            assert retrain["wall_s"] < 30.0 + 15.0
    assert any(r["proposal_used"] for res in result["modes"].values() for r in res["cases"])
    lora = result["modes"]["lora"]
    assert 0.0 < lora["trainable_share"] < 1.0 and result["modes"]["full"]["trainable_share"] == 1.0
    assert lora["trainable_share"] == pytest.approx(lora["retrains"][0]["trainable_share"])  # the trainer's own figure
    summary = result["summary"]
    assert summary["lora"]["clicks_per_case"] == [r["clicks"] for r in result["modes"]["lora"]["cases"]]
    assert "reduction_vs_none_second_half" in summary["lora"] and "target_met" in summary["full"]
    assert summary["none"]["mean_clicks_first_half"] == result["modes"]["none"]["cases"][0]["clicks"]
    second_half = result["modes"]["lora"]["cases"][1:]  # of 3 cases: cases 2 and 3
    second = summary["lora"]["second_half"]
    assert 0.0 <= second["final_dice"] <= 1.0 and 0 <= second["clicks_to_085"] <= 2
    expected = sum(r["final_dice"] for r in second_half) / len(second_half)
    assert second["final_dice"] == pytest.approx(expected, abs=1e-3)
    # the datastore saw every submission with its provenance
    with campaign.Datastore(tmp_path / "work" / "store_lora", create=False) as store:
        labels = [lv for _, lv in store.training_cases()]
        assert len(labels) == 3 and all(lv.user == campaign.ANNOTATOR for lv in labels)

    json_path, md_path = campaign.write_results(result, tmp_path / "out", spec, "cpu")
    assert json_path.name == "campaign_hippocampus.json" and md_path.name == "campaign_hippocampus.md"
    assert json.loads(json_path.read_text())["summary"].keys() == summary.keys()
    assert "| lora |" in md_path.read_text()
    rendered = md_path.read_text()
    md_path.unlink()
    assert campaign.main(["--from-json", str(json_path)]) == 0 and md_path.read_text() == rendered

    # a later run of one mode keeps the others of a comparable earlier result
    salt_only = campaign.CampaignConfig(**{**cfg.__dict__, "modes": ("salt",)})
    merged = campaign.run_campaign(spec, cases, tiny_checkpoint, salt_only, work=tmp_path / "work2",
                                   previous=json.loads(json_path.read_text()), log=lambda _: None)
    assert list(merged["modes"]) == ["none", "lora", "salt", "full"]
    # ... but not one made with other weights, even from the same path (new weights shipped under the old name)
    assert result["model_version"] == "0" and len(result["model_identity"]) == 16
    assert f"(version 0, weights {result['model_identity']})" in md_path.read_text()
    older = {**json.loads(json_path.read_text()), "model_identity": "0123456789abcdef"}
    alone = campaign.run_campaign(spec, cases, tiny_checkpoint, salt_only, work=tmp_path / "work3",
                                  previous=older, log=lambda _: None)  # fmt: skip
    assert list(alone["modes"]) == ["salt"]
    # ... nor one that does not record the engine's settings (results older than the record, made
    # before or after the edge snap)
    assert result["engine_options"] == {"refine_depth": 1, "correction_zoom_share": 0.025,
                                        "edge_snap": asdict(EdgeSnap())}
    assert "engine: refine depth 1, correction zoom share 0.025, edge snap band 2, beta 500" in md_path.read_text()
    unrecorded = {k: v for k, v in json.loads(json_path.read_text()).items() if k != "engine_options"}
    assert "engine: settings not recorded" in campaign.render_markdown(unrecorded)
    alone = campaign.run_campaign(spec, cases, tiny_checkpoint, salt_only, work=tmp_path / "work4",
                                  previous=unrecorded, log=lambda _: None)
    assert list(alone["modes"]) == ["salt"]


def test_campaign_learning_rates_reach_the_trainer_and_keep_old_results_comparable() -> None:
    campaign = _script("campaign")
    assert campaign.parse_learning_rates(["salt=1e-2", "lora=0.004"]) == {"salt": 0.01, "lora": 0.004}
    for bad in (["salt"], ["salt=fast"]):
        with pytest.raises(SegAssistError, match="MODE=LR"):
            campaign.parse_learning_rates(bad)
    tuned = campaign.CampaignConfig(learning_rates={"salt": 0.01}).check()
    assert tuned.train_config("salt").lr == 0.01
    assert tuned.train_config("lora").lr == campaign.CampaignConfig().train_config("lora").lr == 1e-2
    plain = campaign.CampaignConfig().comparable()
    assert "learning_rates" not in plain  # as in results files written before the option
    assert tuned.comparable() != plain and tuned.comparable()["learning_rates"] == {"salt": 0.01}
    for bad_rates in ({"none": 0.01}, {"salt": 0.0}, {"dora": 0.01}):
        with pytest.raises(ValueError, match="learning rates"):
            campaign.CampaignConfig(learning_rates=bad_rates).check()


def test_first_click_spill_counts_only_the_other_labels(hippocampus_dir: Path, tiny_checkpoint: Path,
                                                        tmp_path: Path, one_thread) -> None:
    spill = _script("first_click_spill")
    labels = np.zeros((4, 4, 4), np.int16)
    labels[:2], labels[2:] = 1, 2
    prediction = np.zeros((4, 4, 4), bool)
    prediction[1:3, :2] = True  # 16 voxels: 8 in label 1, 8 in label 2
    assert spill.spill_share(prediction, labels, 1) == 0.5 and spill.spill_share(prediction, labels, 2) == 0.5
    assert spill.spill_share(prediction, np.where(labels == 2, 0, labels), 1) == 0.0  # background is not spill
    assert spill.spill_share(np.zeros_like(prediction), labels, 1) is None

    out = tmp_path / "spill.json"
    assert spill.main(["--dataset", str(hippocampus_dir), "--labels", "1,2", "--cases", "1",
                       "--model", str(tiny_checkpoint), "--out", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["cases"] == ["hippocampus_001"] and run["targets_measured"] + run["empty_answers"] == 2
    assert run["model_version"] == "0" and len(run["model_identity"]) == 16  # the weights, not only their path
    assert result["command"].startswith("python benchmarks/first_click_spill.py --dataset ")
    assert result["argv"][:2] == ["--dataset", str(hippocampus_dir)] and "platform" in result["machine"]
    assert all(v is None or 0.0 <= v <= 1.0 for v in run["spill_by_target"].values())


def test_campaign_secondary_measures_by_hand() -> None:
    campaign = _script("campaign")
    curve = [0.5, 0.7, 0.86, 0.88, 0.91]  # the kept proposal, then four clicks
    assert campaign._clicks_to(curve, 0.85, 20) == 2 and campaign._clicks_to(curve, 0.95, 20) == 20
    assert campaign._clicks_to([0.9], 0.85, 20) == 0  # the proposal was already good enough
    assert campaign._dice_after(curve, 5) == 0.91 and campaign._dice_after(curve, 2) == 0.86
    cases = [{"dice": [0.0, 0.6], "final_dice": 0.6, "proposal_dice": None},
             {"dice": [0.5, 0.9], "final_dice": 0.9, "proposal_dice": 0.5},
             {"dice": [0.7, 0.8, 0.86], "final_dice": 0.86, "proposal_dice": 0.7}]
    second = campaign.secondary(cases, max_clicks=20)  # cases 2 and 3
    assert second == {"proposal_dice": 0.6, "dice_after_5_clicks": 0.88, "final_dice": 0.88, "clicks_to_085": 1.5}


def test_latency_under_training_measures_both_conditions(hippocampus_dir: Path, tiny_checkpoint: Path,
                                                        tmp_path: Path, one_thread) -> None:
    bench = _script("latency_under_training")
    cases = [bench.load_case(hippocampus_dir.parent, "hippocampus", name, 1)
             for name in ("hippocampus_001", "hippocampus_008")]
    train_cases = bench.training_cases(hippocampus_dir.parent, "hippocampus", 1, 3)
    assert not {c.name for c in train_cases} & {"hippocampus_001", "hippocampus_008"}
    cfg = bench.AdapterTrainConfig(kind="lora", time_budget_s=120.0, max_steps=1_000_000, val_clicks=1)
    result = bench.run_benchmark(cases, train_cases, tiny_checkpoint, [1], clicks=2, n_rounds=1,
                                 train_config=cfg, work=tmp_path, log=lambda _: None)

    (res,) = result["results"]
    assert res["engine_threads"] == 1
    assert res["idle"]["interactions"] == 2 * res["idle_before"]["interactions"] > 0
    assert res["under_training"]["interactions"] + res["excluded_interactions"] == res["idle_before"]["interactions"]
    assert res["job"]["final_state"] == "cancelled" and res["job"]["threads"] == 1 and res["job"]["nice"] == 10
    job_sched = res["scheduling"]["job"]
    assert job_sched["pid"] != res["scheduling"]["benchmark"]["pid"]
    assert job_sched["nice"] in (None, min(19, res["scheduling"]["benchmark"]["nice"] + 10))  # the job yields
    if res["under_training"]["interactions"]:
        assert res["degradation_ratio_median"] > 0 and res["target_ratio"] == 1.30
        assert isinstance(res["target_met"], bool)
    assert {r["phase"] for r in res["interactions"]} == {"idle_before", "under_training", "idle_after"}
    json.dumps(result)  # the results file is plain JSON


def test_acceptance_reruns_only_the_model_with_baselines_from_an_earlier_run(
    hippocampus_dir: Path, tiny_checkpoint: Path, tmp_path: Path, one_thread
) -> None:
    acceptance = _script("engine_acceptance")
    common = ["--data", str(hippocampus_dir.parent), "--datasets", "hippocampus", "--cases", "1",
              "--model", str(tiny_checkpoint)]  # fmt: skip
    first, second = tmp_path / "first", tmp_path / "second"
    assert acceptance.main(common + ["--engines", "builtin,growcut", "--out", str(first)]) == 0
    earlier = json.loads((first / "acceptance.json").read_text())
    assert earlier["rows"][0]["builtin"]["n"] == earlier["rows"][0]["growcut"]["n"] == 2  # labels 1 and 2
    assert earlier["argv"] == common + ["--engines", "builtin,growcut", "--out", str(first)]
    assert earlier["command"].startswith("python benchmarks/engine_acceptance.py --data ")
    assert earlier["model"] == {"path": str(tiny_checkpoint), "version": "0",
                                "identity": earlier["model"]["identity"]} and len(earlier["model"]["identity"]) == 16
    assert "platform" in earlier["machine"] and "cpu_count" in earlier["machine"]  # machine_info, commit included

    assert acceptance.main(common + ["--engines", "builtin,growcut", "--out", str(second),
                                     "--baselines-from", str(first / "acceptance.json")]) == 0  # fmt: skip
    again = json.loads((second / "acceptance.json").read_text())
    assert again["runs"]["growcut/hippocampus"] == earlier["runs"]["growcut/hippocampus"]  # taken, not rerun
    assert [r["dice"] for r in again["runs"]["builtin/hippocampus"]["records"]] == [
        r["dice"] for r in earlier["runs"]["builtin/hippocampus"]["records"]
    ]  # the model ran again, deterministically
    assert "baseline runs taken from an earlier run" in (second / "acceptance.md").read_text()
    assert "--engines builtin,growcut --out" in (second / "acceptance.md").read_text()  # the command as given
    row = (second / "acceptance.md").read_text().splitlines()[-1]
    assert row.endswith("| yes (of those run) |") or row.endswith("| no |")  # a verdict on one baseline of four
    alone = tmp_path / "alone"
    assert acceptance.main(common + ["--engines", "builtin", "--out", str(alone)]) == 0
    assert (alone / "acceptance.md").read_text().splitlines()[-1].endswith("| - |")  # no baseline: no verdict

    # a baseline run on other cases or settings, or one the file lacks, runs again instead of being reused
    stale = json.loads((first / "acceptance.json").read_text())
    stale["runs"]["growcut/hippocampus"]["config"]["max_clicks"] = 10
    (tmp_path / "stale.json").write_text(json.dumps(stale))
    assert acceptance.main(common + ["--engines", "builtin,growcut,growcut-inside", "--out", str(second),
                                     "--baselines-from", str(tmp_path / "stale.json")]) == 0  # fmt: skip
    rerun = json.loads((second / "acceptance.json").read_text())["runs"]
    assert rerun["growcut/hippocampus"]["config"]["max_clicks"] == 5
    assert rerun["growcut-inside/hippocampus"]["config"]["engine"]["name"] == "growcut-inside"
    assert "earlier run, `--baselines-from " + str(tmp_path / "stale.json") + "`: none)" in (
        second / "acceptance.md").read_text()
    assert acceptance.main([a if a != "1" else "2" for a in common] + [
        "--engines", "builtin,growcut", "--out", str(second), "--baselines-from", str(first / "acceptance.json")]) == 0
    assert len({r["case"] for r in json.loads((second / "acceptance.json").read_text())[
        "runs"]["growcut/hippocampus"]["records"]}) == 2  # the earlier run had one case: run again


def test_the_whole_body_answer_benchmark_pastes_the_whole_body(tmp_path: Path, one_thread) -> None:
    bench = _script("whole_body_answer")
    out = tmp_path / "whole_body.json"
    assert bench.main(["--shape", "20,48,56", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["argv"] == ["--shape", "20,48,56", "--out", str(out)] and "platform" in record["machine"]
    result = record["result"]
    body = int((bench._body_ct((20, 48, 56)) > 0).sum())
    assert result["image_shape_kji"] == [20, 48, 56] and result["answer_voxels"] >= body  # the body, at least
    assert result["peak_rss_gib_after_click"] >= result["peak_rss_gib_with_image"] > 0


def test_acceptance_compares_the_model_with_a_baseline_on_the_records_both_ran() -> None:
    """The slow random walker runs 2 of the 6 left-atrium cases: the verdict compares the model on
    those 2, not its mean over all 6; per-case means weigh each case once, whatever its targets."""
    acceptance = _script("engine_acceptance")
    model = {("a", "1"): 0.9, ("b", "1"): 0.9, ("c", "1"): 0.5, ("c", "2"): 0.5}
    baseline = {("a", "1"): 0.86, ("b", "1"): 0.86}
    paired = acceptance._paired(model, baseline)
    assert paired["n"] == 2 and paired["model"] == 0.9 and paired["baseline"] == 0.86
    assert not paired["ahead"]  # 0.04 ahead of 0.86, short of a third of the way to 1 (0.047); over all 4: 0.7
    assert acceptance._paired(model, {("c", "1"): 0.1, ("c", "2"): 0.1})["ahead"]
    assert acceptance._mean(model.values()) == 0.7 and acceptance._case_mean(model) == round((0.9 + 0.9 + 0.5) / 3, 4)
    assert acceptance._paired(model, {})["ahead"] is False


def test_training_throughput_times_real_steps_and_accounts_for_them(tmp_path: Path, one_thread) -> None:
    throughput = _script("training_throughput")
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"data_root": "", "network": {"channels": [4, 8], "strides": [2], "patch_size": 24},
                                  "batch_size": 2, "loader_workers": 0, "max_correction_rounds": 2}))
    out = tmp_path / "throughput.json"
    assert throughput.main(["--config", str(config), "--steps", "4", "--warmup", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["argv"] == ["--config", str(config), "--steps", "4", "--warmup", "1", "--out", str(out)]
    assert report["command"].startswith("python benchmarks/training_throughput.py --config ")
    result = report["result"]
    assert result["steps"] == 4 and result["batch_size"] == 2 and 0 <= result["mean_correction_rounds"] <= 2
    assert result["samples_per_s"] == pytest.approx(2 * 1000 / result["step_ms_mean"], rel=0.02)
    assert result["step_ms_median"] > 0 and result["corrections_ms"] < result["step_ms_mean"]
    assert result["loader_wait_ms"] > 0 and result["network_and_rest_ms"] > 0  # the loader runs in-process here
    assert (result["corrections_ms"] > 0) == (result["mean_correction_rounds"] > 0)
    with pytest.raises(SystemExit):
        throughput.main(["--steps", "0"])


def test_campaign_table_says_more_or_fewer_clicks() -> None:
    campaign = _script("campaign")
    assert campaign._change_in_words(0.31) == "31 % fewer"
    assert campaign._change_in_words(-0.042) == "4 % more"
    assert campaign._change_in_words(0.001) == "same" and campaign._change_in_words(None) == "-"


def test_a_local_correction_keeps_only_the_change_that_reaches_the_click(monkeypatch) -> None:
    from types import SimpleNamespace

    from SegAssistLib.engine import builtin
    from SegAssistLib.prompts import PointPrompt

    old = np.zeros((20, 20, 40), np.uint8)
    old[5:15, 5:15, 5:15] = 1
    new = old.copy()
    new[5:15, 5:15, 15:18] = 1  # grows next to the click
    new[8:12, 8:12, 30:34] = 1  # a far blob, not connected to the click's neighbourhood
    box = tuple(slice(0, n) for n in old.shape)
    monkeypatch.setattr(builtin.BuiltinSession, "_predict", lambda self, prompt: (box, new.copy(), {}))
    predict = _script("correction_locality").keep_local_change(radius_mm=10.0)
    session = SimpleNamespace(mask=old, spacing_kji=(1.0, 1.0, 1.0))
    _, kept, _ = predict(session, PointPrompt(position=(16, 10, 10)))  # (i, j, k): beside the growth
    assert kept[5:15, 5:15, 15:18].all() and not kept[8:12, 8:12, 30:34].any()
    assert np.array_equal(kept[old > 0], old[old > 0])


def test_package_model_refuses_weights_and_state_of_different_steps(tiny_checkpoint: Path, tmp_path: Path,
                                                                     monkeypatch) -> None:
    """A run stopped between writing state.pt and model.pt would have shipped weights beside the
    resumable state of another step."""
    import torch

    from SegAssistLib.engine.network import load_checkpoint, save_checkpoint

    spec = importlib.util.spec_from_file_location("package_model", REPO_ROOT / "scripts" / "package_model.py")
    package = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(package)
    shipped = tmp_path / "Models" / "segassist_unet.pt"
    monkeypatch.setattr(package, "DEFAULT_CHECKPOINT", shipped)
    run = tmp_path / "run"
    run.mkdir()
    model = load_checkpoint(tiny_checkpoint)
    save_checkpoint(run / "model.pt", model.network, model.config, {"name": "tiny-test", "steps": 12})
    state = {"model": model.network.state_dict(), "optimizer": {}, "step": 11, "elapsed": 3.0}
    torch.save(state, run / "state.pt")
    with pytest.raises(SystemExit, match="model.pt is from step 12, state.pt from step 11"):
        package.main([str(run), "--version", "9.9.9"])
    assert not shipped.exists()
    torch.save({**state, "step": 12}, run / "state.pt")
    package.main([str(run), "--version", "9.9.9"])
    assert load_checkpoint(shipped).meta["version"] == "9.9.9"
    assert torch.load(shipped.with_name("training_state.pt"), weights_only=True)["step"] == 12


# --- defaults, records and scripts/make_splits.py: no model runs -------------------------------------------------
# every script with its result's default location (--out) in the repository, as the committed results lie
DEFAULT_OUT = {
    "architecture_cost": "benchmarks/results",
    "campaign": "benchmarks/results",
    "correction_locality": "benchmarks/results/correction_locality",
    "edge_snap_sweep": "benchmarks/results/edge_snap_sweep",
    "engine_acceptance": "benchmarks/results",
    "engine_latency": "benchmarks/results",
    "first_click_spill": "benchmarks/results/first_click_spill.json",
    "lasso_forms": "benchmarks/results/lasso_forms.json",
    "latency_under_training": "benchmarks/results",
    "server_benchmark": "benchmarks/results",
    "training_throughput": "benchmarks/results/training_throughput.json",
    "whole_body_answer": "benchmarks/results/whole_body_answer.json",
}


def test_every_benchmark_script_is_in_the_table_of_defaults() -> None:
    assert set(DEFAULT_OUT) == {p.stem for p in (REPO_ROOT / "benchmarks").glob("*.py")}


@pytest.mark.parametrize("name", sorted(DEFAULT_OUT))
def test_benchmark_defaults_take_the_shared_data_and_write_where_the_committed_results_lie(
    name: str, tmp_path: Path, monkeypatch
) -> None:
    """``--data`` follows ``$SEGASSIST_SHARED_DATA`` (else ``../shared/data`` beside the repository,
    wherever the script runs from), and ``--out`` is the committed result's place in the repository."""
    from SegAssistLib.datasets import default_data_root

    script = _script(name)
    monkeypatch.chdir(tmp_path)  # a relative default would land here
    monkeypatch.setenv("SEGASSIST_SHARED_DATA", str(tmp_path / "data"))
    args = script.build_parser().parse_args([])
    data = getattr(args, "data", None) or getattr(args, "dataset", None)
    if data is not None:
        assert data in (tmp_path / "data", tmp_path / "data" / "acdc")  # first_click_spill: its dataset
        monkeypatch.delenv("SEGASSIST_SHARED_DATA")
        again = script.build_parser().parse_args([])
        assert (getattr(again, "data", None) or again.dataset) in (REPO_ROOT.parent / "shared" / "data",
                                                                   REPO_ROOT.parent / "shared" / "data" / "acdc")
        assert default_data_root() == REPO_ROOT.parent / "shared" / "data"
    assert args.out == REPO_ROOT / DEFAULT_OUT[name]
    assert args.out.exists()  # the committed result (a file) or its folder


def _make_splits() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_splits", REPO_ROOT / "scripts" / "make_splits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_splits_help_exits_0_and_names_its_modes(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        _make_splits().main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--write" in out and "--check" in out


def test_make_splits_writes_only_with_write_and_check_fails_on_a_difference(tmp_path: Path, monkeypatch,
                                                                             capsys) -> None:
    make_splits = _make_splits()
    data = tmp_path / "data"
    for folder in ("imagesTr", "labelsTr"):
        (data / "scans" / folder).mkdir(parents=True)
        for n in range(7):  # seven patients: the first and the sixth are evaluation
            (data / "scans" / folder / f"case{n:03d}.nii.gz").touch()
    splits_file = tmp_path / "splits.json"
    splits_file.write_text('{"rule": "old", "evaluation": {}}')
    monkeypatch.setattr(make_splits, "SPLITS_FILE", splits_file)

    assert make_splits.main([str(data)]) == 0  # a summary, nothing written
    assert splits_file.read_text() == '{"rule": "old", "evaluation": {}}'
    assert "scans: 2 evaluation cases" in capsys.readouterr().out
    assert make_splits.main(["--check", str(data)]) == 1
    assert "scans: not in the committed file" in capsys.readouterr().out
    assert make_splits.main(["--write", str(data)]) == 0
    written = json.loads(splits_file.read_text())
    assert written["evaluation"] == {"scans": ["case000", "case005"]}
    assert written["rule"] == make_splits.__doc__.strip()
    assert make_splits.main(["--check", str(data)]) == 0
    with pytest.raises(SystemExit):
        make_splits.main(["--write", "--check", str(data)])  # one mode at a time


def test_make_splits_check_passes_on_the_committed_file(shared_data: Path) -> None:
    make_splits = _make_splits()
    committed = json.loads(make_splits.SPLITS_FILE.read_text())
    missing = [d for d in committed["evaluation"] if not (shared_data / d / "imagesTr").is_dir()]
    if missing:
        pytest.skip(f"{shared_data} lacks {', '.join(missing)}")
    assert make_splits.main(["--check", str(shared_data)]) == 0


# --- bad input: one line, exit 2, as the segassist commands (SegAssistLib.cli.run_script) --------------------------
@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("engine_latency", ["--data", "{tmp}/nowhere"], "--data {tmp}/nowhere: totalsegmentator_examples/imagesTr/"),
        ("server_benchmark", ["--data", "{tmp}/nowhere"], "--data {tmp}/nowhere: totalsegmentator_examples/"),
        ("engine_acceptance", ["--baselines-from", "{tmp}/none.json"], "--baselines-from {tmp}/none.json: cannot"),
        ("engine_acceptance", ["--baselines-from", "{tmp}/bad.json"], "--baselines-from {tmp}/bad.json: cannot"),
        ("first_click_spill", ["--model", "{tmp}/none.pt", "--out", "{tmp}/out/spill.json"],
         "checkpoint not found: {tmp}/none.pt"),
        ("training_throughput", ["--config", "{tmp}/none.json", "--out", "{tmp}/out/t.json"],
         "cannot read the training config {tmp}/none.json"),
        ("campaign", ["--data", "{tmp}/nowhere"], "dataset folder {tmp}/nowhere/hippocampus not found"),
        ("campaign", ["--model", "{tmp}/none.pt"], "model not found: {tmp}/none.pt"),
        ("campaign", ["--structure", "liver"], "unknown structure 'liver'"),
        ("lasso_forms", ["--data", "{tmp}/nowhere", "--out", "{tmp}/out/lasso_forms.json"],
         "--data {tmp}/nowhere: sunnybrook/imagesTr/"),
    ],
)
def test_a_benchmark_script_refuses_bad_input_in_one_line(script: str, argv, message: str, tmp_path: Path) -> None:
    """A missing --data, --model, --config or --baselines-from (or a damaged one) ended each of these scripts
    in a traceback (exit 1); they now say it in one line and exit 2, before any work, writing nothing."""
    import subprocess

    (tmp_path / "bad.json").write_text("{not json")
    given = [a.format(tmp=tmp_path) for a in argv]
    if "--out" not in given:
        given += ["--out", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / f"{script}.py"), *given], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"{script}.py: error: {message.format(tmp=tmp_path)}"), done.stderr
    assert not (tmp_path / "out").exists()
