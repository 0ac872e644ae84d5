"""The HTTP layer: one requests session per thread, timeouts, safe retries, typed errors.

Retries: a request is retried (a few times, with a short backoff) when the connection fails or
the server answers 503, and only if it is *safe* to repeat. Reads are; uploads are (an image is
stored under its content hash, twice is once); and so are the state-changing requests that carry
a request id (``once=True``: prompts, undo/redo/reset, session opens, label saves, next case),
which the server answers from its record of the first instead of applying them twice. Training,
rollback and adding a case carry none and are never repeated. A read timeout is not retried (the
server may still be working on the request) unless the request carries an id: then it is sent once
more under that id, which waits for the first's outcome. So is a request with an id answered by a
gateway instead of the server (a reverse proxy's 502/504, or any 5xx not in SegAssist's error shape):
the server may have done it all the same.

Authentication: the token travels through the session's ``auth`` (:class:`_BearerAuth`), so that
requests never takes credentials from ``~/.netrc`` instead (it would for a session without ``auth``),
not even after a redirect. Ids go into URL paths through :func:`path_id`, queries through ``params``.
"""

from __future__ import annotations

import ipaddress
import math
import os
import ssl
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, TypeVar, Union
from urllib.parse import quote, urlsplit

import requests
from pydantic import BaseModel, ValidationError

from SegAssistLib.api_models import ACCEPT_CODECS_HEADER, REQUEST_ID_HEADER
from SegAssistLib.client.errors import (
    BackendTimeoutError,
    BackendUnavailableError,
    ClientError,
    ProtocolError,
    ServerBusyError,
    error_for,
)
from SegAssistLib.errors import SegAssistError
from SegAssistLib.transport import available_codecs

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

#: seconds, or (connect, read) seconds; None (or None in the pair) waits without limit, as in requests
Timeout = Union[None, float, Tuple[Optional[float], Optional[float]]]
DEFAULT_TIMEOUT: Tuple[float, float] = (5.0, 120.0)  # connect, read (a click may wait in a queue)


def new_request_id() -> str:
    return uuid.uuid4().hex


def path_id(value: str, what: str = "id") -> str:
    """``value`` as one URL path segment, every reserved character escaped.

    An id that could leave its segment even so is refused (``ValueError``) before anything is sent:
    empty, ``.`` or ``..`` (removed or resolved on the way), or holding a slash or backslash (an ASGI
    server decodes ``%2F`` before routing) or a control character.
    """
    if not isinstance(value, str):
        raise TypeError(f"the {what} must be a string, got {type(value).__name__}")
    if value in ("", ".", "..") or "/" in value or "\\" in value or not value.isprintable():
        raise ValueError(f"not a valid {what}: {value!r}")
    return quote(value, safe="")


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this computer: a token may go there over plain http."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_loopback_url(url: str) -> bool:
    return is_loopback_host(urlsplit(url).hostname or "")


# the connection failed or a reply was cut off: nothing (or not all) came back, so the request may be
# repeated where safe, and a state-changing one may have been done
_CONNECTION_LOST = (
    requests.exceptions.ConnectionError,
    requests.exceptions.ConnectTimeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)

#: the code of the BackendUnavailableError of a server whose TLS certificate could not be verified
#: (its ``details``: ``url`` and ``reason``); never a server code
TLS_UNTRUSTED = "tls_untrusted"


def _certificate_failure(exc: BaseException) -> Optional[ssl.SSLCertVerificationError]:
    """The verification failure of the server's certificate behind ``exc`` (requests wraps urllib3's
    error, which wraps ssl's), if that is why the request failed."""
    pending: List[BaseException] = [exc]
    seen = set()
    while pending:
        error = pending.pop()
        if isinstance(error, ssl.SSLCertVerificationError):
            return error
        if id(error) in seen:
            continue
        seen.add(id(error))
        linked = (*error.args, getattr(error, "reason", None), error.__cause__, error.__context__)
        pending.extend(x for x in linked if isinstance(x, BaseException))
    return None


# the code of an error reply not in SegAssist's shape (a proxy's or a gateway's page); never a server code
_NOT_SEGASSIST = "http_error"
# statuses only a gateway in front of the server answers (bad gateway, gateway timeout), whatever the body
_GATEWAY_ONLY = (502, 504)


def _reply_lost(error: ClientError) -> bool:
    """Whether a request with an id may have been done although ``error`` came back: no reply at
    all, or a 5xx from a gateway rather than from the server (502, 504, or a 503 or 500 page not
    in SegAssist's shape). The server's own 503 (queue full, shutting down) says it was not done."""
    if isinstance(error, BackendUnavailableError):
        return True
    status = error.status or 0
    if error.code == _NOT_SEGASSIST:
        return status >= 500
    return status in _GATEWAY_ONLY


