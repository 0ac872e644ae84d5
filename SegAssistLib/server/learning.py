"""The server's side of the learning loop: its datastore, adapter registry and version hot swap.

Enabled by ``segassist serve --learn-store DIR``. The datastore is the same folder the
``segassist learn`` commands work on, so a training job started from a terminal is picked up by a
running server too. Each inference worker checks the registry before every job (a file stat,
microseconds) and swaps a newly promoted or rolled-back version into its engine on its own thread,
so sessions keep going without a restart and every reply states the version that answered it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from SegAssistLib.api_models import ErrorCode
from SegAssistLib.engine.base import Engine
from SegAssistLib.errors import SegAssistError
from SegAssistLib.image import Volume
from SegAssistLib.learning import errors as learning_errors
from SegAssistLib.learning import loop_errors
from SegAssistLib.learning.datastore import Datastore
from SegAssistLib.learning.registry import AdapterRegistry
from SegAssistLib.server.errors import ApiError
from SegAssistLib.server.once import OnceReplies
from SegAssistLib.server.worker import InferenceWorker, QueueFull, WorkerStopped
from SegAssistLib.transport import wire_volume

if TYPE_CHECKING:  # torch: imported by the workers only
    from SegAssistLib.learning.deploy import EngineSync

log = logging.getLogger("segassist.server")
MAX_CONCURRENT_RANKINGS = 4
VERSION_SETTLE_S = 2.0  # how long a status reply waits for busy workers to take up a new version

# most specific first: the first match decides (status, code)
_ERRORS = (
    (learning_errors.InvalidIdentifierError, 400, ErrorCode.INVALID_ID),
    (learning_errors.NotFoundError, 404, ErrorCode.CASE_NOT_FOUND),
    (loop_errors.JobNotFoundError, 404, ErrorCode.JOB_NOT_FOUND),
    (loop_errors.VersionNotFoundError, 404, ErrorCode.VERSION_NOT_FOUND),
    (loop_errors.NoCandidateError, 404, ErrorCode.NO_CASE_LEFT),
    (learning_errors.DuplicateCaseError, 409, ErrorCode.DUPLICATE_CASE),
    (learning_errors.CaseLockedError, 409, ErrorCode.CASE_LOCKED),
    (learning_errors.InvalidStateError, 409, ErrorCode.CASE_STATE),
    (loop_errors.TrainingBusyError, 409, ErrorCode.TRAINING_BUSY),
    (loop_errors.TrainingError, 422, ErrorCode.TRAINING_REFUSED),
    (loop_errors.ActiveLearningError, 422, ErrorCode.INVALID_REQUEST),
    (learning_errors.CorruptDataError, 500, ErrorCode.CORRUPT_DATA),  # the store's fault, not the request's
    (learning_errors.AdapterError, 409, ErrorCode.VERSION_STATE),
    (learning_errors.DatastoreError, 422, ErrorCode.INVALID_REQUEST),
)
LEARNING_ERRORS = tuple(cls for cls, _, _ in _ERRORS)


def api_error_for(exc: SegAssistError) -> ApiError:
    """The HTTP answer to an error of the learning library: its ``public`` message where it has one
    (the message without the server's paths), else its message."""
    for cls, status, code in _ERRORS:
        if isinstance(exc, cls):
            return ApiError(status, code, getattr(exc, "public", None) or str(exc))
    raise TypeError(f"not a learning error: {exc!r}")


class LearningState:
    """The datastore, the registry and the base checkpoint training jobs start from."""

    def __init__(self, store_root: Path, checkpoint: Path) -> None:
        self.store_root = Path(store_root).resolve()
        self.store = Datastore(self.store_root, create=True)
        self.registry = AdapterRegistry(self.store_root)
        self.checkpoint = Path(checkpoint)
        self._image_ids: Dict[str, str] = {}  # case id -> the image id its image is served under
        self._base_identity: Optional[str] = None
        self._ranking_slots: Optional[asyncio.Semaphore] = None
        self._settled_stamp: Optional[tuple] = None  # the registry as the workers last took it up
        self._syncs: List[EngineSync] = []  # each worker's (sync_hook), for its last swap error
        self.once = OnceReplies()  # label saves and next-case answers, by request id

    def ranking_slots(self) -> asyncio.Semaphore:
        """Next-case rankings that run at once: each holds a thread of the server's pool while its
        cases are scored, so more wait here (without a thread) rather than starve other requests."""
        if self._ranking_slots is None:  # made in the event loop, on first use
            self._ranking_slots = asyncio.Semaphore(MAX_CONCURRENT_RANKINGS)
        return self._ranking_slots

    def base_identity(self) -> str:
        """Identity of the base weights the workers load (read once, with torch, on first use):
        versions made for other weights cannot become current."""
        if self._base_identity is None:
            from SegAssistLib.engine.network import load_checkpoint
            from SegAssistLib.errors import ModelError

            try:
                self._base_identity = load_checkpoint(self.checkpoint).identity
            except ModelError as exc:  # the file changed or vanished since the workers loaded it
                raise loop_errors.RegistryError(
                    f"cannot check the version against the base model: {exc}; only a rollback to 'base' works"
                ) from exc
        return self._base_identity

    def case_image(self, case_id: str) -> Tuple[str, Volume]:
        """(image id, image) of a case as ``GET /cases/{id}/image`` serves it: the wire form of the
        stored image, whose content hash is the id sessions on it are opened with."""
        volume = wire_volume(self.store.load_image(case_id))
        image_id = volume.content_hash()
        self._image_ids[case_id] = image_id
        return image_id, volume

    def is_case_image(self, case_id: str, image_id: str) -> bool:
        """Whether ``image_id`` is the case's image, as imported or as :meth:`case_image` serves it.
        The store records both hashes; only a case imported before it did has its image read and
        hashed (once: a case's image never changes)."""
        known = self.store.image_hashes_of(case_id)
        if not known:
            served = self._image_ids.get(case_id)
            known = {self.store.get_case(case_id).content_hash, served or self.case_image(case_id)[0]}
        return image_id in known

    def close(self) -> None:
        self.store.close()

    async def settle_version(self, workers: Sequence[InferenceWorker], timeout_s: float = VERSION_SETTLE_S) -> None:
        """Let the workers take up a version promoted or rolled back since their last job, so that the
        version a reply names (``/v1/info``, ``/v1/learn/status``) is the one that answers next.

        A worker swaps only before a job: without one (no session active) it would keep naming the
        old version. An empty job on each does it, once per registry change; a busy worker is waited
        for at most ``timeout_s`` (its empty job stays queued and swaps it when its turn comes, so
        later replies need not ask again).
        """
        stamp = self.registry.stamp()
        if stamp == self._settled_stamp:
            return
        waits = []
        for worker in workers:
            try:
                future = asyncio.wrap_future(worker.submit("learn:version", lambda engine: None))
            except (QueueFull, WorkerStopped):
                return  # busy or stopping: the reply names what answered last; the next one asks again
            future.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody else reads it
            waits.append(future)
        self._settled_stamp = stamp  # queued on every worker: each takes the version up before its next job
        await asyncio.wait(waits, timeout=timeout_s)

    def version_error(self) -> Optional[str]:
        """Why a worker could not switch to the registry's current version (it goes on answering with
        the one it has: a version a training job promoted, or a rollback from a terminal, that this server
        cannot load), the store's files named from the store; None when every worker took it up."""
        from SegAssistLib.learning.jobs import public_text

        for sync in self._syncs:
            if sync.last_error:
                return public_text(f"cannot switch to the current version: {sync.last_error}",
                                   self.store_root, self.checkpoint)  # fmt: skip
        return None

    def sync_hook(self):
        """A per-worker hook that keeps that worker's engine on the registry's current version."""
        from SegAssistLib.learning.deploy import EngineSync  # torch: the worker has it loaded already

        sync = EngineSync(self.registry)
        self._syncs.append(sync)
        reported = {"error": None}

        def before_job(engine: Engine) -> bool:
            swapped = sync.refresh(engine)
            if swapped:
                log.info("now answering with model version %s", engine.capabilities().version)
            if sync.last_error != reported["error"]:
                reported["error"] = sync.last_error
                if sync.last_error:
                    log.error("could not switch model version: %s", sync.last_error)
            return swapped

        return before_job


def base_checkpoint(model: Optional[Path]) -> Path:
    """The checkpoint the server's engine loads: training jobs adapt that one."""
    if model is not None:
        return Path(model)
    from SegAssistLib.engine.builtin import DEFAULT_CHECKPOINT

    return DEFAULT_CHECKPOINT


def learning_or_404(state) -> LearningState:
    learning: Optional[LearningState] = getattr(state, "learning", None)
    if learning is None:
        raise ApiError(
            404, ErrorCode.LEARNING_DISABLED,
            "this server has no learning datastore: start it with `segassist serve --learn-store DIR`",
        )  # fmt: skip
    return learning
