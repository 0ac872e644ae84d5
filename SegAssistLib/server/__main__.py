"""``python -m SegAssistLib.server``: the backend, without the rest of the ``segassist`` CLI."""

import sys

from SegAssistLib.server.cli import main

sys.exit(main())
