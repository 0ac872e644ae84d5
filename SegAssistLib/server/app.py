"""The FastAPI application: routes, error shape, limits, and the workers' lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import AsyncIterator, Callable, Optional

import anyio
from fastapi import APIRouter, Depends, FastAPI
from starlette.concurrency import run_in_threadpool

from SegAssistLib import __version__
from SegAssistLib.api_models import API_PREFIX, API_VERSION, Health, ModelInfo, ServerInfo
from SegAssistLib.server import routes_images, routes_learning, routes_sessions
from SegAssistLib.server.deps import TokenGateMiddleware, current_user, get_state
from SegAssistLib.server.errors import install_error_handlers, route_methods
from SegAssistLib.server.limits import (
    LARGE_JSON_PARSES,
    BodyLimitMiddleware,
    ParseSlots,
    UploadSlots,
    release_parse_slot,
)
from SegAssistLib.server.responses import ERROR_RESPONSES
from SegAssistLib.server.settings import ServerSettings
from SegAssistLib.server.state import EngineFactory, ServerState, default_engine_factory
from SegAssistLib.transport import available_codecs

log = logging.getLogger("segassist.server")

meta = APIRouter(tags=["server"], responses=ERROR_RESPONSES)


@meta.get("/health", response_model=Health, summary="Liveness; the only endpoint without a token")
async def health() -> Health:
    return Health(version=__version__)


@meta.get("/info", response_model=ServerInfo, summary="Model, prompt kinds, devices, limits")
async def info(state: ServerState = Depends(get_state), user: str = Depends(current_user)) -> ServerInfo:
    if state.learning is not None:  # a version promoted meanwhile: name the one that answers next
        await state.learning.settle_version(state.pool.workers)
    caps = state.pool.capabilities
    version_error = state.learning.version_error() if state.learning is not None else None
    return ServerInfo(
        version=__version__,
        model=ModelInfo(
            name=caps.name, version=caps.version, licence=caps.licence, description=caps.description,
            version_error=version_error,
        ),  # fmt: skip
        prompt_kinds=list(caps.prompt_kinds),
        patch_size=tuple(caps.patch_size),
        devices=[w.device for w in state.pool.workers],
        codecs=list(available_codecs()),
        limits=state.limits.info(),
        auth_required=state.verifier.enabled,
        user=user,
    )


def _sweep_interval(idle_timeout_s: float) -> float:
    return min(30.0, max(0.05, idle_timeout_s / 4))


def create_app(
    settings: ServerSettings,
    engine_factory: Optional[EngineFactory] = None,
    clock: Callable[[], float] = time.monotonic,
) -> FastAPI:
    """The app; workers (and the model) start with the server and stop with it.

    ``engine_factory(device)`` builds the engine on its worker thread (default: the built-in
    engine from ``settings.model``); ``clock`` is the time source of idle expiry.
    """
    factory = engine_factory or default_engine_factory(settings.model, settings.refine_depth, settings.edge_band)
    state = ServerState(settings, factory, clock)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.upload_slots = UploadSlots(settings.limits.max_concurrent_uploads, settings.limits.upload_slot_wait_s)
        state.prompt_checks = anyio.CapacityLimiter(routes_sessions.PROMPT_CHECK_THREADS)
        state.json_parses = ParseSlots(LARGE_JSON_PARSES)
        await run_in_threadpool(state.pool.start)
        caps = state.pool.capabilities
        log.info("model %s %s on %s", caps.name, caps.version, ", ".join(settings.devices))

        async def sweep() -> None:
            while True:
                await asyncio.sleep(_sweep_interval(settings.limits.idle_timeout_s))
                state.expire_idle()

        sweeper = asyncio.ensure_future(sweep())
        try:
            yield
        finally:
            sweeper.cancel()
            for session in state.sessions.all():
                state.sessions.remove(session.session_id)
                state.close_in_background(session)
            await run_in_threadpool(state.pool.stop)
            if state.learning is not None:
                state.learning.close()

    app = FastAPI(
        title="SegAssist backend",
        version=f"{__version__} (API v{API_VERSION})",
        description=(
            "Interactive promptable 3D segmentation over HTTP. Upload an image once (by content hash), "
            "open a session, send prompts, receive only the changed box of the mask. See docs/api.md."
        ),
        lifespan=lifespan,
        # a path with a trailing slash is no endpoint (404 in the error shape): starlette would answer
        # 307 to the path without it, with an empty body and a Location built from the Host header
        redirect_slashes=False,
        dependencies=[Depends(release_parse_slot)],  # the body is parsed: the next large one may be read
    )
    app.state.segassist = state
    install_error_handlers(app)
    upload_path = f"{API_PREFIX}/images"
    limits = settings.limits
    app.add_middleware(
        BodyLimitMiddleware,
        limit_for=lambda path: limits.max_body_bytes if path == upload_path else limits.max_json_bytes,
        parse_slots=lambda path: None if path == upload_path else state.json_parses,
    )
    public = (f"{API_PREFIX}/health", app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url)
    app.add_middleware(TokenGateMiddleware, state=state, public=[p for p in public if p])  # outermost: runs first
    routers = (meta, routes_images.router, routes_sessions.router, routes_learning.router)
    for router in routers:
        app.include_router(router, prefix=API_PREFIX)
    app.state.route_methods = route_methods(API_PREFIX, routers)  # the Allow header of a 405
    return app
