"""The torch-free parts run in Python 3.9 (the oldest Python of a supported 3D Slicer).

Two checks: a static one everywhere (``vermin`` reads the source of every module Slicer's Python
imports and reports the oldest Python that runs it), and a real one where a Python 3.9 with
numpy, requests, pydantic and zstandard is at hand: that interpreter drives a session on a real
loopback server (every prompt kind, undo, redo, the full result, the learning client's errors).
Point ``SEGASSIST_PYTHON39`` at it, for example::

    python3.9 -m venv /tmp/py39 && /tmp/py39/bin/pip install -r SegAssist/Resources/requirements.txt
    SEGASSIST_PYTHON39=/tmp/py39/bin/python make test
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
from test_server_fixtures import TOKENS

pytest_plugins = ["test_server_fixtures"]

REPO = Path(__file__).resolve().parents[2]
LIB = REPO / "SegAssistLib"
#: what Slicer's own Python imports: the client, prompts, geometry, IO and the Slicer logic
TORCH_FREE = [
    "client", "slicer", "prompts.py", "prompt_log.py", "stroke_voxels.py", "prompt_limits.py", "api_models.py",
    "api_learning.py", "transport.py", "image.py", "rasterize.py", "errors.py", "io.py", "files.py", "engine/base.py",
    "headless.py", "prompt_mirror.py",
]  # fmt: skip


def test_torch_free_modules_run_on_python_39():
    vermin = shutil.which("vermin", path=str(Path(sys.executable).parent)) or shutil.which("vermin")
    if vermin is None:
        pytest.skip("vermin is not installed (it is pinned in requirements.lock: run make setup)")
    paths = [str(LIB / p) for p in TORCH_FREE]
    out = subprocess.run(
        [vermin, "--no-tips", "--eval-annotations", "--target=3.9-", "--violations", *paths],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, f"code that needs a Python newer than 3.9:\n{out.stdout}\n{out.stderr}"


def _python39() -> Optional[str]:
    candidates = [os.environ.get("SEGASSIST_PYTHON39"), shutil.which("python3.9")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python")))
    for exe in candidates:
        if not exe or not os.access(exe, os.X_OK):
            continue
        probe = "import sys, numpy, requests, pydantic; print(sys.version_info[:2] == (3, 9))"
        ok = subprocess.run([exe, "-c", probe], capture_output=True, text=True, timeout=120)
        if ok.returncode == 0 and ok.stdout.strip() == "True":
            return exe
    return None


CLIENT_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from SegAssistLib.client import SegAssistClient
from SegAssistLib.client.errors import LearningDisabledError
from SegAssistLib.image import Volume
from SegAssistLib.prompts import BoxPrompt, LassoPrompt, PointPrompt, ScribblePrompt

shape = (24, 40, 48)
k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
blob = ((k / 0.6) ** 2 + (j / 0.5) ** 2 + (i / 0.45) ** 2) < 1
rng = np.random.default_rng(0)
volume = Volume((blob * 200 + rng.normal(0, 20, shape)).astype(np.float32), spacing=(1.0, 1.0, 1.5))
out = {"python": list(sys.version_info[:3])}
with SegAssistClient(sys.argv[2], sys.argv[3], timeout=(5.0, 120.0)) as client:
    with client.open_session(volume) as session:
        session.add_prompt(PointPrompt(position=(24.0, 20.0, 12.0)))
        session.add_prompt(BoxPrompt(min_corner=(10.0, 8.0, 12.0), max_corner=(38.0, 32.0, 12.0)))
        session.add_prompt(ScribblePrompt(points=[(20.0, 18.0, 12.0), (28.0, 22.0, 12.0)], positive=False))
        session.add_prompt(LassoPrompt(points=[(14.0, 10.0, 8.0), (34.0, 10.0, 8.0), (24.0, 30.0, 8.0)]))
        session.undo()
        session.redo()
        local = session.result()
        out["result_matches_server"] = bool(np.array_equal(local, session.fetch_result()))
        out["n_prompts"] = len(session.prompt_log().prompts)
        out["foreground"] = int(local.sum())
    try:
        client.learning.status()
    except LearningDisabledError as exc:
        out["learning_error"] = exc.code
out["torch_loaded"] = "torch" in sys.modules
print(json.dumps(out))
"""


def test_a_real_python_39_drives_a_session_on_a_real_server(shared_server, tmp_path):
    exe = _python39()
    if exe is None:
        pytest.skip("no Python 3.9 with numpy, requests and pydantic: set SEGASSIST_PYTHON39 (see module docstring)")
    script = tmp_path / "client39.py"
    script.write_text(CLIENT_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    run = subprocess.run(
        [exe, str(script), str(REPO), shared_server.url, TOKENS["alice"]],
        capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["python"][:2] == [3, 9]
    assert out["result_matches_server"] and out["n_prompts"] == 4 and out["foreground"] > 0
    assert out["learning_error"] == "learning_disabled" and not out["torch_loaded"]
