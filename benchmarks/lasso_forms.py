"""A lasso on a thick-slice image answered in its two wire forms: as drawn (points) and as its slab.

A lasso travels to an engine either as drawn, ``LassoPrompt(points=...)``, or as its slab,
``SegAssistLib.prompts.to_slab(prompt, shape)``: the polygon rasterised on the image's grid, what a
client sends for a lasso reaching past the image and what older clients sent for every lasso. On an
image of thick slices a lasso drawn on a plane that is not one of the image's slices covers two or
more slices, so its slab is thicker than one voxel on every axis. This puts the same lasso in both
forms to the shipped model, each on a fresh session, and reports the Dice of each answer against the
ground truth, the Dice between the two answers, and each answer's latency.

Cases (from ``--data``):

- Sunnybrook SCD0000101_phase08 (cine short axis, oblique direction, 1.37 x 1.37 x 10 mm), target
  the LV blood pool (label 1): a 35 mm radius circle around the target's centre in the physical
  (LPS) axial, coronal and sagittal planes, which a viewer's default views show, and a circle sized
  to the target on two planes tilted slightly off the image's slices.
- BraTS 2013 pat0001 FLAIR resampled to 5 mm slices (every 5th slice of the 1 mm image), target the
  whole tumour (label > 0): a circle sized to the tumour on two planes tilted slightly off the slices.

Each plane passes through the target's centre (the mean of its voxels). An answer is timed as the
engine's ``latency_s``, the median of ``--repeats`` runs, after one untimed warm-up answer.

Usage: python benchmarks/lasso_forms.py [--data DIR] [--threads 2] [--repeats 5]
       [--out benchmarks/results/lasso_forms.json]

``--data`` defaults to ``$SEGASSIST_SHARED_DATA``, else ``../shared/data`` beside the repository;
``--out`` to ``benchmarks/results/lasso_forms.json`` of the repository, wherever it is run from.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from SegAssistLib.cli import run_script
from SegAssistLib.cli_types import positive_int
from SegAssistLib.datasets import add_data_root_argument
from SegAssistLib.engine.builtin import DEFAULT_CHECKPOINT, load_default_engine
from SegAssistLib.errors import SegAssistError
from SegAssistLib.evaluation.metrics import dice
from SegAssistLib.evaluation.runner import builtin_engine_record
from SegAssistLib.image import Volume
from SegAssistLib.io import load_mask, load_volume
from SegAssistLib.machine import machine_info
from SegAssistLib.prompts import LassoPrompt, inside_image, prompt_vertices_kji, to_slab

REPO_ROOT = Path(__file__).resolve().parents[1]
# the files the cases are read from, under --data
SUNNYBROOK_FILES = ("sunnybrook/imagesTr/SCD0000101_phase08.nii.gz", "sunnybrook/labelsTr/SCD0000101_phase08.nii.gz")
BRATS_FILES = ("brats/imagesTr/brats_2013_pat0001_1_0000.nii.gz", "brats/labelsTr/brats_2013_pat0001_1.nii.gz")
BRATS_SLICE_STEP = 5  # every 5th 1 mm slice: 5 mm slices
VERTICES = 48  # a lasso's vertices, evenly on its circle
PHYSICAL_RADIUS_MM = 35.0  # the circle on the physical planes
SIZED_MARGIN = 1.15  # a circle sized to the target: this times the radius of a disc of its largest slice's area
# physical (LPS) planes by their normal
PHYSICAL_PLANES = {"axial": (0.0, 0.0, 1.0), "coronal": (0.0, 1.0, 0.0), "sagittal": (1.0, 0.0, 0.0)}
# planes tilted off the image's slices: (degrees, the in-slice axis tilted about: "i" or "i+j")
TILTS = ((8.0, "i"), (12.0, "i+j"))


def check_data(data: Path) -> None:
    """Refuse, before the model loads, a ``--data`` folder that lacks a file the cases are read from."""
    for name in SUNNYBROOK_FILES + BRATS_FILES:
        if not (data / name).is_file():
            raise SegAssistError(f"--data {data}: {name} not found there (give the datasets' folder, which holds "
                                 "sunnybrook and brats)")


def sunnybrook_case(data: Path) -> Tuple[Volume, np.ndarray]:
    volume = load_volume(data / SUNNYBROOK_FILES[0])
    volume.modality = "MR"
    return volume, load_mask(data / SUNNYBROOK_FILES[1]) == 1


def brats_case(data: Path) -> Tuple[Volume, np.ndarray]:
    """The 1 mm FLAIR with only every ``BRATS_SLICE_STEP``-th slice kept, its geometry to match."""
    full = load_volume(data / BRATS_FILES[0])
    spacing = (full.spacing[0], full.spacing[1], full.spacing[2] * BRATS_SLICE_STEP)
    volume = Volume(np.ascontiguousarray(full.array[::BRATS_SLICE_STEP]), spacing, full.origin, full.direction,
                    modality="MR")
    return volume, np.ascontiguousarray(load_mask(data / BRATS_FILES[1])[::BRATS_SLICE_STEP] > 0)


def _unit(v: Sequence[float]) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def slice_normal(volume: Volume) -> np.ndarray:
    """The physical normal of the image's slices (the plane of its i and j axes)."""
    return _unit(np.cross(volume.direction[:, 0], volume.direction[:, 1]))


