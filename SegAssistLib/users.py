"""User names: one rule for the server's tokens and the datastore's provenance.

A name the server accepts for a token must also be one the datastore can record as a label's
author or a case's lock holder, or that user could sign in and never save anything.
"""

from __future__ import annotations

import re
from typing import Any

_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")

#: the rule in words, for error messages
USER_NAME_RULE = "1-64 characters, letters, digits and . _ @ - (starting with a letter or digit)"


def is_user_name(value: Any) -> bool:
    """Whether ``value`` is a valid user name (the whole string: no trailing newline slips through)."""
    return isinstance(value, str) and _USER_NAME.fullmatch(value) is not None
