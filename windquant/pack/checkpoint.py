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
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from windquant.errors import WindquantError
from windquant.pack.embedding import PREFIX, round_rows_, row_modules, rows_bytes
from windquant.pack.integrity import DIGEST, SMALL_FILES_BYTES, check_free_space, tensor_digest, write_error
from windquant.pack.qlinear import QuantLinear
from windquant.plan import Plan
from windquant.quant.row_formats import RowFormat

FORMAT = "windquant-packed"
# 2: units may be stored rotated (rot_signs); 3: the rotation may be chosen per unit (plan.json
# units carry "rotate", quant_config chunks are (col0, col1, action, rotate)); 4: the embedding
# (and an untied head) may be stored per-row quantized ("rows"), a digest per tensor ("digests")
# and the whole file's accounting ("sizes"). Older folders load unchanged.
FORMAT_VERSION = 4
WEIGHTS = "model.safetensors"


def prepare_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless ``overwrite``; returns the resolved path."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise WindquantError(f"output folder {out} already exists; pass --overwrite or choose another --out")
    if out.exists() and not out.is_dir():
        raise WindquantError(f"--out {out} is a file; give a folder path")
    return out


def _state_for_disk(model: nn.Module, rows: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """What model.safetensors holds: packed chunks as they are, row-quantized matrices as their
    packed tensors, every other floating tensor in fp16."""
    state = {}
    seen: set[int] = set()
    prefixes = tuple(q + ".c" for q in _quant_module_names(model))
    replaced = {f"{name}.weight" for name in rows}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen and t.numel() > 0:  # tied weights (lm_head = embeddings) stored once
            continue
        seen.add(t.data_ptr())
        if name in replaced:
            state |= {f"{name[: -len('weight')]}{PREFIX}{field}": v.contiguous() for field, v in rows[name[:-7]].items()}
            continue
        state[name] = t.contiguous() if name.startswith(prefixes) or not t.is_floating_point() else t.half().contiguous()
    return state


def parameter_count(model: nn.Module) -> int:
    """Parameters of the model as the unquantized one has them (tied matrices once): every block
    linear's weights plus every other tensor."""
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    packed = {id(b) for m in quant for n, b in m.named_buffers() if n.startswith("c")}
    seen: set[int] = set()
    total = sum(m.in_features * m.out_features for m in quant)
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in packed and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel()
    return total


def size_report(model: nn.Module, embedding_bits: RowFormat) -> dict:
    """The whole file's accounting (tensor bytes by kind, parameters, bits per parameter), from the
    layout tables: the tensors written have exactly these sizes (tested)."""
    block = quantized_bytes(model)
    prefixes = tuple(q + ".c" for q in _quant_module_names(model))
    row_names = {f"{n}.weight" for n in row_modules(model)}
    seen: set[int] = set()
    other = 0
    for name, t in model.state_dict().items():
        fresh = t.data_ptr() not in seen  # tied matrices once
        seen.add(t.data_ptr())
        if fresh and not name.startswith(prefixes) and name not in row_names:
            other += t.numel() * (2 if t.is_floating_point() else t.element_size())
    rows = rows_bytes(model, embedding_bits)
    total, params = block + rows + other, parameter_count(model)
    return {
        "embedding_bits": embedding_bits,
        "block_linear_bytes": block,
        "embedding_bytes": rows,
        "other_bytes": other,
        "tensor_bytes": total,
        "parameters": params,
        "file_bits_per_param": 8 * total / params,
    }


def _quant_module_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of every packed tensor of every QuantLinear (what true bits count)."""
    return sum(m.packed_bytes() for m in model.modules() if isinstance(m, QuantLinear))


def expected_bytes(model: nn.Module, block_bits: float, embedding_bits: RowFormat) -> int:
    """Bytes a checkpoint of the unquantized ``model`` will need with ``block_bits`` true bits per
    block-linear weight (the budget bounds it), its embedding at ``embedding_bits``, the rest in
    fp16, plus the small files: what ``quantize --out`` checks before the long work."""
    from windquant.model.units import block_linears

    linears = [m for *_, m in block_linears(model)]
    n = sum(m.weight.numel() for m in linears)
    linear_ids = {id(m.weight) for m in linears}
    row_ids = {id(m.weight) for m in row_modules(model).values()}
    seen: set[int] = set()
    other = 0
    for p in model.parameters():  # parameters() yields tied tensors once
        if id(p) not in linear_ids | row_ids and id(p) not in seen:
            seen.add(id(p))
            other += 2 * p.numel()
    return int(n * block_bits / 8) + rows_bytes(model, embedding_bits) + other + SMALL_FILES_BYTES


def save(
    model: nn.Module,
    tokenizer,
    plan: Plan,
    out: str | Path,
    overwrite: bool = False,
    extra_files: dict | None = None,
    copy_files: list[Path] | None = None,
    embedding_bits: RowFormat = 8,
    token_counts: torch.Tensor | None = None,
    head_moment: torch.Tensor | None = None,
    packed_rows: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write the checkpoint folder atomically; returns its path.

    ``extra_files`` maps names to JSON payloads; ``copy_files`` are copied in as they are.
    ``embedding_bits`` other than 16 quantizes the embedding (and an untied head) per row, in
    place (:func:`windquant.pack.embedding.round_rows_`; ``token_counts`` rank the rows of the
    mixed format, ``head_moment`` feeds back the head's 4-bit errors; ``packed_rows``: those rows
    when the caller already quantized them), so ``model`` computes what is stored. The file's
    accounting goes into quant_config.json ("sizes") and ``plan.info["file"]``.
    """
    out = prepare_out_dir(out, overwrite)
    rows = round_rows_(model, embedding_bits, token_counts, head_moment, packed_rows) if embedding_bits != 16 else {}
    sizes = size_report(model, embedding_bits)
    needed = sizes["tensor_bytes"] + SMALL_FILES_BYTES
    check_free_space(out.parent, needed, "the checkpoint")
    plan.info["file"] = sizes
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        state = _state_for_disk(model, rows)
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
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
            "rows": {n: embedding_bits for n in rows},
            "sizes": sizes,
            "digest": DIGEST,
            "digests": {n: tensor_digest(t) for n, t in state.items()},
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
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, SafetensorError)):
            raise write_error(out, exc, needed) from exc
        raise
    return out
