"""The adapter registry's bookkeeping on its own (no training): version numbers never reuse a file on
disk, and one step back after going forward again returns to the version left behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from learning_fixtures import tiny_checkpoint

from SegAssistLib.learning.registry import AdapterRegistry, VersionRecord


def add(registry: AdapterRegistry, content: bytes = b"", base_identity: str = "base-1") -> VersionRecord:
    def writer(path: Path, version_id: str) -> None:
        registry.write_file(path, lambda tmp: Path(tmp).write_bytes(content or version_id.encode()))

    fields = dict(base_identity=base_identity, val_dice=0.8, incumbent=None, incumbent_dice=0.7)
    return registry.add_version("salt", writer, fields, promote=True, expected_current=registry.read().current)


def test_a_file_the_registry_does_not_list_is_kept_and_its_number_skipped(tmp_path: Path):
    """A registry restored from an older copy (or a writer killed after its rename) leaves version files
    the registry does not list; the next version takes a free number instead of deleting one."""
    registry = AdapterRegistry(tmp_path)
    assert add(registry).id == "v1"
    backup = registry.path.read_bytes()
    assert add(registry, content=b"the annotators' v2").id == "v2"
    registry.path.write_bytes(backup)  # the registry as it was before v2
    (registry.folder / "v3-lora.pt").write_bytes(b"an unrecorded v3")  # another kind: still v3's number
    third = add(registry)
    assert third.id == "v4" and registry.file_path(third).read_bytes() == b"v4"
    assert (registry.folder / "v2-salt.pt").read_bytes() == b"the annotators' v2"
    assert (registry.folder / "v3-lora.pt").read_bytes() == b"an unrecorded v3"
    assert [v.id for v in registry.versions()] == ["v1", "v4"] and registry.read().current == "v4"


def test_going_forward_after_a_rollback_keeps_the_older_version_one_step_back(tmp_path: Path):
    registry = AdapterRegistry(tmp_path)
    add(registry)
    add(registry)
    assert registry.rollback(to="v1").id == "v1" and registry.get("v2").status == "rolled_back"
    assert registry.rollback(to="v2").id == "v2"
    assert registry.get("v1").status == "promoted"  # left behind by going forward, not judged worse
    assert registry.rollback().id == "v1"  # one step back: v1, not the base model
    assert registry.get("v2").status == "rolled_back"
    assert registry.rollback() is None and registry.get("v1").status == "rolled_back"
    # a version rolled back because it was worse stays out of "one step back"
    add(registry)
    assert registry.read().current == "v3" and registry.rollback() is None


def test_one_step_back_never_returns_a_version_a_rollback_skipped(tmp_path: Path):
    """v1 and v2 in service, the operator goes back to the base model, a new v3 wins over the base
    model: one step back from v3 is the base model, not v1, which the operator took out of service."""
    registry = AdapterRegistry(tmp_path)
    add(registry)
    add(registry)
    assert registry.rollback(to="base") is None
    assert [v.status for v in registry.versions()] == ["rolled_back", "rolled_back"]
    add(registry)
    assert registry.rollback() is None and registry.read().current is None
    # named, a skipped version can still come back (and a step back from it goes past it)
    assert registry.rollback(to="v1").id == "v1" and registry.get("v1").status == "promoted"
    assert registry.rollback() is None


def test_the_command_line_rolls_back_only_to_versions_of_the_loaded_base_model(tmp_path: Path, capsys):
    import argparse

    import pytest

    from SegAssistLib.learning import Datastore
    from SegAssistLib.learning.cli import register
    from SegAssistLib.learning.loop_errors import RegistryError

    Datastore(tmp_path).close()
    checkpoint = tiny_checkpoint(tmp_path / "tiny.pt")
    registry = AdapterRegistry(tmp_path)
    add(registry)  # made for "base-1", not for the tiny checkpoint
    parser = argparse.ArgumentParser(prog="segassist")
    register(parser.add_subparsers(dest="command"))

    def rollback(*argv: str) -> int:
        args = parser.parse_args(["learn", "rollback", "--store", str(tmp_path), *argv])
        return args.func(args)

    assert rollback("--to", "base") == 0 and registry.read().current is None
    with pytest.raises(RegistryError, match="belongs to base model base-1"):
        rollback("--to", "v1", "--checkpoint", str(checkpoint))
    assert registry.read().current is None
    from learning_fixtures import promote_base_weights

    promote_base_weights(registry, checkpoint)  # v2, now current: made for these weights, and loadable
    assert rollback("--to", "base") == 0
    assert rollback("--to", "v2", "--checkpoint", str(checkpoint)) == 0 and registry.read().current == "v2"
    assert "current version: v2" in capsys.readouterr().out


def test_leftovers_of_a_writer_killed_mid_write_are_swept_under_the_registry_lock(tmp_path: Path):
    """A job stopped by its watchdog (``os._exit``) can leave a half-written version or registry file;
    every registry write holds the registry's lock, so under it such a file is a leftover."""
    registry = AdapterRegistry(tmp_path)
    add(registry)
    leftovers = [registry.folder / ".tmp-0123456789ab-v2-salt.pt", registry.folder / ".tmp-ba9876543210-registry.json"]
    for path in leftovers:
        path.write_bytes(b"half written")
    assert add(registry).id == "v2" and registry.file_path(registry.get("v2")).read_bytes() == b"v2"
    assert not any(path.exists() for path in leftovers)
    assert sorted(p.name for p in registry.folder.iterdir() if not p.name.startswith(".")) == [
        "registry.json", "v1-salt.pt", "v2-salt.pt"
    ]


