"""``windquant export-gguf``: a windquant checkpoint as a GGUF that llama.cpp runs.

How the plan is projected: GGUF gives a tensor one type, so each block linear takes the type (of
those the writer makes and its rows fit) whose bits per weight are nearest the linear's own true
bits in the checkpoint, chosen jointly by the knapsack of :mod:`.recipe` with cost
``numel · (bpw(type) − bpw(linear))²`` under the checkpoint's block-linear bytes; when even the
cheapest types exceed them (e.g. SmolLM2's 576-wide rows admit nothing below 4.5 bits), each
linear takes its nearest type and the excess is reported.

The weights written are the checkpoint's own dequantized weights (everything it computes with:
codes, scales, rotation undone, salient INT8 weights in place), requantized to the projected
type. What is lost: per-chunk mixing within a linear, the salient weights' exact values, and the
codes themselves (a second quantization). Rows are put back in the GGUF's order by matching the
source model's rows exactly (LLaMA's Q/K rows are permuted between the two layouts).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType

from windquant.errors import WindquantError
from windquant.files import atomic_write_json
from windquant.gguf.build import F16, Workspace, file_bpw, pick_writer, source_gguf, write_recipe
from windquant.gguf.files import dequantized, gguf_linear_name, open_gguf
from windquant.gguf.recipe import Recipe, TensorOptions, knapsack_types, recipe_of
from windquant.gguf.types import LLAMACPP_TYPES, PYTHON_TYPES, bits_per_weight, fits

# Types llama.cpp will not make without an importance matrix (the export calibrates nothing).
NEED_IMATRIX = {GGMLQuantizationType.IQ2_XXS, GGMLQuantizationType.IQ2_XS, GGMLQuantizationType.IQ2_S}


def row_order(hf: np.ndarray, gguf_rows: np.ndarray, name: str) -> np.ndarray:
    """``order`` with ``gguf_rows == hf[order]``: where each GGUF row sits in the transformers
    tensor, found by exact row equality (both come from the same stored values)."""
    where = {row.tobytes(): i for i, row in enumerate(np.ascontiguousarray(hf, dtype=np.float32))}
    if len(where) != len(hf):
        raise WindquantError(f"cannot align {name}: it has repeated rows")
    try:
        return np.array([where[row.tobytes()] for row in np.ascontiguousarray(gguf_rows, dtype=np.float32)])
    except KeyError:
        raise WindquantError(f"cannot align {name}: the checkpoint's source model does not match its GGUF") from None


def project_types(options: list[TensorOptions], true_bpw: dict[str, float], budget_bytes: int) -> tuple[Recipe, bool]:
    """The projected type per linear and whether it met the checkpoint's bytes."""

    def distance(o: TensorOptions, t: GGMLQuantizationType) -> float:
        return o.rows * o.cols * (bits_per_weight(t) - true_bpw[o.name]) ** 2

    within = sum(min(o.size(t) for t in o.costs) for o in options) <= budget_bytes
    if within:
        types = knapsack_types(options, distance, budget_bytes)
    else:
        types = {o.name: min(o.costs, key=lambda t, o=o: distance(o, t)) for o in options}
    weights = sum(o.rows * o.cols for o in options)
    return recipe_of(options, types, 8 * budget_bytes / weights), within


def export_gguf(
    checkpoint: Path,
    out: Path,
    work_dir: Path,
    spec: str | None = None,
    types: tuple[GGMLQuantizationType, ...] | None = None,
    embedding_type: GGMLQuantizationType = GGMLQuantizationType.Q8_0,
    use_llamacpp: bool = True,
    progress: bool = True,
) -> dict:
    """Write the checkpoint's projection to ``out`` (atomic); returns the report written beside it."""
    from windquant.config import FitConfig
    from windquant.model.units import block_linears
    from windquant.pack.qlinear import QuantLinear
    from windquant.runtime.loading import is_checkpoint, load_model

    if not is_checkpoint(checkpoint):
        raise WindquantError(
            f"{checkpoint} is not a windquant checkpoint folder (no quant_config.json); give one written by windquant quantize"
        )
    if spec is None:
        run_report = checkpoint / "run_report.json"
        if not run_report.is_file():
            raise WindquantError(f"{checkpoint} has no run_report.json naming its source model; pass --model")
        spec = json.loads(run_report.read_text())["model"]
    source = source_gguf(spec)
    ws = Workspace(work_dir, source, FitConfig())
    ws.ensure_reference(progress)
    writer = pick_writer(use_llamacpp, {embedding_type})
    available = [t for t in (LLAMACPP_TYPES if writer == "llama.cpp" else PYTHON_TYPES) if t not in NEED_IMATRIX] + [F16]
    chosen_types = [t for t in (types or available) if t in available]
    if not chosen_types:
        raise WindquantError(
            f"none of the --types can be written by {writer} without an importance matrix; it writes {', '.join(t.name for t in available)}"
        )

    packed, _ = load_model(str(checkpoint), runtime=False)
    reference, _ = load_model(spec)
    modules = dict(packed.named_modules())
    src = {t.name: t for t in open_gguf(source).tensors}
    dense, true_bpw, options, packed_bytes = {}, {}, [], 0
    for layer, name, proj, ref_linear in block_linears(reference):
        gname = gguf_linear_name(layer, proj)
        mod = modules[name]
        with torch.no_grad():
            weight = (mod.dequantize() if isinstance(mod, QuantLinear) else mod.weight).float().numpy()
        nbytes = mod.packed_bytes() if isinstance(mod, QuantLinear) else mod.weight.numel() * 2
        order = row_order(ref_linear.weight.detach().float().numpy(), dequantized(src[gname]), gname)
        dense[gname] = np.ascontiguousarray(weight[order])
        true_bpw[gname] = 8 * nbytes / weight.size
        packed_bytes += nbytes
        rows, cols = weight.shape
        fit = {t: 0.0 for t in chosen_types if fits(t, cols)}
        if not fit:
            raise WindquantError(f"no --types fit {gname} ({cols}-wide rows); allow a 32-block type such as Q8_0")
        options.append(TensorOptions(gname, rows, cols, fit))
    recipe, within = project_types(options, true_bpw, packed_bytes)

    write_recipe(ws, recipe, writer, out, embedding_type, embedding_type, progress, weights=dense)
    plan = json.loads((checkpoint / "plan.json").read_text())
    report = {
        "checkpoint": str(checkpoint),
        "source": str(source),
        "writer": writer,
        "checkpoint_true_bits": plan.get("true_bits"),
        "checkpoint_linear_bpw": 8 * packed_bytes / recipe.linear_weights,
        "linear_bpw": recipe.bpw,
        "within_checkpoint_bytes": within,
        "type_counts": recipe.type_counts(),
        "types": {n: t.name for n, t in recipe.types.items()},
        "out": str(out),
        "file_bytes": out.stat().st_size,
        "file_bpw": file_bpw(out),
    }
    atomic_write_json(out.with_name(out.name + ".json"), report)
    return report
