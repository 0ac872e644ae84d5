"""Per-user bearer tokens, stored hashed and compared in constant time.

Tokens are 256-bit random strings made by :func:`new_token`, so a plain SHA-256 of the token is a
safe thing to store: slow, salted password hashes exist to protect guessable passwords, and
nothing guesses 256 random bits from their hash. The server keeps only the hashes, in memory and
in the token file, one user per line::

    # comments and blank lines are ignored
    alice:sha256:6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b

A presented token is hashed and compared with *every* stored hash with
:func:`hmac.compare_digest`, so the time taken says nothing about which user, if any, matched.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from SegAssistLib.users import USER_NAME_RULE, is_user_name

MIN_TOKEN_CHARS = 16
TOKEN_ENV = "SEGASSIST_TOKEN"
TOKEN_USER_ENV = "SEGASSIST_TOKEN_USER"


def new_token() -> str:
    """32 random bytes as URL-safe text, never starting with ``-``: a command line would read such a
    token as an option (``--token -umAS...`` fails), so such a draw (one in 64) is drawn again; the
    token keeps more than 255 bits of randomness."""
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_token_file(path: Path) -> List[Tuple[str, str]]:
    """``(user, hash)`` pairs of a token file; raises ValueError naming the bad line."""
    entries: List[Tuple[str, str]] = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) != 3 or parts[1] != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", parts[2]):
            raise ValueError(
                f"{path}:{number}: expected 'user:sha256:<64 hex digits>' (plain tokens are not stored; "
                "use `segassist serve --issue-token USER --token-file FILE`)"
            )
        if not is_user_name(parts[0]):
            raise ValueError(f"{path}:{number}: user name {parts[0]!r} is not valid: {USER_NAME_RULE}")
        entries.append((parts[0], parts[2]))
    return entries


def issue_token(path: Path, user: str) -> str:
    """Make a token for ``user``, append its hash to the token file (mode 0600), return the token."""
    if not is_user_name(user):
        raise ValueError(f"user name {user!r} is not valid: {USER_NAME_RULE}")
    path = Path(path)
    if path.exists() and any(u == user for u, _ in parse_token_file(path)):
        raise ValueError(f"{path} already has a token for {user!r}: remove its line first to replace it")
    token = new_token()
    line = f"{user}:sha256:{hash_token(token)}\n".encode()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "r+b") as f:
        if not _ends_line(f.fileno()):  # a file edited by hand often lacks its final newline
            line = b"\n" + line
        f.write(line)  # one write, at the end (O_APPEND): the other entries are never rewritten
    return token


def _ends_line(fd: int) -> bool:
    """Whether the open file is empty or ends with a newline (so that an appended line starts a line)."""
    size = os.fstat(fd).st_size
    return size == 0 or os.pread(fd, 1, size - 1) == b"\n"


def env_token_entry(environ: Optional[dict] = None) -> Optional[Tuple[str, str]]:
    """The ``(user, hash)`` of a token given in ``SEGASSIST_TOKEN`` (the local launcher's way)."""
    environ = os.environ if environ is None else environ
    token = environ.get(TOKEN_ENV)
    if not token:
        return None
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"{TOKEN_ENV} is shorter than {MIN_TOKEN_CHARS} characters: use a random token")
    user = environ.get(TOKEN_USER_ENV, "local")
    if not is_user_name(user):
        raise ValueError(f"{TOKEN_USER_ENV}={user!r} is not a valid user name: {USER_NAME_RULE}")
    return (user, hash_token(token))


class TokenVerifier:
    def __init__(self, entries: Sequence[Tuple[str, str]]) -> None:
        self._entries = [(user, bytes.fromhex(h)) for user, h in entries]

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def user_for(self, token: Optional[str]) -> Optional[str]:
        """The user owning ``token``, or None; always compares against every entry."""
        if not token:
            return None
        presented = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: Optional[str] = None
        for user, stored in self._entries:
            if hmac.compare_digest(presented, stored) and found is None:
                found = user
        return found
