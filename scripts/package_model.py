"""Package a training run's model.pt as the shipped weights (Resources/Models/segassist_unet.pt).

Adds the provenance the model card and ``Capabilities`` read: name, version, licence, description,
training data, steps, wall time, hardware (as the run recorded it). Also copies the run's resumable
state beside it, so the next training session continues where this one stopped; a run without one
(a GPU run whose state stayed on the GPU machine) removes the old state, which belongs to other weights.

Usage: python scripts/package_model.py runs/v1 --version 0.1.0
"""

import argparse
import shutil
import sys
from pathlib import Path
from typing import List, Optional

import torch

from SegAssistLib.cli import run_script
from SegAssistLib.engine.builtin import DEFAULT_CHECKPOINT
from SegAssistLib.engine.network import load_checkpoint, save_checkpoint
from SegAssistLib.errors import SegAssistError
from SegAssistLib.files import atomic_write
from SegAssistLib.training.train import read_training_state, training_hardware


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run folder (segassist train --out): model.pt, state.pt")
    parser.add_argument("--version", required=True)
    args = parser.parse_args(argv)
    if not args.run.is_dir():
        raise SegAssistError(f"run folder not found: {args.run}")
    model = load_checkpoint(args.run / "model.pt")
    meta = dict(model.meta)
    hardware = meta.get("hardware") or training_hardware(torch.device("cpu"))
    meta.update({
        "name": "segassist-unet",
        "version": args.version,
        "licence": "Apache-2.0",
        "description": "promptable 3D U-Net (MONAI): image, previous mask and 5 prompt channels in, one logit out",
        "training_data": "training split of ../shared/data (Resources/splits.json) + randomised synthetic volumes",
        "hardware": hardware,
    })
    state = DEFAULT_CHECKPOINT.with_name("training_state.pt")
    run_state = args.run / "state.pt"
    if run_state.is_file():
        step = read_training_state(run_state, what=f"the run's state.pt ({run_state})")["step"]
        if step != meta.get("steps"):  # the run was stopped between writing the two files
            raise SystemExit(f"{args.run}: model.pt is from step {meta.get('steps')}, state.pt from step {step}: "
                             "resume the run until its next checkpoint, then package it")
    save_checkpoint(DEFAULT_CHECKPOINT, model.network, model.config, meta)
    if run_state.is_file():
        atomic_write(state, lambda tmp: shutil.copyfile(run_state, tmp), overwrite=True)
    elif state.exists():
        state.unlink()
        print(f"{args.run} has no state.pt: removed {state}, which belonged to the previous weights")
    print(f"wrote {DEFAULT_CHECKPOINT} (steps {meta.get('steps')}, {meta.get('train_seconds')} s)")
    return 0


if __name__ == "__main__":  # bad input (no run, a damaged state.pt) is one line, not a traceback
    sys.exit(run_script(main, "package_model.py"))
