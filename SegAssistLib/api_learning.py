"""Request and reply models of the learning endpoints (``/v1/learn/...``). Torch-free.

The learning loop over HTTP: cases live in the server's datastore (``segassist serve
--learn-store DIR``); an annotator imports an image (already uploaded, named by its content hash),
asks for the next case and the model's proposal of it, corrects it in an ordinary session and
submits the session as a label version; training jobs run in a separate process on the server and
the server answers with the newest promoted version without a restart.
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, List, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from SegAssistLib.api_models import IMAGE_ID_PATTERN, SESSION_ID_PATTERN, ArrayPayload, ReplyModel, Shape3, Vec3

#: How long a case stays locked to its annotator unless told otherwise: one default for the datastore, the
#: server, the client and the command line (a work session; saving a draft renews nothing, locking again does).
DEFAULT_LOCK_TTL_S = 4 * 3600.0
MAX_LOCK_TTL_S = 24 * 3600.0
MAX_INTERACTIONS = 10**9  # prompts counted for one label version: far above any session, inside SQLite's integers
MAX_SEED = 2**32 - 1  # what every random generator in the loop accepts (numpy, torch)


def is_seed(value: object) -> bool:
    """An integer (numpy's too, not a bool) from 0 to :data:`MAX_SEED`."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 <= value <= MAX_SEED


MAX_TRAIN_BUDGET_S = 7 * 24 * 3600.0
#: Patches per training step: the default is 2; 64 patches of the base model's size already take gigabytes
#: of activations, and a larger request would exhaust the server's memory rather than train faster.
MAX_TRAIN_BATCH_SIZE = 64
#: Simulated clicks per validation case: the default is 3; 20 is the most the interactive segmentation
#: literature counts (NoC@20), and each click is one more model answer per case at every validation.
MAX_VAL_CLICKS = 20
#: most held-back cases one validation runs (each costs val_clicks simulated clicks per version compared)
MAX_VAL_CASES = 200

CASE_ID_PATTERN = r"^[0-9a-f]{16}$"
LABEL_ID_PATTERN = r"^[0-9a-f]{32}$"
JOB_ID_PATTERN = r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$"
VERSION_ID_PATTERN = r"^(v[0-9]{1,9}|base)$"
CaseStatusName = Literal["new", "in_progress", "submitted", "reviewed"]
Strategy = Literal["first", "random", "uncertainty", "diversity"]
AdapterKindName = Literal["lora", "salt", "full"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")  # requests: unknown fields refused (replies: ReplyModel)


class CaseInfo(ReplyModel):
    """A case of the datastore (see ``SegAssistLib.learning.records.CaseRecord``)."""

    id: str
    name: str
    status: CaseStatusName
    shape: Shape3 = Field(description="array order [k, j, i]")
    spacing: Vec3
    image_sha256: str
    content_hash: str
    source: str
    imported_at: float
    imported_at_iso: Optional[str] = None
    imported_by: str
    locked_by: Optional[str] = None
    lock_expires: Optional[float] = None
    lock_expires_iso: Optional[str] = None
    n_labels: int
    latest_label_id: Optional[str] = None
    subject: Optional[str] = Field(None, description="the patient it shows; null: its own subject")


SUBJECT_DESCRIPTION = (
    "the subject (patient) the image shows: training never splits a subject's cases between training and "
    "validation (ACDC's two frames of a patient, follow-up scans, series of one study). Omitted: its own subject"
)


class ImportCase(_Model):
    image_id: str = Field(pattern=IMAGE_ID_PATTERN, description="an image this server holds (upload it first)")
    name: str = Field(min_length=1, max_length=256)
    subject: Optional[str] = Field(None, min_length=1, max_length=256, description=SUBJECT_DESCRIPTION)


class LockRequest(_Model):
    ttl_s: float = Field(DEFAULT_LOCK_TTL_S, gt=0, le=MAX_LOCK_TTL_S, description="seconds until the lock lapses")


class SaveLabel(_Model):
    """A label version: the result of a session of this user on the case's image, or a mask."""

    session_id: Optional[str] = Field(None, pattern=SESSION_ID_PATTERN)
    mask: Optional[ArrayPayload] = Field(None, description="uint8 [k, j, i], the case's shape (without session)")
    submit: bool = Field(True, description="true: the case becomes submitted; false: a draft")
    seconds_spent: Optional[float] = Field(
        None, ge=0, description="annotation time in seconds; omitted or null: not measured, recorded as unknown (null)"
    )
    n_interactions: Optional[int] = Field(
        None,
        ge=0,
        le=MAX_INTERACTIONS,
        description="prompts it took; omitted or null: the session's count of prompts (its n_prompts, undone and "
        "reset ones included), and for a mask unknown (null)",
    )


class LabelInfo(ReplyModel):
    id: str
    case_id: str
    version: int
    user: str
    created_at: float
    created_at_iso: Optional[str] = None
    sha256: str
    model: Optional[str] = None
    adapter_version: Optional[str] = None
    n_interactions: Optional[int] = Field(
        description="prompts it took; null: unknown (a mask saved without a count; never recorded as 0)"
    )
    seconds_spent: Optional[float] = Field(description="annotation time in seconds; null: not measured")
    submitted: bool
    n_foreground: int
    has_prompt_log: bool


class ReviewRequest(_Model):
    """A reviewer's verdict on the case's latest submitted label version."""

    accepted: bool = Field(description="true: the case becomes reviewed; false: back to in_progress (out of training)")
    note: Optional[str] = Field(None, max_length=2000, description="the reviewer's note")
    label_id: Optional[str] = Field(
        None,
        pattern=LABEL_ID_PATTERN,
        description="the version the reviewer looked at: refused (409 case_state) when a newer one was submitted since",
    )


class ReviewInfo(ReplyModel):
    """A recorded review, with the case as it stands after it."""

    id: str
    label_id: str
    reviewer: str
    accepted: bool
    note: Optional[str] = None
    created_at: float
    created_at_iso: Optional[str] = None
    case: CaseInfo


class TrainRequest(_Model):
    """Settings of one training job; unset fields take the trainer's defaults."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # JSON bodies may carry NaN/Infinity
    kind: AdapterKindName = "salt"
    rank: Optional[int] = Field(None, gt=0, description="salt: its top singular values per layer; lora: its rank")
    lora_rank: Optional[int] = Field(None, gt=0, description="salt only: the rank of its low-rank update")
    alpha: Optional[float] = Field(None, gt=0, description="salt and lora: the scale of the low-rank update")
    learning_rate: Optional[float] = Field(None, gt=0)
    max_steps: Optional[int] = Field(None, gt=0)
    time_budget_s: Optional[float] = Field(None, gt=0, le=MAX_TRAIN_BUDGET_S)
    batch_size: Optional[int] = Field(None, gt=0, le=MAX_TRAIN_BATCH_SIZE, description="patches per step")
    val_clicks: Optional[int] = Field(None, gt=0, le=MAX_VAL_CLICKS, description="simulated clicks per validation case")
    max_val_cases: Optional[int] = Field(
        None,
        gt=0,
        le=MAX_VAL_CASES,
        description="most submitted cases held back for validation (default 8), a subject's cases all or none",
    )
    validate_every: Optional[int] = Field(None, gt=0)
    min_improvement: Optional[float] = Field(
        None, ge=-1, le=1, description="promote only above the incumbent's validation Dice plus this"
    )
    label_value: Optional[int] = Field(None, ge=1, le=255)
    seed: Optional[StrictInt] = Field(None, ge=0, le=MAX_SEED)  # strict: true is no seed
    warm_start: Optional[bool] = None

    def settings(self) -> Dict[str, Any]:
        return self.model_dump(exclude_none=True)


class JobStatus(BaseModel):
    """A training job's status (``state``: starting, running, validating, done, cancelled, failed)
    with its progress: step, loss, validation Dice, elapsed seconds; more fields as the job reports."""

    model_config = ConfigDict(extra="allow")
    job_id: str
    state: str


class VersionList(ReplyModel):
    current: Optional[str] = Field(None, description="the version that answers; null: the base model")
    versions: List[Dict[str, Any]]
    events: List[Dict[str, Any]] = Field(default_factory=list)


class RollbackRequest(_Model):
    to: Optional[str] = Field(None, pattern=VERSION_ID_PATTERN, description="a version id, 'base', or one step back")
    expected_current: Optional[str] = Field(
        None,
        pattern=VERSION_ID_PATTERN,
        description="the version the caller saw current ('base': the base model): refused (409 version_state), "
        "nothing changed, when another is current now (a job promoted one since, or another rollback ran); "
        "null: no check",
    )


class CurrentVersion(ReplyModel):
    current: Optional[str] = Field(description="the version that answers now; null: the base model")
    previous: Optional[str] = Field(
        None, description="the version the rollback replaced; null: the base model (or a server that does not say)"
    )


class LearningStatus(ReplyModel):
    cases: Dict[str, int]
    current_version: Optional[Dict[str, Any]] = None
    last_job: Optional[Dict[str, Any]] = None
    engine_version: str = Field(description="the model version answering sessions now")
    version_error: Optional[str] = Field(
        None,
        description="why the workers could not switch to current_version (a version promoted by a training job, "
        "or made current from a terminal, that this server cannot load): engine_version goes on answering; "
        "null when they answer with the current version",
    )


class NextCaseRequest(_Model):
    strategy: Strategy = "uncertainty"
    lock: bool = Field(
        True,
        description="lock the case to the caller; a case they hold locked with no label version yet is handed back "
        "first (resumed), before any other is locked",
    )
    lock_ttl_s: float = Field(
        DEFAULT_LOCK_TTL_S, gt=0, le=MAX_LOCK_TTL_S, description="seconds until the lock lapses (with lock)"
    )
    proposal: bool = Field(True, description="include the model's proposal")
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED)  # strict: true is no seed
    diversity_weight: float = Field(0.5, ge=0)
    max_candidates: int = Field(16, ge=1, le=256)


class ProposalReply(ReplyModel):
    offset: Shape3 = Field(description="array order [k, j, i] of the mask box")
    shape: Shape3
    mask: Optional[ArrayPayload] = Field(None, description="uint8 box; null when the proposal is empty")
    agreement: float
    uncertainty: float
    members: int
    engine_version: str
    prompts: List[Dict[str, Any]]


class NextCaseReply(ReplyModel):
    case: CaseInfo
    image_id: str = Field(description="open a session on this image to annotate the case")
    strategy: Strategy
    score: Dict[str, Any]
    proposal: Optional[ProposalReply] = None
    resumed: bool = Field(
        False,
        description="the caller's own case handed back (locked to them before, no label version yet: an earlier "
        "answer that never reached them, or a lock by hand), its lock renewed, instead of a new case locked",
    )
