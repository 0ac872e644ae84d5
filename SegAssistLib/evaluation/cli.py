"""``segassist eval``: the simulated-user evaluation of an engine on a labelled dataset folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from SegAssistLib.cli_types import non_negative_int, non_negative_mm, number, positive_int

PROTOCOL_CHOICES = ("clicks", "box+clicks", "scribble+clicks")
ENGINE_CHOICES = ("builtin", "growcut", "randomwalker", "growcut-inside", "randomwalker-inside", "ablation")
ORIENTATION_CHOICES = ("axial", "coronal", "sagittal", "oblique")
CORRECTION_ZOOM_SHARE_HELP = (
    "builtin: a correction zooms out only when it changes more than this share of a window side the mask "
    "already crossed (default 0.025; 0: on any change, the previous rule)"
)


def share_of_a_side(text: str) -> float:
    """argparse type of ``--correction-zoom-share``: a number in [0, 1)."""
    value = number(text)
    if not 0.0 <= value < 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


def refine_depth(text: str) -> int:
    """argparse type of ``--refine-depth``: a whole number from 1 to 16, the engine's range
    (:class:`~SegAssistLib.prompt_log.EngineSettings`)."""
    from SegAssistLib.prompt_log import MAX_REFINE_DEPTH  # here: the command line starts without pydantic

    value = positive_int(text)
    if value > MAX_REFINE_DEPTH:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_REFINE_DEPTH}, got {value}")
    return value


def edge_beta(text: str) -> float:
    """argparse type of an edge snap's beta (the benchmarks' ``--betas``): above 0, at most 1e9."""
    from SegAssistLib.prompt_log import MAX_EDGE_BETA

    value = number(text)
    if not 0.0 < value <= MAX_EDGE_BETA:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be above 0 and at most {MAX_EDGE_BETA:g}, got {text}")
    return value


EDGE_BAND_HELP = (
    "builtin: half-width in voxels of the band around each answer's surface that a random walker snaps to "
    "the image's edges (default 2; 0: off, the network's answer as it is)"
)


def edge_band(text: str) -> float:
    """argparse type of ``--edge-band``: 0 (off) or at least 1 voxel."""
    value = number(text)
    if not (value == 0.0 or 1.0 <= value <= 10.0):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 0 (off) or between 1 and 10 voxels, got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate an engine with a simulated user on a dataset folder (MSD layout)",
        description=(
            "Simulated-user evaluation: clicks at the most interior voxel of the largest error "
            "region; Dice after each interaction, NoC@80/85/90, latency, peak memory. "
            "NoC counts interactions (a box or scribble is one); when a threshold is never "
            "reached NoC is the number allowed (--max-clicks, plus one after a box or scribble) and "
            "'reached' is false."
        ),
    )
    parser.add_argument("dataset_dir", metavar="DATASET_DIR", help="folder with imagesTr/, labelsTr/, dataset.json")
    parser.add_argument(
        "--labels",
        default=None,
        help="targets, comma-separated; '1+2+3+4' is a union (default: every numeric label of dataset.json)",
    )
    parser.add_argument("--protocol", choices=PROTOCOL_CHOICES, default="clicks")
    parser.add_argument("--max-clicks", type=positive_int, default=10, help="clicks per target (default 10)")
    parser.add_argument("--cases", type=positive_int, default=None, help="only the first N cases of the split")
    parser.add_argument("--split", choices=("evaluation", "training", "all"), default="evaluation")
    parser.add_argument(
        "--engine",
        choices=ENGINE_CHOICES,
        default="builtin",
        help="ablation = the builtin model answering each interaction alone (current mask + newest prompt); "
        "*-inside = the baseline with no background seeded where its working box meets the image edge",
    )
    parser.add_argument(
        "--model", default=None, help="checkpoint for the builtin and ablation engines (default: shipped)"
    )
    parser.add_argument("--device", default=None,
                        help="builtin and ablation: device of the model (cpu, cuda; default cpu)")
    parser.add_argument("--refine-depth", type=refine_depth, default=None, metavar="N",
                        help="builtin: re-predict zoomed-out answers N levels finer, 1 to 16 (default 1; 2 sharpens "
                             "large structures at about twice the latency of such clicks)")
    parser.add_argument("--correction-zoom-share", type=share_of_a_side, default=None, metavar="S",
                        help=CORRECTION_ZOOM_SHARE_HELP)
    parser.add_argument("--edge-band", type=edge_band, default=None, metavar="B", help=EDGE_BAND_HELP)
    parser.add_argument("--channel", type=non_negative_int, default=0,
                        help="image channel of multi-channel cases (default 0)")
    parser.add_argument(
        "--scribble-orientation", choices=ORIENTATION_CHOICES, default="axial",
        help="plane of the simulated scribble of scribble+clicks (default axial; oblique is tilted 35 degrees)",
    )
    parser.add_argument("--scribble-source", choices=("skeleton", "contour"), default="skeleton")
    parser.add_argument(
        "--scribble-jitter", type=non_negative_mm, default=0.0, metavar="MM", help="hand jitter in mm (default 0)"
    )
    parser.add_argument("--json", required=True, metavar="OUT", help="where to write the results")
    parser.add_argument("--overwrite", action="store_true", help="replace --json when it exists")
    parser.set_defaults(func=run_eval)
    return parser


def _progress(line: str) -> None:
    """A line of eval's progress: ``warning:`` lines on stderr, as the other commands', the rest on stdout."""
    print(line, file=sys.stderr if line.startswith("warning:") else sys.stdout, flush=True)


def _summary_line(result: dict) -> None:
    s = result["summary"]
    if s.get("records"):
        dice = s["mean_dice"]
        noc = ", ".join(f"NoC@{k} {v:.2f} ({s['fraction_reached'][k]:.0%} reached)" for k, v in s["mean_noc"].items())
        print(
            f"{s['records']} records, {len(result['skipped'])} skipped; mean Dice first {dice[0]:.3f}, "
            f"last {dice[-1]:.3f}; {noc}; median latency {s['median_latency_s']:.3f} s; "
            f"peak RSS {s['max_peak_rss_mb']:.0f} MB"
        )
    else:
        print(f"no records ({len(result['skipped'])} skipped)", file=sys.stderr)


def run_eval(args: argparse.Namespace) -> int:
    from SegAssistLib.errors import SegAssistError
    from SegAssistLib.evaluation.runner import (
        EvalConfig,
        EvaluationInterrupted,
        check_json_output,
        evaluate,
        parse_targets,
        write_json,
    )
    from SegAssistLib.evaluation.scribbles import ScribbleSpec

    check_json_output(args.json, args.overwrite)  # before the evaluation, not after it
    if not Path(args.dataset_dir).is_dir():
        raise SegAssistError(f"dataset folder not found: {args.dataset_dir}")

    config = EvalConfig(
        dataset_dir=args.dataset_dir,
        targets=parse_targets(args.labels) if args.labels is not None else None,
        protocol=args.protocol,
        max_clicks=args.max_clicks,
        cases=args.cases,
        split=args.split,
        engine=args.engine,
        model=args.model,
        device=args.device,
        refine_depth=args.refine_depth,
        correction_zoom_share=args.correction_zoom_share,
        edge_band=args.edge_band,
        channel=args.channel,
        scribble=ScribbleSpec(args.scribble_orientation, args.scribble_source, args.scribble_jitter),
    )
    try:
        result = evaluate(config, progress=_progress)
    except EvaluationInterrupted as stop:  # Ctrl-C: the cases finished are written, marked as partial
        path = write_json(stop.partial, args.json, overwrite=args.overwrite)
        print(f"{stop.partial['config']['interrupted']}: partial results written to {path}", file=sys.stderr)
        raise KeyboardInterrupt from None
    _summary_line(result)
    path = write_json(result, args.json, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0 if result["summary"].get("records") else 1
