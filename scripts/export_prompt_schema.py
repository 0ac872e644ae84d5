"""Write docs/prompt-log.schema.json, the JSON schema of a prompt log (a test fails when it is stale)."""

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from SegAssistLib.prompt_log import prompt_log_json_schema

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "docs" / "prompt-log.schema.json"


def render() -> str:
    return json.dumps(prompt_log_json_schema(), indent=1, sort_keys=True) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare with the committed file instead of writing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = SCHEMA_FILE.read_text() if SCHEMA_FILE.is_file() else ""
        if current != text:
            print(f"{SCHEMA_FILE} is out of date: run python scripts/export_prompt_schema.py", file=sys.stderr)
            return 1
        print(f"{SCHEMA_FILE} is current")
        return 0
    SCHEMA_FILE.write_text(text)
    print(f"wrote {SCHEMA_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