def _checked_timeout(timeout: Timeout) -> Timeout:
    """``timeout`` if it is seconds > 0, None (no limit), or a (connect, read) pair of those."""
    values = timeout if isinstance(timeout, tuple) else (timeout,)
    fine = len(values) == (2 if isinstance(timeout, tuple) else 1) and all(
        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0)
        for v in values
    )
    if not fine:
        raise ValueError(
            f"timeout must be seconds above 0, None (no limit) or a (connect, read) pair of those; got {timeout!r}"
        )
    return timeout


class HttpClient:
    def __init__(
        self,
        base_url: str,
        token: Optional[str] = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        retries: int = 2,
        verify: Union[bool, str] = True,
        allow_insecure_token: bool = False,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"backend URL must be http(s)://host:port, got {base_url!r}")
        if token and parts.scheme == "http" and not _is_loopback_url(base_url) and not allow_insecure_token:
            raise ValueError(
                f"refusing to send a token in clear text to {parts.hostname}: use https:// (or pass "
                "allow_insecure_token=True on a network you trust)"
            )
        token = token.strip() if token else token  # a token read from a file keeps its newline
        if token and any(ch.isspace() or not ch.isprintable() for ch in token):
            raise ValueError("the token holds spaces or control characters; check the token file")  # never echo it
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = _checked_timeout(timeout)
        self.retries = retries
        self.verify = verify
        self._local = threading.local()  # requests.Session is not meant to be shared across threads
        self._sessions: List[requests.Session] = []  # every thread's, so that close() ends them all
        self._sessions_lock = threading.Lock()
        # A proxy from the environment (http_proxy, common on hospital networks) must not see
        # loopback traffic: it cannot reach this machine's backend, and the token would pass through it
        self._use_environment_proxies = not _is_loopback_url(base_url)
        # without the environment, requests would also forget the CA bundle it names (an https
        # tunnel to localhost trusted through REQUESTS_CA_BUNDLE): pass that on by hand
        self._verify = verify
        if verify is True and not self._use_environment_proxies:
            self._verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True

    @property
    def session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = _Session()
            s.trust_env = self._use_environment_proxies
            s.headers["User-Agent"] = "segassist-client"
            s.headers[ACCEPT_CODECS_HEADER] = ",".join(c for c in available_codecs() if c != "none")
            # the token as the session's auth, not a header: requests consults ~/.netrc (or $NETRC)
            # only for a request without auth, and a matching entry would replace the token (and
            # send that password to this server); set even without a token, so netrc never counts
            s.auth = _BearerAuth(self.token)
            self._local.session = s
            with self._sessions_lock:
                self._sessions.append(s)
        return s

    def close(self) -> None:
        """Close the connections of every thread that used this client (a thread that uses it again
        opens new ones)."""
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
            self._local = threading.local()
        for s in sessions:
            s.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        body: Optional[Callable[[], Any]] = None,
        headers: Optional[Dict[str, str]] = None,
        timeout: Optional[Timeout] = None,
        safe: bool = True,
        auth: bool = True,
        once: bool = False,
        params: Optional[Dict[str, Any]] = None,
    ) -> requests.Response:
        """Send a request; returns a 2xx response or raises a :class:`ClientError`.

        ``path``: ids in it go through :func:`path_id`; ``params``: the query (encoded by requests).
        ``body()`` makes a fresh body for each attempt (a file-like object cannot be re-read).
        ``safe``: the request may be repeated after a connection failure or a 503.
        ``once``: a state-changing request that must take effect once: it carries a new request id,
        and when no reply of the server's comes (connection lost, read timeout, a gateway's 502/503/504
        or any 5xx not in SegAssist's error shape) it is sent once more under that id, which the
        server answers from its record of the first (after the first, if that still runs), never by
        doing it twice. An error of that second sending has ``outcome_unknown``; so has a 5xx of the
        server's own other than 503 (a failure it did not foresee, maybe half-way: not sent again,
        since the server forgets a failed request and would run it a second time).
        """
        if not once:
            return self._send(method, path, json, body, headers, timeout, safe, auth, params)
        headers = {**(headers or {}), REQUEST_ID_HEADER: new_request_id()}
        try:
            return self._send(method, path, json, body, headers, timeout, True, auth, params)
        except ClientError as exc:
            # no reply of the server's, but it may have done it (it does not stop a request whose
            # client left, and a gateway's timeout does not stop it either)
            if not _reply_lost(exc):
                if (exc.status or 0) >= 500 and exc.status != 503:
                    exc.outcome_unknown = True
                raise
        try:
            return self._send(method, path, json, body, headers, timeout, True, auth, params)
        except ClientError as exc:
            exc.outcome_unknown = True
            raise

    def _send(
        self,
        method: str,
        path: str,
        json: Any,
        body: Optional[Callable[[], Any]],
        headers: Optional[Dict[str, str]],
        timeout: Optional[Timeout],
        safe: bool,
        auth: bool,
        params: Optional[Dict[str, Any]] = None,
    ) -> requests.Response:
        url = self.base_url + path
        attempts = 1 + (self.retries if safe else 0)
        last: Optional[ClientError] = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(min(2.0, 0.2 * 2 ** (attempt - 1)))  # backoff between retries
            try:
                response = self.session.request(
                    method,
                    url,
                    params=params,
                    json=json,
                    data=body() if body is not None else None,
                    headers=headers,
                    timeout=timeout or self.timeout,
                    verify=self._verify,
                    auth=None if auth else _NoAuth(),
                )
            except requests.exceptions.ReadTimeout as exc:
                raise BackendTimeoutError(
                    f"{method} {path}: no answer from {self.base_url} within the read timeout "
                    f"({self._read_timeout(timeout)} s); the server may be busy"
                ) from exc
            except _CONNECTION_LOST as exc:
                failure = _certificate_failure(exc)
                if failure is not None:  # not retried: the same certificate comes back
                    raise self._untrusted(failure) from exc
                self.close()  # drop pooled connections: the server may have restarted
                last = BackendUnavailableError(f"cannot reach the SegAssist backend at {self.base_url}: {exc}")
                continue
            except requests.exceptions.TooManyRedirects as exc:  # a SegAssist server never redirects
                raise ProtocolError(
                    f"{method} {path}: {url} redirects again and again (is {self.base_url} a SegAssist server?)"
                ) from exc
            except requests.exceptions.RequestException as exc:  # any other failure of requests itself
                raise BackendUnavailableError(
                    f"{method} {path}: the request to {url} failed: {one_line(exc)}"
                ) from exc
            if response.status_code < 400:
                return response
            error = self._error(response)
            if isinstance(error, ServerBusyError) and attempt + 1 < attempts:
                last = error
                continue
            raise error
        assert last is not None
        raise last

    def _untrusted(self, failure: ssl.SSLCertVerificationError) -> BackendUnavailableError:
        """The error of a server certificate that did not verify: one line that says what to pass."""
        reason = failure.verify_message or failure.reason or str(failure)
        where = f"the CA bundle {self._verify}" if isinstance(self._verify, str) else "the system's certificates"
        return BackendUnavailableError(
            f"the TLS certificate of {self.base_url} could not be verified against {where} ({reason}): pass "
            "the server's certificate, or its certificate authority's, as verify=PATH",
            code=TLS_UNTRUSTED,
            details={"url": self.base_url, "reason": reason},
        )

    def _pair(self, timeout: Optional[Timeout] = None) -> Tuple[Optional[float], Optional[float]]:
        """(connect, read) seconds of ``timeout``, else of the client's default (None: no limit)."""
        t = timeout or self.timeout
        return t if isinstance(t, tuple) else (t, t)

    def _read_timeout(self, timeout: Optional[Timeout]) -> Optional[float]:
        return self._pair(timeout)[1]

    def upload_timeout(self) -> Tuple[Optional[float], Optional[float]]:
        """Timeouts for a large body: urllib3 sends the body under the *connect* timeout, and a server
        at its upload limit stops reading until a slot frees, so sending gets the read timeout too."""
        connect, read = self._pair()
        if connect is None or read is None:
            return (None, read)
        return (max(connect, read), read)

    def read_timeout_plus(self, seconds: float) -> Tuple[Optional[float], Optional[float]]:
        """The default timeouts with ``seconds`` more to read the reply (a replay of many prompts)."""
        connect, read = self._pair()
        return (connect, None if read is None else read + seconds)

    @staticmethod
    def _error(response: requests.Response) -> ClientError:
        try:
            body = response.json()["error"]
            return error_for(int(body["status"]), str(body["code"]), str(body["message"]), body.get("details"))
        except (ValueError, KeyError, TypeError):
            text = response.text[:200].strip()
            return error_for(
                response.status_code,
                _NOT_SEGASSIST,
                f"HTTP {response.status_code} without the SegAssist error shape "
                f"(is {response.url} a SegAssist server?): {text}",
            )

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        if response.status_code == 204:
            return None
        try:
            return response.json()
        except ValueError as exc:
            error = ProtocolError(f"{method} {path}: the reply is not JSON: {response.text[:200]!r}")
            # a 2xx came back: a request that changes something was done, whatever the reply says
            error.outcome_unknown = bool(kwargs.get("once"))
            raise error from exc

    def reply(self, method: str, path: str, parse: Callable[[Any], T], **kwargs: Any) -> T:
        """The JSON reply to a request (``kwargs`` as for :meth:`request`), read by ``parse`` (a reply
        model's ``model_validate``, :func:`list_of`, ...); a reply ``parse`` refuses raises
        :class:`ProtocolError` (see :func:`parsed_reply`)."""
        return parsed_reply(f"{method} {path}", parse, self.json(method, path, **kwargs), bool(kwargs.get("once")))


