"""Write Resources/splits.json: the fixed evaluation split (run once; the file is committed).

Rule: group cases by patient, sort the groups, and put every 5th group (index 0, 5, 10, ...) in the
evaluation split. Exceptions for tiny datasets are named below.

totalsegmentator_examples: aorta_crop and pulmonary_crop are crops of one CT scan (the same
origin in-plane, 36 mm apart along z, overlapping): both are training cases. Until 2026-11-24
aorta_crop was an evaluation case while v0.3.0 trained on pulmonary_crop, i.e. on most of the
aorta crop's image (not its aorta label).
"""

import json
import sys
from pathlib import Path

from SegAssistLib.datasets import SPLITS_FILE, list_cases, patient_of

SPECIAL = {
    "brats": ["brats_2013_pat0001_1", "brats_2013_pat0004_1"],
    "totalsegmentator_examples": ["example_ct_sm"],  # the two crops share a scan (see above)
    "brain_structures": ["itksnap_mricrop"],
}


def main(data_root: Path) -> None:
    evaluation = {}
    for folder in sorted(p for p in data_root.iterdir() if (p / "imagesTr").is_dir()):
        cases = list_cases(folder)
        if folder.name in SPECIAL:
            evaluation[folder.name] = SPECIAL[folder.name]
            continue
        groups = sorted({patient_of(c.name) for c in cases})
        chosen = {g for n, g in enumerate(groups) if n % 5 == 0}
        evaluation[folder.name] = sorted(c.name for c in cases if patient_of(c.name) in chosen)
    SPLITS_FILE.write_text(json.dumps({"rule": __doc__.strip(), "evaluation": evaluation}, indent=1))
    for name, cases in evaluation.items():
        print(f"{name}: {len(cases)} evaluation cases")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data"))
