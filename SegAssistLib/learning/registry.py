"""The adapter version registry: every trained version, which one is current, and rollback. Torch-free.

Layout, under the datastore root::

    adapters/registry.json        the history (below), replaced atomically on every change
    adapters/v<n>-<kind>.pt       one file per version, written once, never changed
    adapters/.registry.lock       an advisory file lock serialising read-modify-write cycles

``registry.json``::

    {"format": "segassist-adapter-registry", "format_version": 1,
     "current": "v3" | null,          # null: the base model answers
     "next_number": 4,
     "versions": [VersionRecord, ...],   # oldest first
     "events": [{"time", "action": "promote" | "reject" | "rollback" | "activate" | "set_aside", "from", "to", ...}]}

Why one JSON file and not SQLite: the registry is small, read far more often than written (the
server checks it before inference to pick up a new version), and a single atomically replaced file
can never be seen half-written. Writers (a trainer process, a rollback from the CLI or the server)
take an exclusive ``flock`` for the whole read-modify-write cycle, so concurrent changes serialise.

A version's ``status`` is ``promoted`` (it beat the version current when it was validated),
``rejected`` (it did not; its file is kept for inspection) or ``rolled_back`` (it was current and
a rollback replaced it). Only ``promoted`` and ``rolled_back`` versions can become current again.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Union

from SegAssistLib.file_locks import HAVE_FLOCK, exclusive_lock
from SegAssistLib.files import TMP_PREFIX, atomic_write, atomic_write_bytes, check_format
from SegAssistLib.learning.loop_errors import (
    CorruptRegistryError,
    OtherBaseModelError,
    RegistryError,
    VersionNotFoundError,
)

try:  # POSIX; on Windows the registry is serialised within one process only
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms CI runs
    fcntl = None  # type: ignore[assignment]

REGISTRY_FORMAT = "segassist-adapter-registry"
REGISTRY_FORMAT_VERSION = 1
FOLDER = "adapters"
BASE = "base"  # the name a user gives the base model in a rollback
MAX_EVENTS = 1000

PROMOTED = "promoted"
REJECTED = "rejected"
ROLLED_BACK = "rolled_back"
STATUSES = (PROMOTED, REJECTED, ROLLED_BACK)
# how a damaged registry is recovered (``rollback`` with ``to=BASE``)
SET_ASIDE_HINT = (
    " (`segassist learn rollback --to base` sets it aside and makes the base model current; the version files are kept)"
)


@dataclass
class VersionRecord:
    """One trained version: what it is, what it was trained and validated on, and how it did."""

    id: str  # "v<number>"
    number: int
    kind: str  # "lora", "salt" or "full"
    file: str  # file name inside the adapters folder
    base_identity: str  # weights_identity of the base model it belongs to
    created_at: float
    status: str
    val_dice: float  # the candidate's validation score (mean Dice over the simulated clicks)
    incumbent: Optional[str]  # the version it was compared with (None: the base model)
    incumbent_dice: float  # the incumbent's score on the same held-out cases, same run
    train_cases: List[str] = field(default_factory=list)
    val_cases: List[str] = field(default_factory=list)
    steps: int = 0
    train_seconds: float = 0.0
    trainable_parameters: int = 0
    trainable_share: float = 0.0
    warm_start: Optional[str] = None  # the version whose weights the training started from
    reason: str = ""
    config: Dict[str, Any] = field(default_factory=dict)
    prompt_mix: Dict[str, Any] = field(default_factory=dict)  # the simulated prompts it trained on
    job_id: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> VersionRecord:
        """A record read from the registry; :class:`RegistryError` naming the field when one is missing or
        of the wrong type (a hand-edited ``"number": "2"`` would fail later, in a rollback's comparison)."""
        if not isinstance(data, dict):
            raise RegistryError(f"a version record is {type(data).__name__}, not an object")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            record = cls(**known)
        except TypeError as exc:
            raise RegistryError(f"invalid version record {data.get('id')!r}: {exc}") from exc
        problem = record._type_problem()
        if problem:
            raise RegistryError(f"invalid version record {data.get('id')!r}: {problem}")
        return record

    def _type_problem(self) -> str:
        """What is wrong with this record's field types ("" when nothing is)."""
        for name, kinds in _FIELD_TYPES.items():
            value = getattr(self, name)
            if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
                return f"its {name} is {value!r}, not {_TYPE_NAMES[kinds]}"
        for name in ("train_cases", "val_cases"):
            if not all(isinstance(c, str) for c in getattr(self, name)):
                return f"its {name} holds something other than case ids"
        if self.status not in STATUSES:
            return f"its status is {self.status!r}, not one of {', '.join(STATUSES)}"
        if self.id != f"v{self.number}":
            return f"its id {self.id!r} does not match its number {self.number}"
        return ""


_NUMBER = (int, float)
_TEXT_OR_NONE = (str, type(None))
# each field's types in a record read from registry.json (a bool is no number)
_FIELD_TYPES: Dict[str, tuple] = {
    "id": (str,), "number": (int,), "kind": (str,), "file": (str,), "base_identity": (str,),
    "created_at": _NUMBER, "status": (str,), "val_dice": _NUMBER, "incumbent": _TEXT_OR_NONE,
    "incumbent_dice": _NUMBER, "train_cases": (list,), "val_cases": (list,), "steps": (int,),
    "train_seconds": _NUMBER, "trainable_parameters": (int,), "trainable_share": _NUMBER,
    "warm_start": _TEXT_OR_NONE, "reason": (str,), "config": (dict,), "prompt_mix": (dict,), "job_id": _TEXT_OR_NONE,
}  # fmt: skip
_TYPE_NAMES = {(str,): "text", (int,): "an integer", _NUMBER: "a number", _TEXT_OR_NONE: "text or null",
               (list,): "a list", (dict,): "an object"}  # fmt: skip


@dataclass
class RegistryState:
    current: Optional[str] = None
    next_number: int = 1
    versions: List[VersionRecord] = field(default_factory=list)
    events: List[Dict[str, Any]] = field(default_factory=list)
    # the name of the damaged registry file set aside for this change (not saved; None: none was)
    set_aside: Optional[str] = None

    def find(self, version_id: str) -> VersionRecord:
        for record in self.versions:
            if record.id == version_id:
                return record
        known = ", ".join(r.id for r in self.versions) or "none yet"
        raise VersionNotFoundError(f"no adapter version {version_id!r} (known: {known})")

    def current_record(self) -> Optional[VersionRecord]:
        return self.find(self.current) if self.current is not None else None

    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": REGISTRY_FORMAT,
            "format_version": REGISTRY_FORMAT_VERSION,
            "current": self.current,
            "next_number": self.next_number,
            "versions": [r.to_dict() for r in self.versions],
            "events": self.events[-MAX_EVENTS:],
        }


