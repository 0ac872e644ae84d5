"""Warm per-interaction latency and peak memory of the in-process engine on full-size volumes.

Volumes (built from real data in ``--data``, so the model sees real anatomy):

- CT 512x512x300: TotalSegmentator's example_ct_sm (3 mm) resampled to 0.75 x 0.75 x 1 mm and
  padded with air to 512 x 512 x 300 voxels; targets liver, spleen, left kidney, aorta, pancreas.
- MRI 256^3: BraTS 2013 pat0001 FLAIR (1 mm) padded to 256 x 256 x 256; target whole tumour.

Each target: a first click at the most interior voxel, then 4 correction clicks (the evaluation
protocol's simulated user). One untimed target first warms the engine up. Reports median and 95th
percentile latency per interaction and the process's peak resident memory.

Usage: python benchmarks/engine_latency.py [--data DIR] [--threads 2] [--out benchmarks/results]
       [--correction-zoom-share S] [--edge-band B]

``--data`` defaults to ``$SEGASSIST_SHARED_DATA``, else ``../shared/data`` beside the repository;
``--out`` to ``benchmarks/results`` of the repository, wherever it is run from.
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
import SimpleITK as sitk

from SegAssistLib.cli import run_script
from SegAssistLib.datasets import add_data_root_argument
from SegAssistLib.engine.builtin import DEFAULT_CHECKPOINT, load_default_engine
from SegAssistLib.errors import SegAssistError
from SegAssistLib.evaluation.cli import (
    CORRECTION_ZOOM_SHARE_HELP,
    EDGE_BAND_HELP,
    edge_band,
    refine_depth,
    share_of_a_side,
)
from SegAssistLib.evaluation.metrics import dice
from SegAssistLib.evaluation.runner import builtin_engine_record, builtin_options
from SegAssistLib.evaluation.simulator import first_click, next_click
from SegAssistLib.image import Volume
from SegAssistLib.machine import machine_info

REPO_ROOT = Path(__file__).resolve().parents[1]
CT_TARGETS = {"liver": (5,), "spleen": (1,), "kidney_left": (3,), "aorta": (52,), "pancreas": (7,)}
# the files the volumes are built from, under --data
CT_FILES = ("totalsegmentator_examples/imagesTr/example_ct_sm.nii.gz",
            "totalsegmentator_examples/labelsTr/example_ct_sm.nii.gz")
MRI_FILES = ("brats/imagesTr/brats_2013_pat0001_1_0000.nii.gz", "brats/labelsTr/brats_2013_pat0001_1.nii.gz")


def check_data(data: Path) -> None:
    """Refuse, before the model loads, a ``--data`` folder that lacks a file the volumes are built from."""
    for name in CT_FILES + MRI_FILES:
        if not (data / name).is_file():
            raise SegAssistError(f"--data {data}: {name} not found there (give the datasets' folder, which holds "
                                 "totalsegmentator_examples and brats)")


def _resample(image: sitk.Image, spacing, size, interpolator, default) -> sitk.Image:
    """Resample onto a grid of ``size`` voxels at ``spacing``, centred on the source image."""
    src_size = np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
    origin = np.asarray(image.GetOrigin()) + src_size / 2 - np.asarray(size) * np.asarray(spacing) / 2
    return sitk.Resample(image, [int(s) for s in size], sitk.Transform(), interpolator, origin.tolist(),
                         [float(s) for s in spacing], image.GetDirection(), default, image.GetPixelID())


def ct_volume(data: Path, slices: int = 300):
    img, lab = (sitk.ReadImage(str(data / name)) for name in CT_FILES)
    spacing, size = (0.75, 0.75, 300.0 / slices), (512, 512, slices)
    img = _resample(img, spacing, size, sitk.sitkLinear, -1024)
    lab = _resample(lab, spacing, size, sitk.sitkNearestNeighbor, 0)
    vol = Volume(sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetOrigin(),
                 np.asarray(img.GetDirection()).reshape(3, 3), modality="CT")
    return vol, sitk.GetArrayFromImage(lab)


def mri_volume(data: Path):
    img, lab = (sitk.ReadImage(str(data / name)) for name in MRI_FILES)
    arr = sitk.GetArrayFromImage(img)
    img = _resample(img, (1.0, 1.0, 1.0), (256, 256, 256), sitk.sitkLinear, float(arr.min()))
    lab = _resample(lab, (1.0, 1.0, 1.0), (256, 256, 256), sitk.sitkNearestNeighbor, 0)
    vol = Volume(sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetOrigin(),
                 np.asarray(img.GetDirection()).reshape(3, 3), modality="MR")
    return vol, sitk.GetArrayFromImage(lab)


def run_target(engine, vol: Volume, target: np.ndarray, clicks: int = 5):
    session = engine.open_session(vol)
    rows = []
    prompt = first_click(target, vol.spacing)
    for _ in range(clicks):
        with SAMPLER:
            update = session.add_prompt(prompt)
        result = session.result()
        rows.append({"latency_s": update.latency_s, "dice": dice(result, target), "levels": update.info.get("levels"),
                     "refine_tiles": update.info.get("refine_tiles")})
        prompt = next_click(target, result, vol.spacing)
        if prompt is None:
            break
    session.close()
    return rows


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


class RssSampler:
    """Highest resident memory seen while inside ``with`` blocks (sampled every 2 ms from /proc).

    The simulated user (distance transforms on the full volume) runs outside these blocks, so the
    figure is the engine's: image, mask, history and inference."""

    def __init__(self):
        import threading

        self.peak = 0
        self._active = threading.Event()
        self._page = resource.getpagesize()
        threading.Thread(target=self._run, daemon=True).start()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while True:
            self._active.wait()
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __enter__(self):
        self.peak = max(self.peak, self._rss())
        self._active.set()

    def __exit__(self, *exc):
        self._active.clear()
        self.peak = max(self.peak, self._rss())


