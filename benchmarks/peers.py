"""Peer quantizers on the same reference model, scored with windquant's own evaluation.

    python benchmarks/peers.py                                   # HQQ + AutoRound rows, Wiki2 + zero-shot
    python benchmarks/peers.py --methods hqq --tasks ""          # HQQ only, perplexity only
    python benchmarks/peers.py --methods autoround --ar-iters 200 --ar-configs W2A16G64,auto2.5

Every row quantizes the block linears of ``load_model(--model)`` (the dequantized fp32
SmolLM2-135M by default; embeddings and lm_head untouched), then measures WikiText-2 test
perplexity (``--ctx`` windows, first ``--max-windows``) and zero-shot accuracy with
``windquant.eval``. True bits = 8 × every byte the peer's own serialized format stores for
the block linears (codes, scales, zeros, indices, metadata; each in its stored dtype) / the
number of block-linear weights, exactly as windquant counts its own checkpoints.

Rows are checkpointed in ``--out``/peers.json after each step (atomic rename); a rerun only
computes what is missing. ``--rerun KEY,...`` recomputes given rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from benchlib import Evaluator, add_eval_args, fmt, load_rows, phase_peak_rss_mib, reset_peak_rss, save_rows, zs_cell
from tqdm.auto import tqdm

from windquant.files import atomic_write_json, atomic_write_text
from windquant.model.loading import load_model
from windquant.model.units import block_linears
from windquant.runinfo import set_threads

HQQ_CONFIGS = "4g64,3g64,2g16,2g32,2g64"  # HQQ README: 4-bit g64, 3-bit g64, 2-bit g16/g32 (g64 extra)
AR_CONFIGS = "W2A16G64,W3A16,W4A16,auto2.0,auto2.5,auto3.0"  # uniform 2/3/4-bit + AutoScheme targets
AR_OPTIONS = "W2A16G64,W3A16,W4A16"  # AutoScheme candidates (its avg_bits counts scales and zeros)
LLAMACPP_NOTE = (
    "not run here: PyPI has no binary wheel of llama-cpp-python (pip --only-binary :all: finds none), only "
    "the 0.3.36 sdist, which compiles llama.cpp with CMake; not attempted on 2 saturated shared cores. SPEC.md records llama.cpp figures measured elsewhere (llama-perplexity, ctx 512, "
    "its own protocol); on this model's 576-wide tensors no llama.cpp type goes below ~3.8 bits per weight."
)


def n_block_weights(model) -> int:
    return sum(lin.weight.numel() for _, _, _, lin in block_linears(model))


# --------------------------------------------------------------------------- HQQ


def parse_hqq(config: str) -> tuple[int, int]:
    bits, group = config.split("g")
    return int(bits), int(group)


def quantize_hqq(model, config: str) -> dict:
    """Replace every block-linear weight by HQQ's dequantized weight; count HQQLinear's stored bytes.

    Quantized with HQQ's own ``HQQLinear`` (``BaseQuantizeConfig`` defaults: axis 1, optimize,
    fp16 scale and zero per group, round_zero for 4 bit), compute dtype fp16 as HQQ serializes.
    The forward pass then runs the dequantized weights in the fp32 model (same math as HQQ's
    pytorch backend, without its fp16 activations).
    """
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    bits, group = parse_hqq(config)
    qcfg = BaseQuantizeConfig(nbits=bits, group_size=group)
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
    code_bits = {"2bit_u8": "2 (4 codes/uint8)", "3bit_32": "3.2 (10 codes/int32, rows padded to 10)", "4bit_u8": "4 (2/uint8)"}
    return {
        "method": "HQQ",
        "config": f"{bits}-bit g{group} (axis 1, fp16 scale+zero, optimize=True)",
        "settings": {"nbits": bits, "group_size": group, "axis": 1, "compute_dtype": "float16", "packing": packing},
        "bytes": parts,
        "n_weights": n,
        "paper_bits": float(bits),
        "true_bits": 8 * sum(parts.values()) / n,
        "formula": (
            f"8*(W_q + scale + zero + metadata bytes of HQQLinear.state_dict())/n = "
            f"{code_bits.get(packing, packing)} code bits + 16/{group} scale + 16/{group} zero per weight"
        ),
    }


# --------------------------------------------------------------------------- AutoRound


def calib_json(tokenizer, args, folder: Path) -> str:
    """windquant's default calibration windows (builtin corpus, 64 x 256, seed 0) as a JSON list
    of texts, so AutoRound sees the same data (AutoScheme only accepts a dataset path)."""
    from windquant.config import FitConfig
    from windquant.pipeline import calibration_windows

    windows = calibration_windows(tokenizer, FitConfig(calib=args.ar_calib, data_dir=args.data_dir))
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
        raise RuntimeError(f"AutoRound wrote no .safetensors under {folder}")
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

    dataset = calib_json(tokenizer, args, work)
    common = {
        "iters": args.ar_iters,
        "nsamples": args.ar_nsamples,
        "seqlen": args.ar_seqlen,
        "batch_size": args.ar_batch,
        "dataset": dataset,
        "device_map": args.ar_device,
        "amp": False,
        "low_cpu_mem_usage": False,  # its offload reloads blocks from model files; a GGUF-loaded model has none
        "enable_torch_compile": args.ar_compile,
    }
    if config.startswith("auto"):
        target = float(config[4:])
        scheme = AutoScheme(
            avg_bits=target,
            options=args.ar_options,
            nsamples=args.ar_nsamples,
            seqlen=args.ar_seqlen,
            batch_size=1,
            dataset=dataset,
            device_map=args.ar_device,
            low_cpu_mem_usage=False,
            enable_torch_compile=args.ar_compile,
        )
        label = f"AutoScheme avg_bits {target:g} over {args.ar_options}"
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


# --------------------------------------------------------------------------- driver


def write_markdown(path: Path, rows: list[dict], meta: dict) -> None:
    tasks = meta["tasks"]
    head = ["method", "config", "true bits", "Wiki2 PPL", *tasks, "avg", "quantize s", "peak RSS MiB", "true-bits formula"]
    lines = [
        f"Peers on {meta['model']}, block linears only; WikiText-2 test ctx {meta['ctx']}, "
        f"first {meta['max_windows']} windows; "
        + (f"zero-shot limit {meta['limit'] or 'full set'}." if tasks else "no zero-shot in the last run."),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['method']} | {r['key']} | – | – |" + " – |" * (len(tasks) + 3) + f" {r['error']} |")
            continue
        zs = r.get("zeroshot") or {}
        accs = [zs_cell(zs.get(t), meta["limit"]) for t in tasks]
        avg = fmt(100 * r["zeroshot_avg"], 1) if r.get("zeroshot_avg") is not None else "–"
        cells = [r["method"], r["config"], f"{r['true_bits']:.3f}", fmt((r.get("wiki2") or {}).get("ppl")), *accs, avg]
        cells += [fmt(r.get("quantize_seconds"), 1), fmt(r.get("peak_rss_mib"), 0), r["formula"]]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(path, "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model spec (default %(default)s)")
    ap.add_argument("--methods", default="hqq,autoround,llamacpp", help="comma-separated: hqq, autoround, llamacpp")
    ap.add_argument("--hqq-configs", default=HQQ_CONFIGS, help="BITSgGROUP list (default %(default)s)")
    ap.add_argument("--ar-configs", default=AR_CONFIGS, help="AutoRound schemes or autoBITS targets (default %(default)s)")
    ap.add_argument("--ar-options", default=AR_OPTIONS, help="AutoScheme candidate schemes (default %(default)s)")
    ap.add_argument("--ar-iters", type=int, default=200, help="SignRound iterations (AutoRound default 200)")
    ap.add_argument("--ar-nsamples", type=int, default=64, help="calibration samples (default %(default)s, as windquant)")
    ap.add_argument("--ar-seqlen", type=int, default=256, help="calibration length (default %(default)s, as windquant)")
    ap.add_argument("--ar-batch", type=int, default=8, help="AutoRound batch size (default %(default)s)")
    ap.add_argument("--ar-calib", default="builtin", help="calibration corpus, as windquant's --calib (default %(default)s)")
    ap.add_argument("--ar-compile", action="store_true", help="let AutoRound torch.compile its blocks (stalls on CPU here)")
    ap.add_argument("--ar-device", default="cuda" if torch.cuda.is_available() else "cpu", help="AutoRound device_map")
    ap.add_argument("--out", default="benchmarks/results/peers", help="folder for peers.json / peers.md")
    ap.add_argument("--work", default="runs/peers", help="scratch folder for exports (git-ignored)")
    ap.add_argument("--rerun", default="", help="comma-separated row keys to recompute")
    ap.add_argument("--only-table", action="store_true", help="rewrite peers.md from peers.json and stop")
    add_eval_args(ap)
    args = ap.parse_args()
    threads = set_threads(args.threads)

    out, work = Path(args.out), Path(args.work)
    if args.only_table:
        meta = {k: v for k, v in json.loads((out / "peers.json").read_text()).items() if k != "rows"}
        write_markdown(out / "peers.md", list(load_rows(out / "peers.json").values()), meta)
        print((out / "peers.md").read_text())
        return
    work.mkdir(parents=True, exist_ok=True)
    json_path = out / "peers.json"
    rows = load_rows(json_path)
    for key in filter(None, args.rerun.split(",")):
        rows.pop(key, None)

    reference, tok = load_model(args.model)
    evaluator = Evaluator(tok, args)
    meta = {"model": args.model, "threads": threads, **evaluator.settings()}
    original = {name: lin.weight.detach().clone() for _, name, _, lin in block_linears(reference)}

    def restore() -> None:
        with torch.no_grad():
            for _, name, _, lin in block_linears(reference):
                lin.weight.copy_(original[name])

    touched: set[str] = set()  # rows this run wrote (merged into the file, see save_rows)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    todo = []
    if "hqq" in methods:
        todo += [("hqq", c) for c in args.hqq_configs.split(",") if c]
    if "autoround" in methods:
        todo += [("autoround", c) for c in args.ar_configs.split(",") if c]
    if "llamacpp" in methods:
        rows["llamacpp"] = {"key": "llamacpp", "method": "llama.cpp", "error": LLAMACPP_NOTE}
        touched.add("llamacpp")

    for method, config in todo:
        key = f"{method}:{config}"
        row = rows.get(key)
        if row is not None and (row.get("error") or not evaluator.missing(row)):
            print(f"{key}: done, skipped", flush=True)
            continue
        print(f"{key}: quantizing", flush=True)
        touched.add(key)
        reset_peak_rss()
        start = time.perf_counter()
        try:
            if method == "hqq":
                result, model = quantize_hqq(reference, config), reference
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
        # A resumed row keeps its first quantize time and memory; only evaluations are added.
        row = {**result, **(row or {}), "key": key} if row else {"key": key, **result}
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
    print((out / "peers.md").read_text())


if __name__ == "__main__":
    main()
