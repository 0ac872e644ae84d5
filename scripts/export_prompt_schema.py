"""Write docs/prompt-log.schema.json, the JSON schema of a prompt log (a test fails when it is stale)."""

import json
from pathlib import Path

from SegAssistLib.prompts import prompt_log_json_schema

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "docs" / "prompt-log.schema.json"


def render() -> str:
    return json.dumps(prompt_log_json_schema(), indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    SCHEMA_FILE.write_text(render())
    print(f"wrote {SCHEMA_FILE}")
