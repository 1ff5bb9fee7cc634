"""Integrity of a checkpoint: a digest per stored tensor, and the disk space a write needs."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

from windquant.errors import WindquantError

DIGEST = "blake2b-128"
# Tokenizer, config and JSON files beside the tensors, and filesystem slack.
SMALL_FILES_BYTES = 16 * 2**20


def tensor_digest(t: torch.Tensor) -> str:
    """Digest of a tensor's bytes (dtype and shape are checked by safetensors itself)."""
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse to start when ``folder``'s filesystem has less than ``needed`` bytes free."""
    folder = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise WindquantError(
            f"not enough disk space for {what} in {folder}: needs about {needed / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB free; free some space or choose another --out"
        )


def write_error(path: Path, exc: BaseException, needed: int) -> WindquantError:
    """The one-line error for a failed checkpoint write (disk full, permissions, ...)."""
    reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:160]
    return WindquantError(
        f"could not write the checkpoint {path} ({reason}); it needs about {needed / 2**20:.1f} MiB: "
        "free some space or choose another --out (nothing was left behind)"
    )
