"""``segassist serve`` (and ``python -m SegAssistLib.server``): options, checks, start."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import signal
import ssl
import sys
import threading
from pathlib import Path
from typing import List, Optional, Tuple

from SegAssistLib.cli_types import positive_int
from SegAssistLib.engine.edges import DEFAULT_EDGE_BAND
from SegAssistLib.evaluation.cli import EDGE_BAND_HELP, edge_band, refine_depth
from SegAssistLib.files import output_problem
from SegAssistLib.server.auth import env_token_entry, issue_token, parse_token_file
from SegAssistLib.server.settings import (
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_LIMIT_CONCURRENCY,
    Limits,
    ServerSettings,
    check_exposure,
)

log = logging.getLogger("segassist.server")

_EPILOG = """\
Authentication: each user has a token; the server stores only its SHA-256. Make one with
  segassist serve --token-file tokens.txt --issue-token alice
(the token is printed once), or give one token in the environment variable SEGASSIST_TOKEN.
Without any token the server listens on loopback only.

TLS: give --tls-cert and --tls-key, or run behind a reverse proxy that terminates TLS and forwards
to 127.0.0.1 (then pass --proxy-headers --forwarded-allow-ips <proxy address>). See docs/api.md.
"""


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8470, help="port (default 8470; 0: any free port, see --port-file)")
    p.add_argument("--model", type=Path, default=None, help="checkpoint file (default: the bundled model)")
    p.add_argument("--device", default="cpu", help="device(s), comma-separated (cpu, cuda:0,cuda:1): one worker each")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--refine-depth", type=refine_depth, default=1, metavar="N",
                   help="re-predict zoomed-out answers this many levels finer (default 1; 2 sharpens large "
                        "structures at about twice the latency of such clicks)")
    p.add_argument("--edge-band", type=edge_band, default=DEFAULT_EDGE_BAND, metavar="B",
                   help=EDGE_BAND_HELP.replace("builtin: ", ""))
    p.add_argument("--token-file", type=Path, default=None, help="lines 'user:sha256:<hex>' (see below)")
    p.add_argument("--issue-token", metavar="USER", default=None, help="add a token for USER and exit")
    p.add_argument("--data-dir", type=Path, default=None, help="keep uploaded images here across restarts")
    p.add_argument("--learn-store", type=Path, default=None, metavar="DIR",
                   help="learning datastore (created if missing, never in a folder of other files): enables "
                        "/v1/learn and adapter hot swap")
    p.add_argument("--tls-cert", type=Path, default=None, help="TLS certificate (PEM)")
    p.add_argument("--tls-key", type=Path, default=None, help="TLS private key (PEM)")
    p.add_argument("--proxy-headers", action="store_true", help="trust X-Forwarded-* from --forwarded-allow-ips")
    p.add_argument("--forwarded-allow-ips", default="127.0.0.1", help="reverse proxy addresses to trust")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    c = p.add_argument_group("connections")
    c.add_argument(
        "--limit-concurrency",
        type=positive_int,
        default=DEFAULT_LIMIT_CONCURRENCY,
        metavar="N",
        help="open connections (and requests in progress) above which new requests are answered 503 "
        "(default: %(default)s); a server beyond loopback belongs behind a reverse proxy with header "
        "timeouts (see docs/api.md)",
    )
    c.add_argument(
        "--timeout-keep-alive",
        type=positive_int,
        default=DEFAULT_KEEP_ALIVE_S,
        metavar="S",
        help="seconds an idle connection stays open after its last reply (default: %(default)s)",
    )
    g = p.add_argument_group("limits")
    defaults = Limits()
    for name, field in Limits.model_fields.items():
        kind = float if isinstance(getattr(defaults, name), float) else int
        g.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=getattr(defaults, name),
            help=f"{field.description or name.replace('_', ' ')} (default: %(default)s)",
        )
    h = p.add_argument_group("launcher (used by the client's LocalBackend)")
    h.add_argument("--port-file", type=Path, default=None, help="write the port here once listening")
    h.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop when standard input closes (the launching process ended)",
    )


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand; its handler is :func:`run_serve`."""
    p = subparsers.add_parser(
        "serve",
        help="run the backend server",
        description="Run the SegAssist backend: sessions, auth, limits, one inference worker per device.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)
    return p


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    entries = parse_token_file(args.token_file) if args.token_file else []
    env_entry = env_token_entry()
    if env_entry:
        entries.append(env_entry)
    limits = Limits(**{name: getattr(args, name) for name in Limits.model_fields})
    return ServerSettings(
        host=args.host,
        port=args.port,
        model=args.model,
        devices=devices_from_arg(args.device),
        refine_depth=args.refine_depth,
        edge_band=args.edge_band,
        token_hashes=entries,
        data_dir=args.data_dir,
        learn_store=args.learn_store,
        limits=limits,
        tls_certfile=args.tls_cert,
        tls_keyfile=args.tls_key,
    )


def devices_from_arg(text: str) -> Tuple[str, ...]:
    """The devices of ``--device`` (comma-separated); one that names none (``--device "$GPUS"`` with
    the variable unset) is refused here, not by a traceback once the model is loaded."""
    devices = tuple(d.strip() for d in text.split(",") if d.strip())
    if not devices:
        raise ValueError(f"--device {text!r} names no device: give one or more, comma-separated (cpu, cuda:0,cuda:1)")
    return devices


def _watch_parent(server) -> None:
    """Stop the server when stdin reaches end of file: the launching process is gone."""

    def watch() -> None:
        try:
            while sys.stdin.buffer.read(1):
                pass
        except (OSError, ValueError):
            pass
        log.info("the launching process ended: shutting down")
        server.should_exit = True

    threading.Thread(target=watch, name="segassist-parent-watch", daemon=True).start()


def _fail(message: object) -> int:
    print(f"segassist serve: error: {message}", file=sys.stderr)
    return 2


def _one_line(exc: Exception) -> str:
    """A pydantic validation error as one line per field, joined; other errors as they are."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            return "; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in errors())
        except (TypeError, KeyError):
            pass
    return str(exc)


def check_paths(args: argparse.Namespace) -> None:
    """Files and folders the server will need, checked before it loads a model or binds a port."""
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key), ("--model", args.model)):
        if path is not None and not path.is_file():
            raise ValueError(f"{flag} {path}: no such file")
    if args.tls_cert is not None and args.tls_key is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(args.tls_cert), str(args.tls_key))
        except ssl.SSLError as exc:
            raise ValueError(f"--tls-cert {args.tls_cert} / --tls-key {args.tls_key}: not a PEM certificate and "
                             f"its private key ({exc.reason or exc})") from None
    for flag, path, folder in (("--data-dir", args.data_dir, True), ("--learn-store", args.learn_store, True),
                               ("--port-file", args.port_file, False)):
        problem = output_problem(path, folder=folder) if path is not None else None
        if problem:
            raise ValueError(f"{flag} {path}: {problem}")


def missing_extras() -> Optional[str]:
    """What ``serve`` needs that this install lacks, as one message naming every extra that brings it
    (``pip install 'segassist[engine,server]'``), so that one install fixes it; None: nothing missing."""
    from SegAssistLib.cli import EXTRA_OF

    needed = {name: extra for name, extra in EXTRA_OF.items() if extra in ("engine", "server")}
    missing = [name for name in needed if not _installed(name)]
    if not missing:
        return None
    extras = ",".join(sorted({needed[name] for name in missing}))
    return f"this command needs {', '.join(missing)}, which this install lacks: pip install 'segassist[{extras}]'"


def _installed(module: str) -> bool:
    """Whether ``module`` can be found (not imported: torch takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder that refuses it, or a module without a spec
        return False


def check_model(model: Optional[Path]) -> None:
    """Load the model the workers will load (None: the bundled one) once, on the CPU, before the port is
    bound: a file that is not a checkpoint it can run is a one-line error (a
    :class:`~SegAssistLib.errors.ModelError`), not a traceback of the failed start."""
    from SegAssistLib.engine.builtin import load_default_engine

    load_default_engine(model)


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.issue_token is not None:
        if not args.issue_token.strip():
            return _fail("--issue-token needs the user name the token is for")
        if not args.token_file:
            return _fail("--issue-token needs --token-file")
        try:
            token = issue_token(args.token_file, args.issue_token)
        except OSError as exc:
            return _fail(f"cannot write the token file {args.token_file}: {exc.strerror or exc}")
        except ValueError as exc:
            return _fail(exc)
        print(token)
        print(f"token for {args.issue_token!r} added to {args.token_file}; it is not shown again", file=sys.stderr)
        return 0
    try:
        check_paths(args)
        settings = settings_from_args(args)
        check_exposure(settings)
    except (ValueError, OSError) as exc:
        return _fail(_one_line(exc))
    missing = missing_extras()
    if missing:
        return _fail(missing)
    from SegAssistLib.engine.network import torch_device
    from SegAssistLib.errors import SegAssistError

    try:
        for device in settings.devices:
            torch_device(device)
        check_model(settings.model)
    except SegAssistError as exc:  # an unknown device, a file that is not a checkpoint
        return _fail(exc)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from SegAssistLib.server.app import create_app
    from SegAssistLib.server.runner import bind_socket, uvicorn_server, write_port_file

    try:
        sock = bind_socket(settings.host, settings.port)
    except OSError as exc:
        return _fail(f"cannot listen on {settings.host}:{settings.port}: {exc}")
    port = sock.getsockname()[1]
    server = uvicorn_server(
        create_app(settings),
        log_level=args.log_level,
        ssl_certfile=str(settings.tls_certfile) if settings.tls_certfile else None,
        ssl_keyfile=str(settings.tls_keyfile) if settings.tls_keyfile else None,
        proxy_headers=args.proxy_headers,
        forwarded_allow_ips=args.forwarded_allow_ips,
        limit_concurrency=args.limit_concurrency,
        timeout_keep_alive=args.timeout_keep_alive,
    )
    if args.exit_with_parent:
        _watch_parent(server)
    if args.port_file:
        write_port_file(args.port_file, port)
    scheme = "https" if settings.tls_certfile else "http"
    log.info("SegAssist backend on %s://%s:%d (auth %s)", scheme, settings.host, port,
             "on" if settings.auth_required else "off: loopback only")  # fmt: skip
    # uvicorn shuts down on SIGTERM, then raises it again under the handler found before it ran: the
    # default one ended the process before the port file was removed. So this one is there during the
    # run; afterwards the caller's handler is back and gets the signal (by default: the process ends
    # by SIGTERM, a clean stop for systemd and other supervisors).
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    terminated = False
    try:
        server.run(sockets=[sock])
    except _Terminated:
        terminated = True
    finally:  # a launcher must not find the port of a server that is gone
        if args.port_file:
            args.port_file.unlink(missing_ok=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if terminated:
        signal.raise_signal(signal.SIGTERM)
    return 0 if server.started else 3


class _Terminated(BaseException):
    """SIGTERM, raised again by uvicorn once it has shut down."""


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated()


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m SegAssistLib.server``: :func:`run_serve` run as ``segassist serve`` runs it, so that
    bad settings it finds only when building the app (a ``--learn-store`` folder holding other files, a
    damaged store, a ``--data-dir`` whose ``images`` is a file) are the same one line and exit 2, not a
    traceback in the log that :class:`~SegAssistLib.client.local.LocalBackend` shows the user."""
    from SegAssistLib.cli import run_handled

    parser = argparse.ArgumentParser(
        prog="python -m SegAssistLib.server",
        description="Run the SegAssist backend server (same options as `segassist serve`).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_serve_arguments(parser)
    parser.set_defaults(func=run_serve, command="serve")
    return run_handled(parser.parse_args(argv), prog="segassist")