def parsed_reply(route: str, parse: Callable[[Any], T], data: Any, once: bool = False) -> T:
    """``parse(data)``, where ``data`` is what the server answered to ``route`` with a 2xx. A reply that
    is not what the API promises (a field missing or of the wrong type, ``null``, a list for an
    object, an array that does not decode) raises :class:`ProtocolError` with one line naming the
    route, never the parser's own exception: every error the client raises is a ClientError.
    ``once``: the request was one that must take effect once; a 2xx says it did, so the error has
    ``outcome_unknown``."""
    try:
        return parse(data)
    except ClientError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, SegAssistError) as exc:
        error = ProtocolError(f"{route}: the reply is not what the API promises ({one_line(exc)})")
        error.outcome_unknown = once
        raise error from exc


def list_of(model: Type[M]) -> Callable[[Any], List[M]]:
    """A ``parse`` for :meth:`HttpClient.reply` of a JSON list of ``model`` (a JSON object is no list)."""

    def parse(data: Any) -> List[M]:
        if not isinstance(data, list):
            raise TypeError(f"a list was expected, not {type(data).__name__}")
        return [model.model_validate(item) for item in data]

    return parse


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line (pydantic's lists every field on lines of its own)."""
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False)
        first = errors[0] if errors else {}
        where = "".join(f".{x}" if isinstance(x, str) else f"[{x}]" for x in first.get("loc", ()))
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        text = f"{exc.title}{where}: {first.get('msg', 'invalid')}{more}"
    else:
        text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _BearerAuth(requests.auth.AuthBase):
    """``Authorization: Bearer <token>`` (nothing without a token), as a session's ``auth``."""

    def __init__(self, token: Optional[str]) -> None:
        self._token = token

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        if self._token:
            r.headers["Authorization"] = f"Bearer {self._token}"
        return r

    def __repr__(self) -> str:
        return "_BearerAuth(***)"  # never the token


