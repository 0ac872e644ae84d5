"""Worst case for memory: an answer that covers a whole 600 x 512 x 512 CT.

The shipped network never answers a click with the whole body, but a user's click on a large organ
can come close, and the engine must stay within its memory target whatever the answer's size. The
network is replaced by one that answers "inside" everywhere, so every level zooms out and the whole
image is pasted; the rest (windows, pasting, undo, reset) is the engine's real path.

Usage: python benchmarks/whole_body_answer.py [--out benchmarks/results/whole_body_answer.json]

``--out`` defaults to ``benchmarks/results/whole_body_answer.json`` of the repository, wherever it is
run from.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from SegAssistLib.engine.builtin import load_default_engine
from SegAssistLib.image import Volume
from SegAssistLib.machine import machine_info
from SegAssistLib.prompts import PointPrompt

SHAPE = (600, 512, 512)  # k, j, i
SPACING_IJK = (0.7, 0.7, 0.8)
GIB = 2**30
REPO_ROOT = Path(__file__).resolve().parents[1]


class _InsideEverywhere(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x[:, :1], 10.0)


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux


def _body_ct(shape) -> np.ndarray:
    """Air around an elliptic body of soft tissue filling most of each slice."""
    array = np.full(shape, -1000, np.int16)
    j, i = np.ogrid[: shape[1], : shape[2]]
    body = ((j - shape[1] / 2) / (0.39 * shape[1])) ** 2 + ((i - shape[2] / 2) / (0.45 * shape[2])) ** 2 <= 1
    array[:, body] = 40
    return array


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "whole_body_answer.json")
    parser.add_argument("--shape", default=",".join(map(str, SHAPE)), help="k,j,i (a smaller one for a quick check)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    given = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    shape = tuple(int(n) for n in args.shape.split(","))
    engine = load_default_engine(threads=2)
    engine.swap_network(_InsideEverywhere(), "inside-everywhere")
    volume = Volume(_body_ct(shape), spacing=SPACING_IJK, modality="CT")
    image_gib = _peak_gib()
    session = engine.open_session(volume)
    t0 = time.perf_counter()
    update = session.add_prompt(PointPrompt(position=(shape[2] / 2, shape[1] / 2, shape[0] / 2)))
    click_s = time.perf_counter() - t0
    after_click = _peak_gib()
    t0 = time.perf_counter()
    session.undo()
    undo_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    session.redo()
    session.reset()
    reset_s = time.perf_counter() - t0
    result = {
        "image_shape_kji": list(shape),
        "answer_voxels": int(np.count_nonzero(update.voxels)),
        "levels": update.info.get("levels"),
        "click_s": round(click_s, 2),
        "undo_s": round(undo_s, 2),
        "redo_and_reset_s": round(reset_s, 2),
        "peak_rss_gib_with_image": round(image_gib, 3),
        "peak_rss_gib_after_click": round(after_click, 3),
        "peak_rss_gib_end": round(_peak_gib(), 3),
        "target_gib": 2.0,
    }
    record = {
        "command": shlex.join(["python", "benchmarks/whole_body_answer.py", *given]),
        "argv": given,
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d"),
        "result": result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
