"""A case's subject (the patient it shows; the hold-out split keeps a subject's cases together):
checked as it is stored, or drawn from the case's name by a pattern. Torch-free."""

from __future__ import annotations

import re
from typing import List, Optional, Sequence, Union

from SegAssistLib.learning.errors import DatastoreError
from SegAssistLib.learning.records import check_text

SubjectPattern = Union[str, re.Pattern]
_SHOWN_NAMES = 5  # non-matching case names an error lists


def check_subject(value: object) -> Optional[str]:
    """A subject as stored: None (the case is its own subject), or printable text of at most 256
    characters with its surrounding spaces dropped; an empty or blank one is refused."""
    if value is None:
        return None
    text = check_text(value, "subject") or ""
    if not text.strip():
        raise DatastoreError(
            "a subject must not be empty: to make a case its own subject give none "
            "(segassist learn subject CASE --none; at an import, leave the subject out)"
        )
    return text.strip()


def compile_subject_pattern(pattern: SubjectPattern) -> re.Pattern[str]:
    """A subject pattern (a Python regular expression) compiled; a bad one is a :class:`DatastoreError`."""
    if isinstance(pattern, re.Pattern):
        return pattern
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as exc:
        raise DatastoreError(f"invalid subject pattern {pattern!r}: {exc}") from None


def subject_from_name(name: str, pattern: SubjectPattern) -> Optional[str]:
    """The subject ``pattern`` finds in a case name (``re.search``): its first group that took part
    in the match, else the whole match. None when the pattern does not match or finds only spaces
    (the caller refuses such a name rather than guess).

    ``^(patient\\d+)_`` makes ``patient001_frame01`` and ``patient001_frame12`` subject ``patient001``;
    ``^(patient\\d+)_|^.+`` also lets a name it does not match be its own subject (the whole name)."""
    match = compile_subject_pattern(pattern).search(name)
    if match is None:
        return None
    found = next((g for g in match.groups() if g is not None), match.group(0))
    return found.strip() or None


def subjects_from_names(names: Sequence[str], pattern: SubjectPattern) -> List[str]:
    """The subject of each case name (see :func:`subject_from_name`); a :class:`DatastoreError` naming
    the cases the pattern finds no subject in, so that nothing is imported or changed with a guess."""
    compiled = compile_subject_pattern(pattern)
    found = [subject_from_name(name, compiled) for name in names]
    missing = [name for name, subject in zip(names, found) if subject is None]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:_SHOWN_NAMES]) + (", ..." if len(missing) > _SHOWN_NAMES else "")
        raise DatastoreError(
            f"the subject pattern {compiled.pattern!r} finds no subject in {len(missing)} of the {len(names)} "
            f"case name(s): {shown}. No case was imported or changed: fix the pattern (an alternative such as "
            "'|^.+' makes a name it does not match its own subject), or import those images separately"
        )
    return [check_subject(s) for s in found]  # type: ignore[misc]
