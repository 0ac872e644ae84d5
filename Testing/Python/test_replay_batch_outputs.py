"""The Slicer batch script (``Resources/Examples/batch_segment.py``) writes --out whole or not at all, as
``segassist segment`` does, and refuses bad usage with one line (exit 2).

It wrote --out in place: a write that failed (a full disk) left a truncated file where a good result had
been, or a partial new one that the next run refused to replace; a file made after the start-up check
was replaced without --overwrite; a detached header (``.seg.nhdr``) replaced the data file beside it
without --overwrite; the local backend's options were ignored with --url; and --threads -1 ended in a
traceback."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import SimpleITK as sitk

pytest.importorskip("slicer")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "Resources" / "Examples" / "batch_segment.py"
SAMPLE = ROOT / "Resources" / "Samples" / "hippocampus_001_image.nii.gz"
SAMPLE_PROMPTS = ROOT / "Resources" / "Examples" / "hippocampus_001_prompts.json"

# the script's main() in a process whose files may not grow past 64 bytes (as on a full disk: the writer
# fails part way; a NRRD header alone is larger), once for each --out after argv[2] (a JSON list of argument
# lists); argv[1]: the script
RUN_UNDER_A_LIMIT = """
import importlib.util, json, resource, signal, sys
spec = importlib.util.spec_from_file_location("batch", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
import slicer, torch  # imported (and the model's code compiled) before the limit
from SegAssistLib.engine import builtin
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
for argv in json.loads(sys.argv[2]):
    print("exit", module.main(argv), flush=True)
"""


def _example_module():
    spec = importlib.util.spec_from_file_location("segassist_batch_replay_outputs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_under_a_limit(*runs: List[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", RUN_UNDER_A_LIMIT, str(SCRIPT), json.dumps(list(runs))], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


def test_a_failed_write_keeps_the_earlier_result_and_leaves_nothing(tmp_path, tiny_checkpoint):
    out, new = tmp_path / "out.seg.nrrd", tmp_path / "new.seg.nrrd"
    out.write_bytes(b"an earlier, good segmentation")
    common = ["--image", str(SAMPLE), "--prompts", str(SAMPLE_PROMPTS), "--in-process", "--model",
              str(tiny_checkpoint), "--threads", "1"]  # fmt: skip
    done = _run_under_a_limit([*common, "--out", str(out), "--overwrite"], [*common, "--out", str(new)])
    assert done.stdout.count("exit 1") == 2, done.stdout + done.stderr
    assert out.read_bytes() == b"an earlier, good segmentation"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.seg.nrrd"]  # no partial file, no temporary one
    for path in (out, new):
        assert f"error: --out {path} not written, nothing replaced" in done.stderr, done.stderr


def test_a_file_that_appears_while_the_script_runs_is_not_replaced(tmp_path, tiny_checkpoint, capsys):
    module = _example_module()
    out = tmp_path / "out.seg.nrrd"
    real = module.in_process_engine

    def another_run_finishes_meanwhile(args):  # the real engine, loaded after another run wrote --out
        out.write_bytes(b"another run's result")
        return real(args)

    module.in_process_engine = another_run_finishes_meanwhile
    argv = ["--image", str(SAMPLE), "--prompts", str(SAMPLE_PROMPTS), "--out", str(out), "--in-process",
            "--model", str(tiny_checkpoint), "--threads", "1"]  # fmt: skip
    assert module.main(argv) == 1
    assert "appeared while the script ran: not replaced" in capsys.readouterr().err
    assert out.read_bytes() == b"another run's result"
    assert module.main([*argv, "--overwrite"]) == 0  # asked for: replaced by a whole segmentation
    assert sitk.ReadImage(str(out)).GetSize() == sitk.ReadImage(str(SAMPLE)).GetSize()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.seg.nrrd"]


def _usage_error(capsys, *argv: str) -> str:
    assert _example_module().main([*argv]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.err.strip().splitlines()[-1].startswith(
        "batch_segment.py: error:"), captured.err  # fmt: skip
    return captured.err


def test_a_detached_header_is_refused_and_its_data_file_kept(tmp_path, capsys):
    data = tmp_path / "case.seg.raw.gz"
    data.write_bytes(b"precious user data")
    for name in ("case.seg.nhdr", "case.nhdr"):
        err = _usage_error(capsys, "--image", str(SAMPLE), "--prompts", str(SAMPLE_PROMPTS), "--out",
                           str(tmp_path / name), "--in-process")  # fmt: skip
        assert "a segmentation is written as .seg.nrrd or .nrrd (one file; not a detached .nhdr header)" in err
    assert data.read_bytes() == b"precious user data" and sorted(p.name for p in tmp_path.iterdir()) == [data.name]


def test_local_backend_options_are_refused_with_a_url_and_bad_threads_are_a_usage_error(tmp_path, capsys):
    common = ["--image", str(SAMPLE), "--prompts", str(SAMPLE_PROMPTS), "--out", str(tmp_path / "o.seg.nrrd")]
    remote = ["--url", "http://127.0.0.1:9", "--send-images-to-remote"]
    for extra, named in [
        (["--model", "other.pt"], "--model"),
        (["--device", "cuda:7"], "--device"),
        (["--threads", "2"], "--threads"),
        (["--server-python", sys.executable], "--server-python"),
    ]:
        err = _usage_error(capsys, *common, *remote, *extra)
        assert f"{named}: the local backend's, not --url: a server answers with its own model" in err, err
    err = _usage_error(capsys, *common, "--in-process", "--threads", "-1")
    assert "argument --threads: must be at least 0, got -1" in err, err
    assert not (tmp_path / "o.seg.nrrd").exists()