def test_one_step_back_stays_with_the_base_model_of_the_current_version(tmp_path: Path):
    """One step back once skipped every version not made for the base model the command line loaded
    (the shipped one, without --checkpoint): on a store trained with another checkpoint it quietly
    landed on the base model. It goes to the previous version of the current one's base weights, and
    refuses, as ``--to`` does, one that the loaded base model cannot run."""
    import argparse

    import pytest

    from SegAssistLib.engine.network import load_checkpoint
    from SegAssistLib.learning import Datastore
    from SegAssistLib.learning.cli import register
    from SegAssistLib.learning.loop_errors import RegistryError

    Datastore(tmp_path).close()
    checkpoint = tiny_checkpoint(tmp_path / "tiny.pt")
    identity = load_checkpoint(checkpoint).identity
    registry = AdapterRegistry(tmp_path)
    from learning_fixtures import promote_base_weights

    promote_base_weights(registry, checkpoint)  # v1: loadable, as a rollback to it builds it first
    promote_base_weights(registry, checkpoint, expected_current="v1")  # v2, current
    parser = argparse.ArgumentParser(prog="segassist")
    register(parser.add_subparsers(dest="command"))

    def rollback(*argv: str) -> int:
        args = parser.parse_args(["learn", "rollback", "--store", str(tmp_path), *argv])
        return args.func(args)

    with pytest.raises(
        RegistryError, match=f"from v2 is version v1, which belongs to base model {identity}.*--checkpoint"
    ):
        rollback()  # checked against the shipped base model: not quietly the base model
    with pytest.raises(RegistryError, match=f"v1 belongs to base model {identity}.*--checkpoint"):
        rollback("--to", "v1")  # the same answer as naming the version
    assert registry.read().current == "v2" and registry.get("v2").status == "promoted"
    assert rollback("--checkpoint", str(checkpoint)) == 0 and registry.read().current == "v1"
    # a version made for other base weights is never one step back from the current one
    add(registry, base_identity="base-2")  # v3, current
    assert registry.rollback() is None and registry.get("v1").status == "promoted"
    assert registry.rollback(to="v3").id == "v3"
    add(registry, base_identity=identity)  # v4, current: one step back skips v3 (another base model)
    assert registry.rollback(base_identity=identity).id == "v1"


def test_a_damaged_registry_is_corrupt_data_and_a_newer_one_is_never_set_aside(tmp_path: Path):
    import json

    import pytest

    from SegAssistLib.learning.errors import CorruptDataError
    from SegAssistLib.learning.loop_errors import RegistryError

    registry = AdapterRegistry(tmp_path)
    add(registry)
    good = registry.path.read_text()
    for damaged in ("[]", '{"format": "segassist-adapter-registry", "format_version": 1, "versions": [{"id": 3}]}'):
        registry.path.write_text(damaged)
        with pytest.raises(CorruptDataError, match="adapters/registry.json"):
            registry.read()
    registry.path.write_text(json.dumps(dict(json.loads(good), format_version=99)))
    with pytest.raises(RegistryError, match="upgrade SegAssist") as refused:
        registry.rollback(to="base")
    assert not isinstance(refused.value, CorruptDataError)
    assert json.loads(registry.path.read_text())["format_version"] == 99  # a newer SegAssist's file: untouched
    assert not list(registry.folder.glob("registry.damaged-*"))


