"""``segassist train``: argument parsing only; torch and MONAI are imported when it runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

from SegAssistLib.datasets import default_data_root
from SegAssistLib.errors import SegAssistError
from SegAssistLib.files import atomic_write_bytes


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train the built-in network (CPU or GPU)")
    p.add_argument("--out", required=True, type=Path, help="run folder: state.pt, model.pt, log.jsonl")
    p.add_argument("--config", type=Path, help="JSON file with TrainConfig fields")
    p.add_argument("--minutes", type=float,
                   help="the run's total wall-clock budget, including earlier sessions of a resumed run "
                        "(overrides the config)")
    p.add_argument("--data-root", help="folder of datasets in MSD layout, or a training pack (default: "
                   "$SEGASSIST_SHARED_DATA, else ../shared/data beside the repository)")
    p.add_argument("--resume", type=Path, help="state.pt of an earlier run")
    p.add_argument("--seed", type=int, help="the seed of every random draw (overrides the config)")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run folder that already holds weights (they are replaced)")
    p.set_defaults(func=run_train)

    p = subparsers.add_parser(
        "pack-training",
        help="pack the training split into a small folder that travels (for a GPU machine without ../shared)",
    )
    p.add_argument("data_root", type=Path, help="folder of datasets in MSD layout (for example ../shared/data)")
    p.add_argument("out", type=Path, help="new folder for the pack; train with --data-root OUT")
    p.add_argument("--patch", type=int, default=64,
                   help="the network patch the pack serves (default 64): another patch size needs its own pack")
    p.add_argument("--datasets", help="comma-separated dataset folder names (default: all)")
    p.set_defaults(func=run_pack)


def load_config(path: Optional[Path], fields: Optional[dict] = None):
    """The TrainConfig of a JSON file, or of ``fields`` (a resumed run's own), else the defaults;
    SegAssistError naming the problem."""
    from SegAssistLib.training.train import TrainConfig, config_problem

    if path is not None:
        try:
            fields = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SegAssistError(f"cannot read the training config {path}: {exc}") from exc
        where = f"training config {path}"
    elif fields is not None:
        where = "the resumed run's saved config"
    else:
        return TrainConfig()
    if not isinstance(fields, dict):
        raise SegAssistError(f"{where} must be a JSON object of TrainConfig fields")
    defaults = TrainConfig()
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise SegAssistError(f"{where}: unknown field(s) {', '.join(unknown)} "
                             f"(TrainConfig has {', '.join(sorted(known))})")
    wrong = [f"{name} ({_json_kind(value)}, not {_json_kind(getattr(defaults, name))})"
             for name, value in fields.items() if not _same_kind(value, getattr(defaults, name))]
    if wrong:
        raise SegAssistError(f"{where}: wrong type of {', '.join(wrong)}")
    fields = _whole_numbers(fields, defaults)
    for name in ("datasets", "click_union_datasets"):
        if isinstance(fields.get(name), list) and not all(isinstance(v, str) for v in fields[name]):
            raise SegAssistError(f"{where}: {name} must be a list of dataset folder names (text)")
    cfg = TrainConfig(**fields)
    # ranges, and a network the engine runs (a typo there would train the default network without a word)
    problem = config_problem(cfg)
    if problem:
        raise SegAssistError(f"{where}: {problem}")
    return cfg


def _whole_numbers(fields: dict, defaults) -> dict:
    """``fields`` with whole numbers written as such (``4.0``: JSON writers do) made ints where the field,
    or a network setting, takes one: torch refuses a float batch size or thread count."""
    out = dict(fields)
    for name, value in fields.items():
        default = getattr(defaults, name)
        if isinstance(default, int) and not isinstance(default, bool):
            out[name] = _as_int(value)
    if isinstance(fields.get("network"), dict):  # every network setting is a whole number or a list of them
        out["network"] = {key: [_as_int(v) for v in value] if isinstance(value, list) else _as_int(value)
                          for key, value in fields["network"].items()}
    return out


def _as_int(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a number"
    return {str: "text", list: "a list", dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _same_kind(value: object, default: object) -> bool:
    """A config value of the kind its field's default has (a number where a number goes; an int
    field takes only whole numbers); a field whose default is null takes null or a list."""
    if default is None:
        return value is None or isinstance(value, list)
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def check_run_folder(out: Path, resume: Optional[Path], overwrite: bool) -> None:
    """A run folder that holds weights is only continued (--resume) or replaced on request."""
    if out.exists() and not out.is_dir():
        raise SegAssistError(f"--out {out} is a file, not a run folder")
    held = [name for name in ("model.pt", "state.pt") if (out / name).exists()]
    if held and resume is None and not overwrite:
        raise SegAssistError(f"{out} already holds {' and '.join(held)} of an earlier run: continue it with "
                             f"--resume {out / 'state.pt'}, choose another --out, or pass --overwrite")
    if resume is not None and not resume.is_file():
        raise SegAssistError(f"--resume {resume}: no such checkpoint file")
    if held and resume is not None and not overwrite and not _resumes_its_own_run(out, resume):
        raise SegAssistError(f"{out} already holds {' and '.join(held)} of another run than --resume {resume}: "
                             f"continue that run with --resume {out / 'state.pt'}, choose another --out, or pass "
                             "--overwrite to replace it")


# the settings a resumed run needs to go on exactly: each batch's random draws depend on the first three
# (training.train.batch_rng and PatchStream), the CPU kernels' results on threads
EXACT_RESUME_SETTINGS = ("seed", "batch_size", "loader_workers", "threads")


def _inexact_resume(saved: object, cfg) -> List[str]:
    """Which of :data:`EXACT_RESUME_SETTINGS` ``cfg`` changes from a resumed state's saved config
    (``saved``; nothing to compare for a state without one)."""
    if not isinstance(saved, dict):
        return []
    return [f"{name} {getattr(cfg, name)!r} (the state's run had {saved[name]!r})"
            for name in EXACT_RESUME_SETTINGS if name in saved and saved[name] != getattr(cfg, name)]


def _resumes_its_own_run(out: Path, resume: Path) -> bool:
    return resume.resolve() == (out / "state.pt").resolve()


def _check_arguments(args: argparse.Namespace) -> None:
    from SegAssistLib.training.train import MAX_SEED

    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise SegAssistError(f"--seed must be from 0 to {MAX_SEED}, got {args.seed}")
    if args.minutes is not None and not args.minutes > 0:
        raise SegAssistError(f"the training budget must be more than 0 minutes, got {args.minutes}")


def run_train(args: argparse.Namespace) -> int:
    from SegAssistLib.engine.network import torch_device
    from SegAssistLib.training.train import DEFAULT_DATA_ROOT, Trainer, config_problem, read_training_state

    _check_arguments(args)
    state = None
    if args.resume is not None and args.resume.is_file():  # read and checked before anything is written
        state = read_training_state(args.resume)
    saved = state.get("config") if state is not None and args.config is None else None
    # a resumed run keeps its own settings (network, rates, ...) unless a --config is given
    cfg = load_config(args.config, saved if isinstance(saved, dict) else None)
    for name in ("minutes", "data_root", "seed", "device"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if cfg.data_root == DEFAULT_DATA_ROOT and args.data_root is None:
        cfg.data_root = str(default_data_root())  # as bench and the tests find it, from any folder
    problem = config_problem(cfg)  # the options' values as well as the config's
    if problem:
        raise SegAssistError(problem)
    if cfg.data_root and not Path(cfg.data_root).is_dir():
        raise SegAssistError(f"training data folder not found: {cfg.data_root} (--data-root)")
    if cfg.data_root:
        from SegAssistLib.engine.network import NetworkConfig

        _check_training_datasets(Path(cfg.data_root), cfg.datasets, NetworkConfig.from_dict(cfg.network).patch_size)
    torch_device(cfg.device)
    check_run_folder(args.out, args.resume, args.overwrite)
    # refuses a state that does not fit, or whose budget is spent, before anything is written
    trainer = Trainer(cfg, args.out, state)
    changed = _inexact_resume(state.get("config") if state is not None else None, cfg)
    if changed:  # a warning, not a refusal: going on from a state under other draws is a fair choice
        print(f"warning: resuming with {', '.join(changed)}: the run goes on, but no longer exactly as the "
              "interrupted run would have (each batch's random draws depend on seed, batch_size and "
              "loader_workers; the CPU's arithmetic on threads)", file=sys.stderr, flush=True)
    try:
        trainer.start()  # the loader's first batch: what it cannot read is told before anything is replaced
        args.out.mkdir(parents=True, exist_ok=True)
        # afresh, or another run's state resumed in its place: no old weights or log lines mixed with the new run's
        if args.overwrite and (args.resume is None or not _resumes_its_own_run(args.out, args.resume)):
            for name in ("model.pt", "state.pt", "log.jsonl"):
                (args.out / name).unlink(missing_ok=True)
        atomic_write_bytes(args.out / "config.json", json.dumps(asdict(cfg), indent=1).encode(), overwrite=True)
    except BaseException:
        trainer.close()
        raise
    trainer.run()
    return 0


def _check_training_datasets(data_root: Path, wanted: Optional[list], patch: int) -> None:
    """A folder without datasets (a dataset's own folder given for the data root, a typo in
    ``datasets``) trained on synthetic volumes alone, with no word but an empty count; a pack cut
    for another network patch, a damaged pack file, a pack holding evaluation cases or an incomplete
    dataset folder failed in the loader, in a worker's traceback, after the run folder was written."""
    from SegAssistLib.training.data import check_training_data

    found = check_training_data(data_root, wanted, patch)
    if not found:
        raise SegAssistError(f"{data_root} holds no dataset folders (each with imagesTr/) and no training packs: "
                             "give the folder that holds the datasets (--data-root), or data_root '' for "
                             "synthetic data only")
    missing = sorted(set(wanted or ()) - set(found))
    if missing:
        raise SegAssistError(f"datasets {', '.join(missing)} are not in {data_root} (it has {', '.join(found)})")


def run_pack(args: argparse.Namespace) -> int:
    from SegAssistLib.training.pack import write_pack

    datasets = [d for d in args.datasets.split(",") if d] if args.datasets else None
    summary = write_pack(args.data_root, args.out, patch=args.patch, datasets=datasets)
    print(f"packed {sum(summary.cases.values())} cases into {summary.folder}: {summary.bytes / 2**20:.1f} MiB "
          f"({summary.packed_voxels / max(summary.source_voxels, 1):.0%} of the voxels) in {summary.seconds:.0f} s")
    return 0
