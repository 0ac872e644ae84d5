"""The SegAssist backend server: FastAPI on uvicorn, one inference worker per device.

Entry points: :func:`create_app` (the ASGI app), :func:`register` and :func:`run_serve` (the
``segassist serve`` subcommand), ``python -m SegAssistLib.server``. See docs/api.md.
"""

from SegAssistLib.server.cli import register, run_serve

__all__ = ["create_app", "register", "run_serve"]


def __getattr__(name: str):
    # create_app pulls in FastAPI and the engine interface; import it only when asked for.
    if name == "create_app":
        from SegAssistLib.server.app import create_app

        return create_app
    raise AttributeError(name)
