"""Packed checkpoint folder: model.safetensors, plan.json, quant_config.json, config, tokenizer
(written here; read by :mod:`windquant.runtime.loading`).

Written to a temporary sibling folder and renamed into place at the end, so an error or
Ctrl-C never leaves a half-written checkpoint. No pickle anywhere: safetensors and JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from windquant.errors import WindquantError
from windquant.pack.qlinear import QuantLinear
from windquant.plan import Plan

FORMAT = "windquant-packed"
# 2: units may be stored rotated (rot_signs); 3: the rotation may be chosen per unit (plan.json
# units carry "rotate", quant_config chunks are (col0, col1, action, rotate)). Older folders load unchanged.
FORMAT_VERSION = 3
WEIGHTS = "model.safetensors"


def prepare_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless ``overwrite``; returns the resolved path."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise WindquantError(f"output folder {out} already exists; pass --overwrite or choose another --out")
    if out.exists() and not out.is_dir():
        raise WindquantError(f"--out {out} is a file; give a folder path")
    return out


def _state_for_disk(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    seen: set[int] = set()
    prefixes = tuple(q + ".c" for q in _quant_module_names(model))
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen and t.numel() > 0:  # tied weights (lm_head = embeddings) stored once
            continue
        seen.add(t.data_ptr())
        state[name] = t.contiguous() if name.startswith(prefixes) or not t.is_floating_point() else t.half().contiguous()
    return state


def _quant_module_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of every packed tensor of every QuantLinear (what true bits count)."""
    return sum(m.packed_bytes() for m in model.modules() if isinstance(m, QuantLinear))


def save(
    model: nn.Module,
    tokenizer,
    plan: Plan,
    out: str | Path,
    overwrite: bool = False,
    extra_files: dict | None = None,
    copy_files: list[Path] | None = None,
) -> Path:
    """Write the checkpoint folder atomically; returns its path.

    ``extra_files`` maps names to JSON payloads; ``copy_files`` are copied in as they are.
    """
    out = prepare_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        save_file(_state_for_disk(model), str(tmp / WEIGHTS), metadata={"format": FORMAT})
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        plan.save(tmp / "plan.json")
        qconf = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "salient_rate": plan.salient_rate,
            "rotate": plan.rotate,
            "quantized_bytes": quantized_bytes(model),
            "modules": {n: m.chunks for n, m in model.named_modules() if isinstance(m, QuantLinear)},
        }
        (tmp / "quant_config.json").write_text(json.dumps(qconf, indent=1))
        for name, payload in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=1))
        for src in copy_files or []:
            shutil.copy2(src, tmp / Path(src).name)
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
