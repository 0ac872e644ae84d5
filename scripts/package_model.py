"""Package a training run's model.pt as the shipped weights (Resources/Models/segassist_unet.pt).

Adds the provenance the model card and ``Capabilities`` read: name, version, licence, description,
training data, steps, wall time, hardware. Also copies the run's resumable state beside it, so the
next training session continues where this one stopped.

Usage: python scripts/package_model.py runs/v1 --version 0.1.0
"""

import argparse
import platform
import shutil
from pathlib import Path

from SegAssistLib.engine.builtin import DEFAULT_CHECKPOINT
from SegAssistLib.engine.network import load_checkpoint, save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--version", required=True)
    args = parser.parse_args()
    model = load_checkpoint(args.run / "model.pt")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    meta = dict(model.meta)
    meta.update({
        "name": "segassist-unet",
        "version": args.version,
        "licence": "Apache-2.0",
        "description": "promptable 3D U-Net (MONAI): image, previous mask and 5 prompt channels in, one logit out",
        "training_data": "training split of ../shared/data (Resources/splits.json) + randomised synthetic volumes",
        "hardware": f"{cpu}, {__import__('os').cpu_count()} cores, CPU only",
    })
    save_checkpoint(DEFAULT_CHECKPOINT, model.network, model.config, meta)
    shutil.copyfile(args.run / "state.pt", DEFAULT_CHECKPOINT.with_name("training_state.pt"))
    print(f"wrote {DEFAULT_CHECKPOINT} (steps {meta.get('steps')}, {meta.get('train_seconds')} s)")


if __name__ == "__main__":
    main()
