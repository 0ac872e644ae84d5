"""Remote servers' access tokens, kept in a file only this user can read.

Slicer's settings (``qt.QSettings``) are an INI file that other users of the computer can often
read (created with the default permissions); a token there is a password in plain sight. The
module keeps the URL and the consent in the settings and the token here: a JSON object from server
URL to token in ``<state folder>/remote_tokens.json`` (the folder of the local backend's state,
``$SEGASSIST_STATE_DIR`` or the platform's per-user state folder), written whole and atomically
with mode 0600.

Torch-free and Qt-free (it runs in Slicer's Python).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Dict, Optional

from SegAssistLib.errors import SegAssistError

TOKEN_FILE_NAME = "remote_tokens.json"


class TokenFileError(SegAssistError):
    """The token file cannot be read or written (the message names it and says why)."""

    code = "token_file"


def _key(url: str) -> str:
    return url.strip().rstrip("/")


class TokenFile:
    """Tokens by server URL (a trailing slash does not matter); ``path``: where the file is."""

    _lock = threading.Lock()  # the panel and the effect may save at once

    def __init__(self, path: Optional[Path] = None) -> None:
        if path is None:
            from SegAssistLib.client.local import default_state_dir

            path = default_state_dir() / TOKEN_FILE_NAME
        self.path = Path(path)

    def _read(self) -> Dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise TokenFileError(f"cannot read the token file {self.path}: {exc}") from exc
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise TokenFileError(f"the token file {self.path} is damaged: delete it and enter the token again")
        return {str(k): v for k, v in data.items()}

    def get(self, url: str) -> str:
        """The token saved for ``url`` ("" when none)."""
        with self._lock:
            return self._read().get(_key(url), "")

    def set(self, url: str, token: str) -> None:
        """Save ``token`` for ``url``; an empty token forgets it. The file is rewritten whole."""
        key, token = _key(url), token.strip()
        with self._lock:
            tokens = self._read()
            if tokens.get(key, "") == token:
                return
            if token:
                tokens[key] = token
            else:
                tokens.pop(key, None)
            self._write(tokens)

    def _write(self, tokens: Dict[str, str]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tokens-")
            try:
                os.chmod(tmp, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(tokens, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as exc:
            raise TokenFileError(f"cannot write the token file {self.path}: {exc}") from exc
