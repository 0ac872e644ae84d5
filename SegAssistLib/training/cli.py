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
    p.add_argument("--data-root", help="folder of datasets in MSD layout (default ../shared/data)")
    p.add_argument("--resume", type=Path, help="state.pt of an earlier run")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu (default) or cuda")
    p.set_defaults(func=run_train)


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
