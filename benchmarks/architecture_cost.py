"""What a wider or deeper network costs on this CPU: parameters, inference time of one patch, and
the time of one training step.

The shipped network is small because it trains on 2 CPU cores; this measures which larger MONAI
U-Nets fit the same budgets. Inference: one 7-channel 64^3 patch (what the engine runs per window),
``--threads`` torch threads (the engine's). Training: a batch of 4 patches, forward, backward and an
AdamW step, 1 thread (the trainer's, beside its patch-cutting process). Random inputs and weights:
the cost of a dense 3D convolution network does not depend on the values.

Usage: python benchmarks/architecture_cost.py [--threads 2] [--repeats 12] [--out benchmarks/results]

``--out`` defaults to ``benchmarks/results`` of the repository, wherever it is run from.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from SegAssistLib.engine.network import NetworkConfig, build_network
from SegAssistLib.machine import machine_info

REPO_ROOT = Path(__file__).resolve().parents[1]

CANDIDATES = [
    ((16, 32, 64, 128), 0),  # shipped (v0.1.0 to v0.3.0)
    ((16, 32, 64, 128), 1),
    ((24, 48, 96, 192), 0),
    ((32, 64, 128, 256), 0),
    ((16, 32, 64, 128, 256), 0),
    ((24, 48, 96, 192, 320), 0),
    ((32, 64, 128, 256, 320), 1),
]


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN picks its kernels on the first call
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure(channels, res_units: int, threads: int, repeats: int, patch: int = 64) -> Dict:
    cfg = NetworkConfig(channels=tuple(channels), strides=(2,) * (len(channels) - 1), num_res_units=res_units,
                        patch_size=patch)
    net = build_network(cfg)
    params = sum(p.numel() for p in net.parameters())
    torch.set_num_threads(threads)
    one = torch.randn(1, cfg.in_channels, patch, patch, patch)
    net.eval()
    with torch.inference_mode():
        infer = _median_seconds(lambda: net(one), repeats)
    torch.set_num_threads(1)
    net.train()
    batch = torch.randn(4, cfg.in_channels, patch, patch, patch)
    opt = torch.optim.AdamW(net.parameters())

    def step():
        loss = net(batch).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train = _median_seconds(step, max(3, repeats // 3))
    return {"channels": list(channels), "num_res_units": res_units, "parameters": params,
            "inference_ms": round(infer * 1000, 1), "train_step_ms": round(train * 1000, 1)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads for inference (default 2)")
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    given = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    rows: List[Dict] = []
    print("| channels | res units | parameters | inference ms (1 patch) | training step ms (batch 4) |")
    print("|---|---|---|---|---|")
    for channels, res_units in CANDIDATES:
        row = measure(channels, res_units, args.threads, args.repeats)
        rows.append(row)
        print(f"| {row['channels']} | {res_units} | {row['parameters'] / 1e6:.2f} M | {row['inference_ms']} | "
              f"{row['train_step_ms']} |", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"command": shlex.join(["python", "benchmarks/architecture_cost.py", *given]), "argv": given,
              "rows": rows, "inference_threads": args.threads, "train_threads": 1, "repeats": args.repeats,
              "machine": machine_info("cpu"), "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    path = args.out / "architecture_cost.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
