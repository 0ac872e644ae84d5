"""Write Resources/splits.json: the fixed evaluation split (run once; the file is committed).

Rule: group cases by patient, sort the groups, and put every 5th group (index 0, 5, 10, ...) in the
evaluation split. Exceptions for tiny datasets are named below.

totalsegmentator_examples: aorta_crop and pulmonary_crop are crops of one CT scan (the same
origin in-plane, 36 mm apart along z, overlapping): both are training cases. Until 2026-11-24
aorta_crop was an evaluation case while v0.3.0 trained on pulmonary_crop, i.e. on most of the
aorta crop's image (not its aorta label).
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from SegAssistLib.cli import run_script
from SegAssistLib.datasets import SPLITS_FILE, default_data_root, list_cases, patient_of

SPECIAL = {
    "brats": ["brats_2013_pat0001_1", "brats_2013_pat0004_1"],
    "totalsegmentator_examples": ["example_ct_sm"],  # the two crops share a scan (see above)
    "brain_structures": ["itksnap_mricrop"],
}

# not __doc__: the docstring is the rule the split file records, so it must stay as it is
USAGE = """Compute Resources/splits.json's evaluation split from the datasets (see the rule below).

Without --write or --check it prints a summary of what it would write and how that differs from the
committed file; --write replaces the committed file (a new split changes every evaluation result);
--check exits 1 when what it would write differs from the committed file."""


def evaluation_split(data_root: Path) -> Dict[str, List[str]]:
    """Dataset folder name -> its evaluation cases, by the rule of the module's docstring."""
    evaluation = {}
    for folder in sorted(p for p in data_root.iterdir() if (p / "imagesTr").is_dir()):
        cases = list_cases(folder)
        if folder.name in SPECIAL:
            evaluation[folder.name] = SPECIAL[folder.name]
            continue
        groups = sorted({patient_of(c.name) for c in cases})
        chosen = {g for n, g in enumerate(groups) if n % 5 == 0}
        evaluation[folder.name] = sorted(c.name for c in cases if patient_of(c.name) in chosen)
    return evaluation


def splits(data_root: Path) -> Dict:
    """The content of the split file: the rule and the evaluation split."""
    return {"rule": __doc__.strip(), "evaluation": evaluation_split(data_root)}


def differences(new: Dict, old: Dict) -> List[str]:
    """What differs between two split files' contents, one line per dataset (empty: the same)."""
    lines = []
    if new.get("rule") != old.get("rule"):
        lines.append("rule: the text differs (the docstring of scripts/make_splits.py)")
    new_eval, old_eval = new.get("evaluation", {}), old.get("evaluation", {})
    for name in sorted(set(new_eval) | set(old_eval)):
        if name not in old_eval:
            lines.append(f"{name}: not in the committed file ({len(new_eval[name])} evaluation cases here)")
        elif name not in new_eval:
            lines.append(f"{name}: in the committed file, not in the data")
        elif new_eval[name] != old_eval[name]:
            added = sorted(set(new_eval[name]) - set(old_eval[name]))
            removed = sorted(set(old_eval[name]) - set(new_eval[name]))
            lines.append(f"{name}: {len(added)} evaluation case(s) added {added[:5]}, {len(removed)} removed "
                         f"{removed[:5]}" if added or removed else f"{name}: the same cases in another order")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=USAGE, epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_root", nargs="?", type=Path, default=default_data_root(),
                        help="the datasets' folder (default: $SEGASSIST_SHARED_DATA, else ../shared/data beside "
                             "the repository; now %(default)s)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write the split to {SPLITS_FILE}")
    mode.add_argument("--check", action="store_true",
                      help="compare with the committed file: exit 0 when equal, 1 when they differ")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.data_root.is_dir():
        parser.error(f"data folder not found: {args.data_root} (give it, or set SEGASSIST_SHARED_DATA)")
    new = splits(args.data_root)
    old = json.loads(SPLITS_FILE.read_text()) if SPLITS_FILE.is_file() else {}
    diff = differences(new, old)
    if args.write:
        SPLITS_FILE.write_text(json.dumps(new, indent=1))
        for name, cases in new["evaluation"].items():
            print(f"{name}: {len(cases)} evaluation cases")
        print(f"written: {SPLITS_FILE}" + ("" if diff else " (unchanged)"))
        return 0
    if args.check:
        if diff:
            print(f"{SPLITS_FILE} differs from the split of {args.data_root}:", *diff, sep="\n  ")
            return 1
        print(f"{SPLITS_FILE} matches the split of {args.data_root}")
        return 0
    for name, cases in new["evaluation"].items():
        print(f"{name}: {len(cases)} evaluation cases")
    if diff:
        print(f"differs from {SPLITS_FILE}:", *diff, sep="\n  ")
    else:
        print(f"the same as {SPLITS_FILE}")
    print("nothing written (--write to write the file, --check to compare and exit 1 on a difference)")
    return 0


if __name__ == "__main__":  # bad input (an incomplete dataset folder) is one line, not a traceback
    sys.exit(run_script(main, "make_splits.py"))