def test_a_registry_whose_current_version_is_not_among_its_versions_is_damaged_and_base_recovers(tmp_path: Path):
    """It parsed, so it was never set aside: status and ``rollback --to base`` both failed with "no adapter
    version 'v1'", and nothing but editing the file by hand got the store going again."""
    import json

    import pytest

    from SegAssistLib.learning.loop_errors import CorruptRegistryError

    registry = AdapterRegistry(tmp_path)
    add(registry)
    good = json.loads(registry.path.read_text())
    record = good["versions"][0]
    damaged = (
        dict(good, current="v7"),  # current names a version the file does not hold
        dict(good, versions=[record, dict(record, file="v1-other.pt")]),  # two records of one version
    )
    for n, data in enumerate(damaged):
        registry.path.write_text(json.dumps(data))
        with pytest.raises(CorruptRegistryError, match="adapters/registry.json is damaged.*rollback --to base"):
            registry.read()
        with pytest.raises(CorruptRegistryError):
            registry.current()
        assert registry.rollback(to="base") is None  # sets it aside and starts a new one
        state = registry.read()
        assert state.current is None and state.versions == [] and state.events[-2]["action"] == "set_aside"
        assert len(list(registry.folder.glob("registry.damaged-*.json"))) == n + 1  # also within one second
        assert (registry.folder / record["file"]).is_file()  # version files are kept
        registry.path.write_text(json.dumps(good))


