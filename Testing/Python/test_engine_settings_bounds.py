"""Engine option values beyond the range a prompt log records them in (EngineSettings: refine_depth
1 to 16, max_refine_tiles 1 to 4096, edge_beta up to 1e9, min_view_mm 0 to 1e5, ...) are refused in
one line: by argparse on the command lines (exit status 2), by the engine with a SettingsError (a
ValueError and a SegAssistError) when made from Python. ``segassist eval --refine-depth 17`` had
died with a pydantic traceback, once EngineSettings came to be built when the engine is."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from test_eval_cli import _dataset

from SegAssistLib.cli import main
from SegAssistLib.errors import SegAssistError

pytest.importorskip("torch")
from SegAssistLib.engine.builtin import BuiltinEngine  # noqa: E402
from SegAssistLib.engine.edges import EdgeSnap  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "ValidationError" not in err
    return err.strip().splitlines()[-1]


def test_eval_refuses_a_refine_depth_beyond_16_in_one_line(tmp_path, tiny_checkpoint, capsys):
    folder = _dataset(tmp_path / "ds")
    out = tmp_path / "eval.json"
    argv = ["eval", str(folder), "--model", str(tiny_checkpoint), "--max-clicks", "1", "--json", str(out)]
    line = _usage_error(capsys, [*argv, "--refine-depth", "17"])
    assert line == "segassist eval: error: argument --refine-depth: must be at most 16, got 17"
    assert _usage_error(capsys, [*argv, "--refine-depth", "0"]).endswith("must be at least 1, got 0")
    assert not out.exists()
    assert main([*argv, "--refine-depth", "16", "--labels", "1"]) == 0  # the bound itself is the engine's too


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bounds_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("engine_latency", ["--refine-depth", "17"], "argument --refine-depth: must be at most 16, got 17"),
        ("edge_snap_sweep", ["--betas", "30,1e10"], "argument --betas: must be above 0 and at most 1e+09, got 1e10"),
        ("edge_snap_sweep", ["--betas", "0"], "argument --betas: must be above 0 and at most 1e+09, got 0"),
        ("edge_snap_sweep", ["--bands", "2,200"], "argument --bands: must be 0 (off) or between 1 and 10 voxels"),
        ("edge_snap_sweep", ["--bands", "0.5"], "argument --bands: must be 0 (off) or between 1 and 10 voxels"),
    ],
)
def test_the_benchmarks_refuse_engine_options_out_of_range_in_one_line(script, argv, message, capsys):
    parser = _script(script).build_parser()
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_the_argparse_types_accept_exactly_the_engines_range():
    import argparse

    from SegAssistLib.evaluation.cli import edge_band, edge_beta, refine_depth
    from SegAssistLib.prompt_log import MAX_EDGE_BAND, MAX_EDGE_BETA, MAX_REFINE_DEPTH, EngineSettings

    assert refine_depth("16") == 16 == MAX_REFINE_DEPTH
    assert edge_beta("1e9") == MAX_EDGE_BETA and edge_beta("1e-3") == 1e-3
    assert edge_band("10") <= MAX_EDGE_BAND
    for parse, text in ((refine_depth, "17"), (refine_depth, "0"), (edge_beta, "1.000001e9"), (edge_beta, "0"),
                        (edge_beta, "nan"), (edge_band, "11")):  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    assert EngineSettings.range_of("refine_depth") == "at least 1 and at most 16"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"refine_depth": 17}, "refine_depth must be at least 1 and at most 16, got 17"),
        ({"refine_depth": 0}, "refine_depth must be at least 1 and at most 16, got 0"),
        ({"max_refine_tiles": 5000}, "max_refine_tiles must be at least 1 and at most 4096, got 5000"),
        ({"min_view_mm": -1.0}, "min_view_mm must be at least 0 and at most 100000, got -1.0"),
        ({"min_view_mm": 2e5}, "min_view_mm must be at least 0 and at most 100000, got 200000.0"),
        ({"edge_snap": EdgeSnap(band=2.0, beta=1e10)}, "edge_beta must be above 0 and at most 1000000000"),
        ({"edge_snap": EdgeSnap(band=200.0)}, "edge_band must be at least 0 and at most 100, got 200.0"),
        ({"correction_zoom_share": 1.0}, "correction_zoom_share must be at least 0 and below 1, got 1.0"),
    ],
)
def test_the_engine_refuses_settings_out_of_range_with_a_settings_error(tiny_checkpoint, options, message):
    from SegAssistLib.prompt_log import SettingsError

    with pytest.raises(SettingsError) as error:
        BuiltinEngine.from_checkpoint(tiny_checkpoint, threads=1, **options)
    assert isinstance(error.value, SegAssistError) and isinstance(error.value, ValueError)
    assert str(error.value) == f"engine settings out of range: {message}" or message in str(error.value)
    assert "\n" not in str(error.value) and error.value.code == "invalid_settings"