def tilted_normal(volume: Volume, degrees: float, about: str) -> np.ndarray:
    """The slices' normal turned by ``degrees`` about the in-slice axis ``about`` ("i" or "i+j")."""
    axis = _unit(volume.direction[:, 0] if about == "i" else volume.direction[:, 0] + volume.direction[:, 1])
    n0, t = slice_normal(volume), np.radians(degrees)
    return _unit(np.cos(t) * n0 + np.sin(t) * np.cross(axis, n0))


def circle_lasso(volume: Volume, centre_mm: np.ndarray, normal: np.ndarray, radius_mm: float) -> LassoPrompt:
    """A lasso of ``VERTICES`` vertices on the circle of ``radius_mm`` around ``centre_mm`` in the plane
    of physical normal ``normal``; its vertices as continuous indices (i, j, k) of ``volume``."""
    u = _unit(np.cross(normal, [1.0, 0.0, 0.0] if abs(normal[0]) < 0.9 else [0.0, 1.0, 0.0]))
    w = np.cross(normal, u)
    angles = np.linspace(0.0, 2 * np.pi, VERTICES, endpoint=False)
    points = [volume.physical_to_ijk(centre_mm + radius_mm * (np.cos(a) * u + np.sin(a) * w)) for a in angles]
    return LassoPrompt(points=[tuple(float(x) for x in p) for p in points])


def centre_of(volume: Volume, target: np.ndarray) -> np.ndarray:
    """The target's centre (the mean of its voxels) in physical mm."""
    return volume.ijk_to_physical(np.argwhere(target).mean(0)[::-1])


def sized_radius_mm(volume: Volume, target: np.ndarray) -> float:
    """``SIZED_MARGIN`` times the radius of a disc as large as the target's largest slice."""
    area = float(target.sum((1, 2)).max()) * volume.spacing[0] * volume.spacing[1]
    return SIZED_MARGIN * float(np.sqrt(area / np.pi))


def lassos(volume: Volume, target: np.ndarray, physical: bool) -> List[Tuple[str, np.ndarray, float]]:
    """The case's planes: (name, physical normal, circle radius in mm)."""
    planes = []
    if physical:
        planes += [(f"physical {name}", _unit(n), PHYSICAL_RADIUS_MM) for name, n in PHYSICAL_PLANES.items()]
    radius = sized_radius_mm(volume, target)
    planes += [(f"slices tilted {deg:g} deg about {about}", tilted_normal(volume, deg, about), radius)
               for deg, about in TILTS]
    return planes


def answer(engine, volume: Volume, prompt: LassoPrompt, repeats: int) -> Tuple[np.ndarray, List[float]]:
    """The mask the prompt gets on a fresh session, and the engine's latency of each of ``repeats`` runs."""
    mask, latencies = None, []
    for _ in range(repeats):
        session = engine.open_session(volume)
        update = session.add_prompt(prompt)
        latencies.append(update.latency_s)
        result = session.result() > 0
        session.close()
        if mask is None:
            mask = result
        elif not np.array_equal(mask, result):
            raise SegAssistError("the same prompt answered differently on a fresh session: the benchmark assumes "
                                 "a deterministic engine")
    return mask, latencies


