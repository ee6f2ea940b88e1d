"""Atomic JSON output for ``results.json`` and ``config.json``."""

from __future__ import annotations

import json
import os


def write_json(path: str, payload: dict) -> None:
    """Writes ``payload`` as indented, key-sorted JSON atomically (temp file + rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)
