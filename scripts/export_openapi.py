"""Write the server's OpenAPI schema to docs/openapi.json (or check that the file is current).

    python scripts/export_openapi.py            # write docs/openapi.json
    python scripts/export_openapi.py --check    # exit 1 when docs/openapi.json is out of date

The schema comes from the app itself; building the app loads no model (workers start with the
server, not with the app), so this needs neither torch nor a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "openapi.json"


def build_schema() -> dict:
    sys.path.insert(0, str(REPO))
    from SegAssistLib.server.app import create_app
    from SegAssistLib.server.settings import ServerSettings

    return create_app(ServerSettings()).openapi()


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    text = render(build_schema())
    if args.check:
        current = args.out.read_text() if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is out of date: run python scripts/export_openapi.py", file=sys.stderr)
            return 1
        print(f"{args.out} is current")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
