"""The bench scripts' last step: the result as one JSON line on stdout and, when asked, the same line in a file."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shards.schema import atomic_write_bytes  # noqa: E402


def emit(result: dict, json_path: str | os.PathLike | None) -> None:
    line = json.dumps(result)
    print(line)
    if json_path:
        atomic_write_bytes(Path(json_path), (line + "\n").encode())
