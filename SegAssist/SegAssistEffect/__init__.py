"""The SegAssist segment editor effect (package of helpers; the effect itself is SegmentEditorEffect.py).

Importing this package makes ``SegAssistLib`` importable when SegAssist runs from a source
checkout ("Additional module paths" pointing at the ``SegAssist`` folder): the library then sits
two folders up. An installed extension has it beside the module, already on ``sys.path``.
"""

import os
import sys


def _ensure_library_path() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.dirname(here), os.path.dirname(os.path.dirname(here))):
        if os.path.isfile(os.path.join(candidate, "SegAssistLib", "__init__.py")):
            if candidate not in sys.path:
                sys.path.insert(0, candidate)
            return


_ensure_library_path()
