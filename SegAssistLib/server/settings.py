"""Server settings: where to listen, which model, who may connect, and the limits."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import List, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

from SegAssistLib.api_models import LimitsInfo
from SegAssistLib.engine.edges import DEFAULT_EDGE_BAND
from SegAssistLib.prompt_log import MAX_REFINE_DEPTH

LOOPBACK_NAMES = ("localhost",)
#: Open connections (and requests in progress) above which uvicorn answers new requests 503 rather than
#: let them in (``segassist serve --limit-concurrency``): without a bound, thousands of idle or slowly
#: sending connections all stay open. uvicorn has no timeout for a request's headers: a server beyond
#: loopback belongs behind a reverse proxy that has one (docs/api.md).
DEFAULT_LIMIT_CONCURRENCY = 256
#: Seconds an idle keep-alive connection stays open after its last reply (uvicorn's default, stated).
DEFAULT_KEEP_ALIVE_S = 5


class Limits(BaseModel):
    """Every bound the server enforces; each breach is answered with a 4xx naming the limit."""

    model_config = ConfigDict(extra="forbid")
    max_voxels: int = Field(600 * 1024 * 1024, gt=0, description="voxels per image")
    max_axis: int = Field(2048, gt=0, description="voxels along any one axis")
    max_body_bytes: int = Field(2 * 1024**3, gt=0, description="bytes of one image upload")
    # 16 MiB: one prompt at its largest (a slab of 4096 x 4096 random bits: 2.8 MB of JSON) five times
    # over, and a replay of max_prompts_per_session (2000) slab prompts of 8 KB each (a lasso about
    # 1,300 voxels across on its slice: 2000 such are 16 MB; of 400 voxels, 5 MB). Parsed JSON costs
    # up to 25 times its size in memory, so the limit is no larger than legitimate bodies need.
    max_json_bytes: int = Field(16 * 1024**2, gt=0, description="bytes of any other request body")
    max_sessions_per_user: int = Field(8, gt=0)
    max_sessions_total: int = Field(64, gt=0)
    max_prompts_per_session: int = Field(2000, gt=0)
    # finite (allow_inf_nan=False): an "inf" went out as null in /v1/info, which no client could read
    idle_timeout_s: float = Field(1800.0, gt=0, allow_inf_nan=False)
    upload_timeout_s: float = Field(
        600.0, gt=0, allow_inf_nan=False, description="seconds to receive one upload's body"
    )
    max_concurrent_uploads: int = Field(
        2, gt=0, description="uploads received and decoded at once (bounds memory); one user's take one at a time"
    )
    upload_slot_wait_s: float = Field(
        30.0,
        gt=0,
        allow_inf_nan=False,
        description="seconds an upload waits for a free upload slot before 503 uploads_busy",
    )
    max_queued_jobs: int = Field(256, gt=0, description="inference jobs waiting per device")
    max_queued_per_session: int = Field(
        16, gt=0, description="inference jobs one session (or one user's learning requests) may have waiting"
    )
    image_cache_bytes: int = Field(8 * 1024**3, ge=0, description="decoded images kept in memory")
    # a client that reads neither zlib nor zstd is answered uncompressed (codec none, base64 in JSON);
    # a CT's whole mask that way is 100 MB of JSON per reply: above this the reply is refused (406)
    max_uncompressed_reply_bytes: int = Field(
        16 * 1024**2, gt=0, description="raw bytes of an array a reply may send uncompressed (codec none)"
    )

    def info(self) -> LimitsInfo:
        return LimitsInfo(**self.model_dump(include=set(LimitsInfo.model_fields)))


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = "127.0.0.1"
    port: int = Field(8470, ge=0, le=65535)
    model: Optional[Path] = Field(None, description="checkpoint; None: the bundled default model")
    devices: Tuple[str, ...] = Field(("cpu",), min_length=1, description="one inference worker each")
    refine_depth: int = Field(
        1, ge=1, le=MAX_REFINE_DEPTH, description="zoom levels finer than a zoomed-out answer it is refined at"
    )
    edge_band: float = Field(
        DEFAULT_EDGE_BAND, ge=0, le=10, description="edge snap band in voxels (0: off; otherwise at least 1)"
    )
    token_hashes: List[Tuple[str, str]] = Field(
        default_factory=list, description="(user, sha256 hex of token); empty: no authentication"
    )
    data_dir: Optional[Path] = Field(None, description="uploaded images persist here across restarts")
    learn_store: Optional[Path] = Field(None, description="learning datastore; None: no /v1/learn endpoints")
    limits: Limits = Field(default_factory=Limits)
    tls_certfile: Optional[Path] = None
    tls_keyfile: Optional[Path] = None

    @field_validator("edge_band")
    @classmethod
    def _band_off_or_a_voxel(cls, value: float) -> float:
        if 0 < value < 1:
            raise ValueError(f"edge_band must be 0 (off) or at least 1 voxel, got {value}")
        return value

    @property
    def auth_required(self) -> bool:
        return bool(self.token_hashes)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: ServerSettings) -> None:
    """Refuse a configuration that would serve without authentication beyond this machine."""
    if not settings.auth_required and not is_loopback(settings.host):
        raise ValueError(
            f"refusing to listen on {settings.host!r} without tokens: anyone who can reach it could use the "
            "model and read uploaded images. Give --token-file (see `segassist serve --issue-token`) or "
            "set SEGASSIST_TOKEN, or listen on 127.0.0.1 only."
        )
    if bool(settings.tls_certfile) != bool(settings.tls_keyfile):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
