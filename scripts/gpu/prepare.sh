#!/usr/bin/env bash
# Prepare what a GPU machine without ../shared and without PyPI needs to train (docs/training.md):
#   .pack/a, .pack/b  the training split as two training packs, each small enough to travel in one
#                     device call beside the repository (64 MiB a call)
#   .whl/             wheels of the training path's pure-Python dependencies the machine lacks
# Both folders are ignored by git (.git/info/exclude). Run from the repository root: bash scripts/gpu/prepare.sh
# The wheels are for the GPU machine's Python (pydantic-core is compiled): GPU_PYTHON_VERSION, default 3.12.
set -euo pipefail
DATA=${1:-../shared/data}
PY=${PYTHON:-.venv/bin/python}
GPU_PY=${GPU_PYTHON_VERSION:-3.12}
for entry in /.pack/ /.whl/; do
  grep -qx "$entry" .git/info/exclude || echo "$entry" >> .git/info/exclude
done
rm -rf .pack .whl
"$PY" -m SegAssistLib.training pack-training "$DATA" .pack/a \
  --datasets left_atrium,brain_structures,sunnybrook,totalsegmentator_examples
"$PY" -m SegAssistLib.training pack-training "$DATA" .pack/b --datasets acdc,brats,hippocampus
# the versions of requirements.lock (pydantic's own dependencies as the lock's pydantic resolves them)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "monai==$(grep -oP '^monai==\K.*' requirements.lock)" "pydantic==$(grep -oP '^pydantic==\K.*' requirements.lock)" \
  "pydantic-core==$("$PY" -c 'import importlib.metadata as m; print(m.version("pydantic-core"))')" \
  "annotated-types==$("$PY" -c 'import importlib.metadata as m; print(m.version("annotated-types"))')" \
  "typing-inspection==$("$PY" -c 'import importlib.metadata as m; print(m.version("typing-inspection"))')"
du -sh .pack/a .pack/b .whl
