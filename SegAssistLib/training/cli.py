"""``segassist train``: argument parsing only; torch and MONAI are imported when it runs."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train the built-in network (CPU or GPU)")
    p.add_argument("--out", required=True, type=Path, help="run folder: state.pt, model.pt, log.jsonl")
    p.add_argument("--config", type=Path, help="JSON file with TrainConfig fields")
    p.add_argument("--minutes", type=float, help="wall-clock budget (overrides the config)")
    p.add_argument("--data-root", help="folder of datasets in MSD layout, or a training pack (default ../shared/data)")
    p.add_argument("--resume", type=Path, help="state.pt of an earlier run")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu (default) or cuda")
    p.set_defaults(func=run_train)

    p = subparsers.add_parser(
        "pack-training",
        help="pack the training split into a small folder that travels (for a GPU machine without ../shared)",
    )
    p.add_argument("data_root", type=Path, help="folder of datasets in MSD layout (for example ../shared/data)")
    p.add_argument("out", type=Path, help="new folder for the pack; train with --data-root OUT")
    p.add_argument("--patch", type=int, default=64, help="largest network patch the pack serves (default 64)")
    p.add_argument("--datasets", help="comma-separated dataset folder names (default: all)")
    p.set_defaults(func=run_pack)


def run_train(args: argparse.Namespace) -> int:
    from SegAssistLib.training.train import TrainConfig, Trainer

    cfg = TrainConfig(**json.loads(args.config.read_text())) if args.config else TrainConfig()
    if args.minutes is not None:
        cfg.minutes = args.minutes
    if args.data_root is not None:
        cfg.data_root = args.data_root
    if args.seed is not None:
        cfg.seed = args.seed
    if args.device is not None:
        cfg.device = args.device
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    Trainer(cfg, args.out, args.resume).run()
    return 0


def run_pack(args: argparse.Namespace) -> int:
    from SegAssistLib.training.pack import write_pack

    datasets = [d for d in args.datasets.split(",") if d] if args.datasets else None
    summary = write_pack(args.data_root, args.out, patch=args.patch, datasets=datasets)
    print(f"packed {sum(summary.cases.values())} cases into {summary.folder}: {summary.bytes / 2**20:.1f} MiB "
          f"({summary.packed_voxels / max(summary.source_voxels, 1):.0%} of the voxels) in {summary.seconds:.0f} s")
    return 0
