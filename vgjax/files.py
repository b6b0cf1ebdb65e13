"""Result files written whole or not at all: a kill never leaves half a file that a later run
would read as done."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: str | Path, data: dict, *, allow_nan: bool = True) -> None:
    """Writes `data` as indented JSON to path.tmp (creating the folder), then renames it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=allow_nan) + "\n")
    tmp.replace(path)
