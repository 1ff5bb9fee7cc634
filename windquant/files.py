"""Atomic file writes: a reader never sees a half-written file, a crash leaves the old one."""

from __future__ import annotations

import json
import os
from pathlib import Path


def temp_path_for(path: str | Path) -> Path:
    """A hidden temporary name beside ``path`` (its folder created) to write to and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")  # concurrent writers never share a temp file


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    tmp = temp_path_for(path)
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def atomic_write_json(path: str | Path, payload) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=1) + "\n")