def measure_case(engine, name: str, volume: Volume, target: np.ndarray, physical: bool, repeats: int) -> List[Dict]:
    centre = centre_of(volume, target)
    n0 = slice_normal(volume)
    rows = []
    for plane, normal, radius in lassos(volume, target, physical):
        points = circle_lasso(volume, centre, normal, radius)
        slab = to_slab(points, volume.array.shape)
        masks, latencies = {}, {}
        for form, prompt in (("points", points), ("slab", slab)):
            masks[form], latencies[form] = answer(engine, volume, prompt, repeats)
        tilt = float(np.degrees(np.arccos(min(1.0, abs(float(normal @ n0))))))
        row = {
            "case": name, "plane": plane, "normal_lps": [round(float(x), 4) for x in normal],
            "tilt_from_slices_deg": round(tilt, 2), "radius_mm": round(radius, 2), "vertices": VERTICES,
            # a points-form lasso reaching past the image is drawn as its slab by the engine: the forms agree by rule
            "inside_image": bool(inside_image(prompt_vertices_kji(points), volume.array.shape).all()),
            "slab_box_kji": [int(n) for n in slab.slab.shape], "slab_voxels": int(slab.slab.voxels_kji().shape[0]),
            "target_voxels": int(target.sum()),
            "dice_points": round(dice(masks["points"], target), 4),
            "dice_slab": round(dice(masks["slab"], target), 4),
            "dice_points_vs_slab": round(dice(masks["points"], masks["slab"]), 4),
            "voxels_points": int(masks["points"].sum()), "voxels_slab": int(masks["slab"].sum()),
            "latency_ms_points": round(1000 * float(np.median(latencies["points"])), 1),
            "latency_ms_slab": round(1000 * float(np.median(latencies["slab"])), 1),
            "latencies_ms": {form: [round(1000 * x, 1) for x in lat] for form, lat in latencies.items()},
        }
        print(f"  {plane:30s} slab {'x'.join(map(str, row['slab_box_kji'])):10s} Dice points {row['dice_points']:.3f} "
              f"slab {row['dice_slab']:.3f} between {row['dice_points_vs_slab']:.3f}  ms "
              f"{row['latency_ms_points']:.0f} / {row['latency_ms_slab']:.0f}", flush=True)
        rows.append(row)
    return rows


def markdown_table(rows: List[Dict]) -> str:
    lines = ["| case | plane | tilt off slices (deg) | radius (mm) | slab k x j x i | Dice points | Dice slab "
             "| Dice points vs slab | ms points | ms slab |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['plane']}{'' if r['inside_image'] else ' (past the image)'} "
                     f"| {r['tilt_from_slices_deg']:.1f} | {r['radius_mm']:.1f} | "
                     f"{' x '.join(map(str, r['slab_box_kji']))} | {r['dice_points']:.3f} | {r['dice_slab']:.3f} "
                     f"| {r['dice_points_vs_slab']:.3f} | {r['latency_ms_points']:.0f} | {r['latency_ms_slab']:.0f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_root_argument(parser)
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="runs of each answer; its latency is their median (default 5)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "lasso_forms.json",
                        help="the JSON result (default: benchmarks/results/lasso_forms.json of the repository)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    given = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    check_data(args.data)
    engine = load_default_engine(threads=args.threads)
    t0 = time.perf_counter()
    rows, cases = [], {}
    for name, loader, physical in (("Sunnybrook SCD0000101_phase08 LV", sunnybrook_case, True),
                                   (f"BraTS pat0001 whole tumour, {BRATS_SLICE_STEP} mm slices", brats_case, False)):
        volume, target = loader(args.data)
        cases[name] = {"shape_ijk": list(volume.shape_ijk), "spacing_mm": [round(s, 4) for s in volume.spacing],
                       "direction": np.round(volume.direction, 4).tolist(), "target_voxels": int(target.sum())}
        print(f"{name}: {volume.shape_ijk} voxels, spacing {tuple(round(s, 3) for s in volume.spacing)} mm", flush=True)
        if not rows:  # warm-up, untimed
            answer(engine, volume, circle_lasso(volume, centre_of(volume, target), slice_normal(volume),
                                                sized_radius_mm(volume, target)), 1)
        rows += measure_case(engine, name, volume, target, physical, args.repeats)
    table = markdown_table(rows)
    machine = {**machine_info("cpu"), "date": time.strftime("%Y-%m-%d")}  # torch_threads: the engine's
    report = {"command": shlex.join(["python", "benchmarks/lasso_forms.py", *given]), "argv": given,
              "machine": machine, "model": engine.capabilities().to_dict(), "model_path": str(DEFAULT_CHECKPOINT),
              "model_identity": engine.model.identity, "engine_options": builtin_engine_record(engine),
              "settings": {"threads": args.threads, "repeats": args.repeats, "vertices": VERTICES,
                           "physical_radius_mm": PHYSICAL_RADIUS_MM, "sized_margin": SIZED_MARGIN,
                           "tilts": [{"degrees": d, "about": a} for d, a in TILTS],
                           "brats_slice_step": BRATS_SLICE_STEP},
              "cases": cases, "rows": rows, "wall_s": round(time.perf_counter() - t0, 1), "table": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print()
    print(table)
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main, "lasso_forms.py"))