SAMPLER = RssSampler()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_root_argument(parser)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--refine-depth", type=refine_depth, default=1,
                        help="the engine's refine depth, 1 to 16 (default 1)")
    parser.add_argument("--correction-zoom-share", type=share_of_a_side, default=None, metavar="S",
                        help=CORRECTION_ZOOM_SHARE_HELP)
    parser.add_argument("--edge-band", type=edge_band, default=None, metavar="B", help=EDGE_BAND_HELP)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    given = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    check_data(args.data)
    options = builtin_options(args.correction_zoom_share, args.edge_band)
    engine = load_default_engine(args.model, threads=args.threads, refine_depth=args.refine_depth, **options)
    cases = []
    for name, loader, targets in (("CT 512x512x300", ct_volume, CT_TARGETS),
                                  ("MRI 256^3", mri_volume, {"whole_tumour": (1, 2, 3, 4)})):
        vol, labels = loader(args.data)
        print(f"{name}: {vol.array.shape[::-1]} voxels, spacing {vol.spacing}", flush=True)
        run_target(engine, vol, np.isin(labels, next(iter(targets.values()))), clicks=2)  # warm-up, untimed
        for target_name, values in targets.items():
            rows = run_target(engine, vol, np.isin(labels, values))
            lat = [r["latency_s"] for r in rows]
            print(f"  {target_name:12s} latency ms {[round(1000 * x) for x in lat]}  Dice "
                  f"{[round(r['dice'], 3) for r in rows]}", flush=True)
            cases.append({"volume": name, "target": target_name, "interactions": rows})
        del vol, labels
    peak_300 = round(SAMPLER.peak / 1024**3, 3)
    # memory on the largest volume the issue names: 512x512x600 (0.5 mm slices), liver, 3 clicks
    vol, labels = ct_volume(args.data, slices=600)
    SAMPLER.peak = 0
    rows = run_target(engine, vol, labels == CT_TARGETS["liver"][0], clicks=3)
    memory_600 = {"engine_peak_rss_gib": round(SAMPLER.peak / 1024**3, 3),
                  "latency_ms": [round(1000 * r["latency_s"]) for r in rows]}
    print(f"CT 512x512x600 liver: {memory_600}", flush=True)
    del vol, labels
    summary = {"CT 512x512x600 memory check": memory_600}
    for name in ("CT 512x512x300", "MRI 256^3"):
        lat = np.array([r["latency_s"] for c in cases if c["volume"] == name for r in c["interactions"]])
        summary[name] = {"median_ms": round(1000 * float(np.median(lat)), 1),
                         "p95_ms": round(1000 * float(np.percentile(lat, 95)), 1), "interactions": int(lat.size)}
    summary["engine_peak_rss_gib"] = max(round(SAMPLER.peak / 1024**3, 3), peak_300)
    summary["process_peak_rss_gib_incl_simulated_user"] = round(peak_rss_gib(), 3)
    machine = {**machine_info("cpu"), "date": time.strftime("%Y-%m-%d")}  # torch_threads: the engine's
    report = {"command": shlex.join(["python", "benchmarks/engine_latency.py", *given]), "argv": given,
              "machine": machine, "model": engine.capabilities().to_dict(),
              "model_path": str(args.model or DEFAULT_CHECKPOINT), "model_identity": engine.model.identity,
              "engine_options": builtin_engine_record(engine), "summary": summary, "cases": cases}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine_latency.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({"summary": summary, "machine": machine}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_script(main, "engine_latency.py"))