class RollbackResult(NamedTuple):
    """What a rollback changed: the version current before and the one current now (``None``: the base
    model); ``set_aside``: the damaged registry file set aside (then ``previous`` is unknown, None)."""

    previous: Optional[str]
    record: Optional[VersionRecord]
    set_aside: Optional[str] = None


class AdapterRegistry:
    """The version history of one datastore (see the module docstring). Safe across processes."""

    def __init__(self, store_root: Union[str, Path], clock: Callable[[], float] = time.time) -> None:
        self.folder = Path(store_root) / FOLDER
        self.path = self.folder / "registry.json"
        self._lock_path = self.folder / ".registry.lock"
        self._clock = clock
        self._thread_lock = threading.RLock()

    # ------------------------------------------------------------------ reading

    def read(self) -> RegistryState:
        """A snapshot of the registry (an empty one before the first version)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return RegistryState()
        # named from the store (a server's reply must not show where its files are)
        shown = Path(FOLDER) / self.path.name
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CorruptRegistryError(
                f"the datastore's adapter registry {shown} is not valid JSON: {exc}{SET_ASIDE_HINT}"
            ) from exc
        stated = data.get("format_version") if isinstance(data, dict) else None
        newer = isinstance(stated, int) and not isinstance(stated, bool) and stated > REGISTRY_FORMAT_VERSION
        error = RegistryError if newer else CorruptRegistryError  # a newer registry is not damaged: never set aside
        check_format(data, shown, REGISTRY_FORMAT, REGISTRY_FORMAT_VERSION, "adapter registry", error)
        try:
            state = RegistryState(
                current=data.get("current"),
                next_number=int(data.get("next_number", 1)),
                versions=[VersionRecord.from_dict(v) for v in data.get("versions", [])],
                events=list(data.get("events", [])),
            )
        except (RegistryError, ValueError, TypeError, AttributeError) as exc:
            problem = str(exc) or type(exc).__name__
        else:  # it parses, but a version twice, or a current one missing: damaged as surely as a file cut short
            problem = _inconsistency(state)
        if problem:
            raise CorruptRegistryError(
                f"the datastore's adapter registry {shown} is damaged: {problem}{SET_ASIDE_HINT}"
            )
        return state

    def versions(self) -> List[VersionRecord]:
        return self.read().versions

    def get(self, version_id: str) -> VersionRecord:
        return self.read().find(version_id)

    def current(self) -> Optional[VersionRecord]:
        """The current version's record, or ``None`` when the base model answers."""
        return self.read().current_record()

    def file_path(self, record: VersionRecord) -> Path:
        path = self.folder / record.file
        if path.parent != self.folder:  # a record's file is always a plain name in the folder
            raise RegistryError(f"version {record.id} names an invalid file {record.file!r}")
        return path

    def stamp(self) -> Optional[tuple]:
        """A cheap change marker (mtime, size) of the registry file, for pollers."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    # ------------------------------------------------------------------ writing

    @contextmanager
    def _locked(self, set_aside_damaged: bool = False) -> Iterator[RegistryState]:
        """Exclusive read-modify-write: yields the state; it is written back if no error occurs.

        Every write to the folder happens under this lock, so a temporary file found here is the
        leftover of a process killed mid-write (a job stopped by its watchdog): it is removed.
        ``set_aside_damaged``: a registry that cannot be read is renamed ``registry.damaged-<time>.json``
        (kept for whoever repairs it) and the change starts from an empty one; version files stay.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._thread_lock, open(self._lock_path, "a+") as lock_file:
            if fcntl is not None:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            try:
                for leftover in self.folder.glob(f"{TMP_PREFIX}*"):
                    leftover.unlink(missing_ok=True)
                try:
                    state = self.read()
                except CorruptRegistryError:
                    if not set_aside_damaged:
                        raise
                    stamp = time.strftime("%Y%m%d-%H%M%S")
                    aside = self.path.with_name(f"registry.damaged-{stamp}.json")
                    for n in range(2, 1000):  # never over one set aside earlier in the same second
                        if not aside.exists():
                            break
                        aside = self.path.with_name(f"registry.damaged-{stamp}-{n}.json")
                    os.replace(self.path, aside)
                    state = RegistryState(set_aside=aside.name)
                    self._event(state, "set_aside", file=aside.name)
                yield state
                payload = json.dumps(state.to_dict(), indent=1).encode()
                atomic_write_bytes(self.path, payload, overwrite=True)
            finally:
                if fcntl is not None:
                    fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)

    def lock_until_exit(self, timeout_s: float) -> bool:
        """Take the registry's file lock and keep it until this process ends: from then on no version can
        be recorded, by another process or by another thread of this one (``flock`` on a descriptor of
        its own conflicts with theirs). For a training job's watchdog about to stop its worker: what it
        reads of the registry stays true until the exit releases the lock. False when the lock was not
        free within ``timeout_s`` (a writer holds it, perhaps this process's stuck main thread), or
        without ``flock``."""
        if not HAVE_FLOCK:  # pragma: no cover - not on the platforms CI runs
            return False
        try:  # the descriptor stays open: the lock goes with the process
            return exclusive_lock(self._lock_path, timeout_s) is not None
        except OSError:
            return False

    def _event(self, state: RegistryState, action: str, **details: Any) -> None:
        state.events.append({"time": self._clock(), "action": action, **details})

    def add_version(
        self,
        kind: str,
        writer: Callable[[Path, str], None],
        fields: Dict[str, Any],
        promote: bool,
        expected_current: Optional[str],
    ) -> VersionRecord:
        """Number, write and record a new version; make it current when ``promote``.

        ``writer(path, version_id)`` writes the version's file (atomically, see ``SegAssistLib.files``).
        ``expected_current`` is the version the candidate was compared with: if another process
        changed the current version meanwhile (a rollback, another promotion) the comparison is
        stale, and the version is recorded as rejected instead of promoted.
        """
        with self._locked() as state:
            number = self._free_number(state)
            version_id = f"v{number}"
            file_name = f"{version_id}-{kind}.pt"
            reason = str(fields.pop("reason", ""))
            if promote and state.current != expected_current:
                promote = False
                reason = (
                    f"the current version changed during training (from {expected_current or BASE} to "
                    f"{state.current or BASE}): not promoted; train again to compare with it"
                )
            path = self.folder / file_name
            writer(path, version_id)
            record = VersionRecord(
                id=version_id,
                number=number,
                kind=kind,
                file=file_name,
                created_at=self._clock(),
                status=PROMOTED if promote else REJECTED,
                reason=reason,
                **fields,
            )
            state.versions.append(record)
            state.next_number = number + 1
            previous = state.current
            if promote:
                state.current = version_id
            self._event(
                state,
                "promote" if promote else "reject",
                **{"from": previous, "to": state.current, "version": version_id},
            )
        return record

    def _free_number(self, state: RegistryState) -> int:
        """The new version's number: after every recorded one (``next_number`` may lag behind them in a
        registry edited by hand or restored from a copy: a second record of one id would leave it
        unreadable), and past every ``v<n>-*.pt`` file the registry does not list (a writer killed before
        it could record its version, or versions of a registry restored from an older copy: kept, never
        replaced)."""
        number = max([state.next_number, 1, *(record.number + 1 for record in state.versions)])
        recorded = {record.id for record in state.versions}
        while f"v{number}" in recorded or any(self.folder.glob(f"v{number}-*.pt")):
            number += 1
        return number

    def rollback(
        self,
        to: Optional[str] = None,
        user: Optional[str] = None,
        base_identity: Optional[str] = None,
        expected_current: Optional[str] = None,
    ) -> Optional[VersionRecord]:
        """Make an earlier version current; returns it (``None``: the base model now answers).
        :meth:`rollback_detailed` also says which version it replaced.

        ``to=None`` goes back one step: to the newest promoted version older than the current one and
        made for the same base weights, or to the base model when there is none (a version made for
        other base weights is never a step back: it cannot answer with the current one's base model).
        ``to="base"`` goes to the base model, also from a registry that cannot be read (set aside, see
        ``_locked``: the way back to a working server); ``to="v2"`` to that version, which must have been
        promoted once (a rejected version never beat its incumbent). The replaced version becomes
        ``rolled_back``, and so does every promoted version of its base weights between it and an older
        target (skipped on the way back: out of service too); going forward again after a rollback leaves the version
        it leaves promoted, so one step back returns to it. ``base_identity``, when given, is the
        loaded base model's: a target version made for other base weights is refused, whether named
        or one step back (never skipped for an older one).

        ``expected_current``, when given, is the version the caller saw current (``"base"``: the base
        model): if another is current now (a training job promoted one since, or another rollback ran),
        the rollback is refused and nothing changes, so that one step back never puts back the version
        the caller meant to take out of service. ``None``: no such check. A registry that cannot be
        read has no current version to compare with: it is refused then (not set aside), also with
        ``to="base"``.
        """
        return self.rollback_detailed(to, user, base_identity, expected_current).record

    def rollback_detailed(
        self,
        to: Optional[str] = None,
        user: Optional[str] = None,
        base_identity: Optional[str] = None,
        expected_current: Optional[str] = None,
        require_change: bool = False,
        check: Optional[Callable[[VersionRecord], None]] = None,
    ) -> RollbackResult:
        """:meth:`rollback`, also returning the version it replaced (read under the same lock).
        ``require_change``: a target that is already current (``to="base"`` while the base model
        answers, ``to="v2"`` while v2 does) is refused, nothing changed, as one step back from the
        base model is; without it such a rollback is recorded and changes nothing. Recovering a damaged
        registry (``to="base"``, set aside) is a change. ``check(target)``, when given, is called with
        the target version (never for the base model) under the lock, once its file is known to be
        there and before anything is written: what it raises refuses the rollback, nothing changed (a
        server loads the version first, ``deploy.check_version``: one its workers cannot load would
        leave the replaced version answering)."""
        set_aside = to == BASE and expected_current is None  # a damaged registry's current cannot be compared
        with self._locked(set_aside_damaged=set_aside) as state:
            if expected_current is not None and (state.current or BASE) != expected_current:
                raise RegistryError(
                    f"the current version is {state.current or BASE}, not {expected_current} as expected: it changed "
                    "since (a training job promoted a version, or another rollback ran), and nothing was rolled "
                    "back; look at the versions again, and roll back from the current one if it should go"
                )
            # to the base model: the current record is needed only to mark it rolled back
            current = next((r for r in state.versions if r.id == state.current), None)
            if to != BASE:
                current = state.current_record()
            if to is None:
                if current is None:
                    raise RegistryError("the base model is already current: nothing to roll back")
                older = [
                    r
                    for r in state.versions
                    if r.status == PROMOTED and r.number < current.number and r.base_identity == current.base_identity
                ]
                target = older[-1] if older else None
                if target is not None and base_identity is not None and target.base_identity != base_identity:
                    raise OtherBaseModelError(
                        f"one step back from {current.id} is version {target.id}, which belongs to base model "
                        f"{target.base_identity}, not to the loaded base model {base_identity}"
                    )
            elif to == BASE:
                target = None
            else:
                target = state.find(to)
                if target.status == REJECTED:
                    raise RegistryError(
                        f"version {target.id} was rejected ({target.reason or 'not better than its incumbent'})"
                        ": only versions promoted once can become current"
                    )
                if base_identity is not None and target.base_identity != base_identity:
                    raise OtherBaseModelError(
                        f"version {target.id} belongs to base model {target.base_identity}, not to the "
                        f"loaded base model {base_identity}"
                    )
            if target is not None:
                path = self.file_path(target)
                if not path.is_file():  # named from the store (a server's reply must not show where its files are)
                    raise RegistryError(
                        f"the file of version {target.id} is missing from the datastore: {FOLDER}/{path.name}"
                    )
            target_id = target.id if target is not None else None
            if require_change and target_id == state.current and state.set_aside is None:
                raise RegistryError(f"{version_label(target)} is already current: nothing to roll back")
            if target is not None and check is not None:
                check(target)
            moving_forward = target is not None and current is not None and target.number > current.number
            if current is not None and current.id != target_id and not moving_forward:
                # judged worse, with every promoted version of its base weights that the rollback skipped
                # on its way back (else "one step back" from a later version could bring back one the
                # operator took out of service); going forward again judges nothing
                floor = target.number if target is not None else 0
                for record in state.versions:
                    skipped = floor < record.number < current.number and record.base_identity == current.base_identity
                    if record.status == PROMOTED and (skipped or record is current):
                        record.status = ROLLED_BACK
            if target is not None:
                target.status = PROMOTED
            previous = state.current
            self._event(state, "rollback", **{"from": previous, "to": target_id, "user": user})
            state.current = target_id
        return RollbackResult(previous, target, state.set_aside)

    def write_file(self, path: Path, writer: Callable[[Path], object]) -> str:
        """Write a version file atomically (used by ``add_version`` writers)."""
        return atomic_write(path, writer, overwrite=False)