def test_the_command_line_recovers_a_registry_whose_current_version_is_missing(tmp_path: Path, capsys):
    import json

    from SegAssistLib.cli import main
    from SegAssistLib.learning import Datastore

    Datastore(tmp_path).close()
    registry = AdapterRegistry(tmp_path)
    registry.folder.mkdir()
    registry.path.write_text(json.dumps(
        {"format": "segassist-adapter-registry", "format_version": 1, "current": "v1", "versions": []}
    ))  # fmt: skip
    store = ["--store", str(tmp_path)]
    for command in ("status", "versions"):
        assert main(["learn", command, *store]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1
        assert "its current version 'v1' is not among its versions" in err and "rollback --to base" in err
    assert main(["learn", "rollback", "--to", "base", *store]) == 0
    assert "current version: base" in capsys.readouterr().out
    assert main(["learn", "status", *store]) == 0 and "current version: base" in capsys.readouterr().out
    assert len(list(registry.folder.glob("registry.damaged-*.json"))) == 1


def test_a_rollback_from_a_version_a_job_replaced_meanwhile_is_refused_and_changes_nothing(tmp_path: Path):
    """The operator saw v1 current and rolled it back one step while a job promoted v2: one step back from v2
    put v1, the version meant to go, back in service and retired the new v2. With the version the operator
    saw (``expected_current``) the rollback is refused, naming both, and the registry is left as it was."""
    import pytest

    from SegAssistLib.learning.loop_errors import CorruptRegistryError, RegistryError

    registry = AdapterRegistry(tmp_path)
    add(registry)
    seen = registry.read().current
    assert seen == "v1"  # the operator decides to take v1 out of service ...
    add(registry)  # ... and a training job promotes v2 before the rollback runs
    before = registry.path.read_bytes()
    for to in (None, "base", "v1"):
        with pytest.raises(RegistryError, match="the current version is v2, not v1 as expected.*nothing was rolled"):
            registry.rollback(to=to, user="operator", expected_current=seen)
        assert registry.path.read_bytes() == before  # not a status, not an event changed
    with pytest.raises(RegistryError, match="the current version is v2, not base as expected"):
        registry.rollback(to="v1", expected_current="base")
    # from the version current now it goes through, and says which version it replaced
    done = registry.rollback_detailed(expected_current="v2", user="operator")
    assert done.previous == "v2" and done.record.id == "v1" and registry.get("v2").status == "rolled_back"
    event = registry.read().events[-1]
    assert (event["action"], event["from"], event["to"], event["user"]) == ("rollback", "v2", "v1", "operator")
    assert registry.rollback(to="base", expected_current="v1") is None
    assert registry.rollback(to="v2", expected_current="base").id == "v2"  # the base model: "base"
    assert registry.rollback_detailed(to="base").previous == "v2"  # without a check: the same as before
    # a registry that cannot be read has no current version to compare: refused, and not set aside
    registry.path.write_text("{not json")
    with pytest.raises(CorruptRegistryError):
        registry.rollback(to="base", expected_current="v2")
    assert registry.path.read_text() == "{not json" and not list(registry.folder.glob("registry.damaged-*"))


def test_the_command_line_rolls_back_from_the_version_named_or_refuses_and_says_what_it_replaced(
    tmp_path: Path, capsys
):
    """``learn rollback`` (one step back) said only "current version: v1": after a job had promoted v2 just
    before it ran, the operator was not told that v2, not v1, was the version taken out. It names both, and
    ``--from`` refuses (exit 2, as other refusals) when the version named is no longer current."""
    import json

    import pytest

    from SegAssistLib.cli import main
    from SegAssistLib.engine.network import load_checkpoint
    from SegAssistLib.learning import Datastore

    Datastore(tmp_path).close()
    checkpoint = tiny_checkpoint(tmp_path / "tiny.pt")
    identity = load_checkpoint(checkpoint).identity
    registry = AdapterRegistry(tmp_path)
    from learning_fixtures import promote_base_weights

    for current in (None, "v1", "v2"):  # loadable versions: a rollback builds its target first
        promote_base_weights(registry, checkpoint, expected_current=current)  # v3 current at the end
    assert registry.get("v3").base_identity == identity
    store = ["--store", str(tmp_path), "--checkpoint", str(checkpoint)]
    before = registry.path.read_bytes()
    assert main(["learn", "rollback", *store, "--from", "v2"]) == 2  # the operator saw v2; a job promoted v3
    out, err = capsys.readouterr()
    assert "error: the current version is v3, not v2 as expected" in err and err.count("\n") == 1, err
    assert registry.path.read_bytes() == before
    assert main(["learn", "rollback", *store, "--from", "v3"]) == 0
    assert "current version: v2 (rolled back from v3)" in capsys.readouterr().out
    assert main(["learn", "rollback", *store, "--json"]) == 0  # no --from: whatever is current, named
    assert json.loads(capsys.readouterr().out) == {"current": "v1", "previous": "v2"}
    assert main(["learn", "rollback", *store, "--to", "v3", "--from", "v1"]) == 0 and registry.read().current == "v3"
    for bad in ("3", "V3", "v3 "):
        with pytest.raises(SystemExit) as stopped:
            main(["learn", "rollback", *store, "--from", bad])
        assert stopped.value.code == 2 and "a version id such as v3, or 'base'" in capsys.readouterr().err
    assert registry.read().current == "v3"


# A process (argv: datastore root, its name) adding 10 versions to one registry, each promoted against the
# current version it read, and rolling back one step after every third, as trainers and operators do
_BUSY_PROCESS = """
import sys
from pathlib import Path
from SegAssistLib.learning.loop_errors import RegistryError
from SegAssistLib.learning.registry import AdapterRegistry
registry, me = AdapterRegistry(sys.argv[1]), sys.argv[2]
for i in range(10):
    current = registry.read().current
    def writer(path, version_id):
        registry.write_file(path, lambda tmp: Path(tmp).write_text(f"{version_id} by {me}"))
    fields = {"base_identity": "base-1", "val_dice": 0.5, "incumbent": current, "incumbent_dice": 0.4}
    print(registry.add_version("lora", writer, fields, promote=True, expected_current=current).id, flush=True)
    if i % 3 == 2:
        try:
            registry.rollback()
        except RegistryError:  # another process's rollback took the registry back to the base model
            print("refused", flush=True)
"""


def test_processes_adding_and_rolling_back_versions_at_once_lose_no_update(tmp_path: Path):
    import subprocess
    import sys

    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    processes = [subprocess.Popen([sys.executable, "-c", _BUSY_PROCESS, str(tmp_path), f"p{i}"], **pipes)
                 for i in range(4)]  # fmt: skip
    try:
        outputs = [process.communicate(timeout=120) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert [p.returncode for p in processes] == [0] * 4, [err[-2000:] for _, err in outputs]
    lines = [(f"p{i}", line) for i, (out, _) in enumerate(outputs) for line in out.split()]
    added = {line: name for name, line in lines if line != "refused"}
    refused = sum(line == "refused" for _, line in lines)
    registry = AdapterRegistry(tmp_path)
    state = registry.read()
    assert sorted(v.number for v in state.versions) == list(range(1, 41)) and len(added) == 40
    assert all(registry.file_path(v).read_text() == f"{v.id} by {added[v.id]}" for v in state.versions)
    # every change started from the current version the one before it left: none was lost
    assert [e["from"] for e in state.events] == [None] + [e["to"] for e in state.events[:-1]]
    assert state.events[-1]["to"] == state.current
    assert sum(e["action"] == "rollback" for e in state.events) + refused == 12
    assert sorted(p.name for p in registry.folder.iterdir()) == sorted(
        [".registry.lock", "registry.json", *(v.file for v in state.versions)]
    )  # no temporary file left


def test_a_rollback_to_the_version_already_current_changes_nothing_and_exits_2(tmp_path: Path, capsys):
    """``learn rollback --to base`` while the base model answered printed "current version: base (rolled back
    from base)" and exited 0 (plain ``rollback`` there: "nothing to roll back", exit 2); after recovering a
    damaged registry it also said "rolled back from base", the version the file named being unknown."""
    import json

    import pytest

    from SegAssistLib.cli import main
    from SegAssistLib.learning import Datastore
    from SegAssistLib.learning.loop_errors import RegistryError

    Datastore(tmp_path).close()
    store = ["--store", str(tmp_path)]
    registry = AdapterRegistry(tmp_path)
    for argv in ([], ["--to", "base"], ["--to", "base", "--from", "base"]):
        assert main(["learn", "rollback", *store, *argv]) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and "nothing to roll back" in err and err.count("\n") == 1, (argv, err)
    assert registry.read().events == []  # nothing recorded
    add(registry)  # v1, current
    before = registry.path.read_text()
    with pytest.raises(RegistryError, match="v1 is already current: nothing to roll back"):
        registry.rollback_detailed(to="v1", require_change=True)
    assert registry.path.read_text() == before
    assert registry.rollback_detailed(to="v1").previous == "v1"  # the library's default: as before, recorded
    assert main(["learn", "rollback", *store, "--to", "base"]) == 0
    assert "current version: base (rolled back from v1)" in capsys.readouterr().out

    registry.path.write_text(json.dumps(dict(json.loads(registry.path.read_text()), current="v7")))  # damaged
    assert main(["learn", "rollback", *store, "--to", "base", "--json"]) == 0  # recovered: a change
    reply = json.loads(capsys.readouterr().out)
    aside = reply["set_aside"]
    assert reply["current"] is None and reply["previous"] is None and (registry.folder / aside).is_file(), reply
    assert main(["learn", "rollback", *store, "--to", "base"]) == 2  # and now nothing to roll back
    assert "base is already current: nothing to roll back" in capsys.readouterr().err


def test_a_rollback_whose_check_refuses_the_target_changes_nothing(tmp_path: Path):
    """A server loads the target before a rollback is recorded (``check``): a version it cannot load once
    became current all the same, while its workers went on answering with the one it replaced."""
    registry = AdapterRegistry(tmp_path)
    add(registry)
    add(registry)
    before = registry.path.read_bytes()
    checked = []

    def cannot_load(record: VersionRecord) -> None:
        checked.append(record.id)
        raise RuntimeError(f"{record.id} does not load")

    for to in ("v1", None):  # named, and one step back
        with pytest.raises(RuntimeError, match="v1 does not load"):
            registry.rollback_detailed(to, user="alice", check=cannot_load)
    assert checked == ["v1", "v1"] and registry.path.read_bytes() == before  # nothing written
    assert registry.rollback_detailed("base", check=cannot_load).record is None  # the base model: not checked
    assert checked == ["v1", "v1"]
    assert registry.rollback_detailed("v2", check=checked.append).record.id == "v2" and checked[-1].id == "v2"


def test_a_terminal_rollback_to_a_version_that_cannot_load_is_refused_and_changes_nothing(
    tmp_path: Path, tiny_checkpoint: Path, capsys
):
    """``learn rollback`` checked only the version's base model: a version whose file was damaged became
    current, and every server swapping to it failed and went on answering with the version it replaced."""
    from learning_fixtures import promote_base_weights

    from SegAssistLib.cli import main
    from SegAssistLib.learning import Datastore

    Datastore(tmp_path).close()
    registry = AdapterRegistry(tmp_path)
    v1 = promote_base_weights(registry, tiny_checkpoint)
    promote_base_weights(registry, tiny_checkpoint, expected_current="v1")
    registry.file_path(v1).write_bytes(b"cut short by a full disk")
    before = registry.path.read_bytes()
    store = ["--store", str(tmp_path), "--checkpoint", str(tiny_checkpoint)]
    for argv in (["--to", "v1"], []):  # named, and one step back
        assert main(["learn", "rollback", *store, *argv]) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1, err
        assert "version v1 cannot be loaded" in err and "nothing was rolled back" in err, err
    assert registry.path.read_bytes() == before  # v2 still current, nothing recorded
    promote_base_weights(registry, tiny_checkpoint, expected_current="v2")  # v3, loadable
    assert main(["learn", "rollback", *store, "--to", "v2"]) == 0
    assert "current version: v2" in capsys.readouterr().out
