"""Loading, in one place: a model spec (embedded model, GGUF, HF folder, Hub id, windquant
checkpoint) to ``(model, tokenizer)``, and a checkpoint folder to a working model.

Base models are read by :mod:`windquant.model.loading`; checkpoints are read here, beside the
runtime that runs them, so neither ``model/`` nor ``pack/`` imports the other's loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from windquant.errors import WindquantError
from windquant.model.loading import DEFAULT_MODEL, load_base_model, load_tokenizer
from windquant.pack.apply import build_quant_linears
from windquant.pack.checkpoint import FORMAT, FORMAT_VERSION, WEIGHTS
from windquant.pack.embedding import PREFIX, split_rows
from windquant.pack.integrity import tensor_digest
from windquant.plan import Plan
from windquant.quant.rows import dequantize_rows
from windquant.runinfo import release_freed_memory


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "quant_config.json").is_file()


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise WindquantError(f"{path.parent} is not a windquant checkpoint: {path.name} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise WindquantError(f"{path} is corrupt ({exc}); re-run quantize to rebuild the checkpoint") from exc


def read_quant_config(path: Path) -> dict:
    qconf = _read_json(path / "quant_config.json")
    if qconf.get("format") != FORMAT:
        raise WindquantError(f"{path}/quant_config.json is not a {FORMAT} config")
    if qconf.get("version", 1) > FORMAT_VERSION:
        raise WindquantError(
            f"{path} uses checkpoint format version {qconf['version']}, newer than this windquant reads "
            f"({FORMAT_VERSION}); upgrade windquant"
        )
    return qconf


def _read_state(path: Path, qconf: dict, dtype: torch.dtype, verify: bool) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's weights file, each checked against its stored digest
    (folders written before digests existed have none to check)."""
    prefixes = tuple(q + ".c" for q in qconf["modules"]) + tuple(f"{n}.{PREFIX}" for n in qconf.get("rows", {}))
    digests = qconf.get("digests") if verify else None
    file = path / WEIGHTS
    state = {}
    try:
        # Tensor by tensor: an fp16 tensor is converted to the model dtype before the next is read,
        # so the file is never held twice.
        with safe_open(str(file), "pt") as f:
            for n in f.keys():
                t = f.get_tensor(n)
                if digests is not None and digests.get(n) != tensor_digest(t):
                    raise WindquantError(
                        f"{file} is corrupt: tensor {n} does not match its digest in quant_config.json; "
                        "restore the file or re-run quantize"
                    )
                state[n] = t if n.startswith(prefixes) or not t.is_floating_point() else t.to(dtype)
    except (SafetensorError, FileNotFoundError, OSError) as exc:
        raise WindquantError(f"cannot read {file} ({exc}); the checkpoint is corrupt or truncated: re-run quantize") from exc
    if digests is not None and set(digests) != set(state):
        raise WindquantError(
            f"{file} does not hold the tensors quant_config.json lists; the checkpoint is corrupt: re-run quantize"
        )
    return state


def load(path: str | Path, dense_cache: bool = False, runtime: bool = True, verify: bool = True) -> nn.Module:
    """A working ``transformers`` model from a windquant checkpoint folder.

    ``runtime`` (default): the block linears run through the int4/int8 kernels with their
    weights packed, and a row-quantized embedding and head stay packed too
    (:mod:`windquant.runtime`). Otherwise, or with ``dense_cache``, the block linears stay
    :class:`QuantLinear` modules computing the dequantized weights (exactly what quantize
    scored): unpacked per layer per forward, or once with ``dense_cache`` (the memory of a dense
    model; what long-sequence evaluation uses). ``verify`` checks every tensor against its digest
    (skip it only for trusted folders). The process's allocator settings are left alone; a
    long-lived generation process may call :func:`windquant.runinfo.return_large_frees_to_os`
    as ``windquant generate`` does."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path).expanduser()
    if not path.is_dir():
        raise WindquantError(f"checkpoint folder not found: {path}")
    qconf = read_quant_config(path)
    plan = Plan.load(path / "plan.json")
    config = AutoConfig.from_pretrained(path)
    dtype = getattr(torch, qconf.get("dtype", "float32"))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    build_quant_linears(model, plan, dense_cache)
    state = _read_state(path, qconf, dtype, verify)
    row_bits = qconf.get("rows", {})
    rows = split_rows(state, list(row_bits))
    use_runtime = runtime and not dense_cache
    if not use_runtime:
        for name, packed in rows.items():
            state[f"{name}.weight"] = dequantize_rows(packed, row_bits[name]).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [m for m in missing if m != "lm_head.weight"]
    if use_runtime:
        missing = [m for m in missing if m.removesuffix(".weight") not in rows]
    if missing or unexpected:
        raise WindquantError(
            f"{path / WEIGHTS} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]}); re-run quantize"
        )
    del state
    if use_runtime:
        from windquant.runtime.convert import to_runtime

        to_runtime(model, rows={n: (p, row_bits[n]) for n, p in rows.items()})
    release_freed_memory()
    return model.eval()


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    dense_cache: bool = False,
    runtime: bool = True,
    verify: bool = True,
):
    """Return ``(model, tokenizer)`` in eval mode for a model spec; a windquant checkpoint folder
    is loaded with :func:`load` (``dense_cache``, ``runtime``, ``verify``: see there), anything else with
    :func:`windquant.model.loading.load_base_model` (``dtype``: see there)."""
    if is_checkpoint(Path(spec).expanduser()):
        # The tokenizer first: load() ends by handing freed memory back, the tokenizer's included.
        tokenizer = load_tokenizer(Path(spec).expanduser())
        return load(spec, dense_cache, runtime, verify), tokenizer
    return load_base_model(spec, dtype)