class _Session(requests.Session):
    """A requests session that never takes credentials from ``~/.netrc``: after a redirect to another
    host, requests drops the Authorization header and then applies netrc when it trusts the
    environment; here it only drops the header."""

    def rebuild_auth(self, prepared_request: requests.PreparedRequest, response: requests.Response) -> None:
        headers = prepared_request.headers
        if "Authorization" in headers and self.should_strip_auth(response.request.url, prepared_request.url):
            del headers["Authorization"]

    def close(self) -> None:
        """Close every pooled connection now. urllib3 2 closes a pool's connections only once nothing
        holds the pool, and a reply does (an error raised from a local variable keeps its frame, and
        so its reply, in a reference cycle until the garbage collector runs): the connection of a
        failed request stayed open after close(), and a TLS server's shutdown waited for it."""
        for adapter in self.adapters.values():
            pools = getattr(getattr(adapter, "poolmanager", None), "pools", None)
            for key in list(pools.keys()) if pools is not None else []:
                pool = pools.get(key)
                if pool is not None:
                    pool.close()
        super().close()


class _NoAuth(requests.auth.AuthBase):
    """Strip the session's Authorization header (health needs no token)."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers.pop("Authorization", None)
        return r


class ProgressBody:
    """A bytes body that reports upload progress; has a length, so Content-Length is sent.

    ``callback(sent_bytes, total_bytes)`` runs on the uploading thread, at most about a hundred
    times per upload (every 1 %) and always once at the end.
    """

    def __init__(self, data: bytes, callback: Optional[Callable[[int, int], None]], chunk: int = 1 << 20):
        self._view = memoryview(data)
        self._pos = 0
        self._callback = callback
        self._chunk = chunk
        self.len = len(data)
        self._step = max(1, self.len // 100)
        self._reported = -1

    def __len__(self) -> int:
        return self.len

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self.len - self._pos
        size = min(size, self._chunk, self.len - self._pos)
        out = bytes(self._view[self._pos : self._pos + size])
        self._pos += size
        due = self._pos == self.len or self._pos - self._reported >= self._step
        if self._callback is not None and due and self._pos != self._reported:
            self._reported = self._pos
            self._callback(self._pos, self.len)
        return out