def _inconsistency(state: RegistryState) -> str:
    """What makes a registry that parses unusable (empty: nothing): two records of one version id, or a
    current version that is not among the records."""
    ids = [record.id for record in state.versions]  # a list: a damaged file may hold any JSON value here
    twice = [i for n, i in enumerate(ids) if i in ids[:n]]
    if twice:
        return f"two records of version {twice[0]!r}"
    if state.current is not None and state.current not in ids:
        known = ", ".join(str(i) for i in ids) or "none"
        return f"its current version {state.current!r} is not among its versions ({known})"
    return ""


def version_label(record: Optional[VersionRecord]) -> str:
    return record.id if record is not None else BASE


VERSION_SEPARATOR = "+"
_VERSION_ID = re.compile(r"v[0-9]+")


def model_version(base: str, record_id: Optional[str]) -> str:
    """What an engine reports: the base model's version, plus ``+vN`` while a version answers."""
    return base if record_id is None else f"{base}{VERSION_SEPARATOR}{record_id}"


def adapter_id_of(version: Optional[str]) -> Optional[str]:
    """The registry version id inside a model version string (``0.1.0+v3`` -> ``v3``); None for the
    base model. The base version may itself carry ``+`` build metadata: only a trailing ``+vN`` counts."""
    if not version or VERSION_SEPARATOR not in version:
        return None
    tail = version.rsplit(VERSION_SEPARATOR, 1)[1]
    return tail if _VERSION_ID.fullmatch(tail) else None
