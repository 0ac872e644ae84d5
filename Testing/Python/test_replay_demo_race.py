"""``segassist demo`` without --overwrite replaces no file, also one that appears after its start-up check
(another run into the same folder finishing while the model loads): it wrote every file with
overwrite=True, so that run's results were silently replaced."""

from __future__ import annotations

import pytest

import SegAssistLib.engine.builtin as builtin
from SegAssistLib.demo import OUTPUT_NAMES, run_demo
from SegAssistLib.errors import SegAssistError


def test_a_file_that_appears_while_the_demo_runs_is_not_replaced(tmp_path, tiny_checkpoint, monkeypatch):
    out = tmp_path / "demo"
    real = builtin.load_default_engine

    def another_run_finishes_meanwhile(*args, **kwargs):  # the real engine, loaded after another run wrote
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text('{"another run": "its results"}')
        return real(*args, **kwargs)

    monkeypatch.setattr(builtin, "load_default_engine", another_run_finishes_meanwhile)
    with pytest.raises(SegAssistError, match=r"summary\.json appeared while the demo ran .*nothing written"):
        run_demo(out, model=tiny_checkpoint, overwrite=False)
    assert (out / "summary.json").read_text() == '{"another run": "its results"}'
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]  # all or none: no mix of two runs

    monkeypatch.setattr(builtin, "load_default_engine", real)
    run_demo(out, model=tiny_checkpoint, overwrite=True)  # asked for: every file replaced, none left over
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_NAMES)
    assert "another run" not in (out / "summary.json").read_text()
