"""What quantizing costs as models grow: random-initialised LLaMA-architecture models of ~135M,
~360M and ~1.1B parameters (the shapes of SmolLM2-135M, SmolLM2-360M and TinyLlama-1.1B, with
SmolLM2's 49,152-token vocabulary), written as local Hugging Face folders in fp16 safetensors,
each quantized end to end by ``windquant quantize`` (ilp, 2.5 true bits) from an empty candidate
cache, in its own process.

Reported per model: wall time of each stage and in all, the process's peak RSS, and the sizes of
the fp16 source and the packed checkpoint. Random weights give meaningless perplexity: this
benchmark is about cost. Rows are kept in ``results.json`` and skipped when re-run (resume).

    python benchmarks/scale.py --out benchmarks/results/scale
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import command_line, load_rows, pyplot, save_rows, write_markdown

SHAPES = {
    "135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "tie_word_embeddings": True,
    },
    "360m": {
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "tie_word_embeddings": True,
    },
    "1.1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "tie_word_embeddings": False,
    },
}


def write_model(name: str, folder: Path) -> dict:
    """A random fp16 LLaMA of shape ``name`` with SmolLM2's tokenizer, saved to ``folder``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from windquant.model.loading import default_model_path

    gguf = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=49152, max_position_embeddings=2048, **SHAPES[name])
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)  # initialised in half: a 1.1B model never exists in fp32
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return model_sizes(model)


def model_sizes(model) -> dict:
    from windquant.model.units import block_linears

    linears = sum(mod.weight.numel() for _l, _n, _p, mod in block_linears(model))
    return {"parameters": sum(p.numel() for p in model.parameters()), "block_linear_parameters": linears}


def folder_mib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1)


def quantize(model_dir: Path, out: Path, args: argparse.Namespace) -> dict:
    """``windquant quantize`` in its own process from an empty cache; its run report."""
    with tempfile.TemporaryDirectory(prefix="wq-scale-cache-") as cache:
        cmd = [
            sys.executable,
            "-m",
            "windquant.cli",
            "quantize",
            "--model",
            str(model_dir),
            "--target-bits",
            str(args.target_bits),
            "--calib-samples",
            str(args.calib_samples),
            "--out",
            str(out),
            "--overwrite",
            "--quiet",
        ]
        env = {**os.environ, "WINDQUANT_CACHE": cache, "WINDQUANT_THREADS": str(args.threads)}
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        wall = time.perf_counter() - start
    report = json.loads((out / "run_report.json").read_text())
    return {"wall_s": round(wall, 1), "timings": report["timings"], "true_bits": report["accounting"]["true_bits"]}


def write_outputs(out: Path, meta: dict, rows: list[dict]) -> None:
    lines = [
        "# Quantization cost vs model size (random-initialised LLaMA shapes)",
        "",
        f"`windquant quantize --target-bits {meta['target_bits']}` (ilp) from an empty candidate cache, "
        f"`--calib-samples {meta['calib_samples']}` (× 256 tokens), {meta['threads']} threads, one process per model. "
        "Peak RSS is the quantize process's own (`run_report.json`); wall time includes its start-up.",
        "",
        "| model | parameters | block-linear params | fp16 source (MiB) | packed checkpoint (MiB) | true bits | peak RSS (MiB) | wall (s) | stages (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["timings"]["seconds"].items())
        lines.append(
            f"| {r['key']} | {r['parameters'] / 1e6:.0f}M | {r['block_linear_parameters'] / 1e6:.0f}M | {r['source_mib']:.0f} | "
            f"{r['checkpoint_mib']:.0f} | {r['true_bits']:.3f} | **{r['timings']['peak_rss_mib']:.0f}** | {r['wall_s']:.0f} | {stages} |"
        )
    write_markdown(out, lines, meta["command"])

    plt = pyplot()

    params = [r["parameters"] / 1e6 for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(params, [r["timings"]["peak_rss_mib"] / 1024 for r in rows], "o-", label="peak RSS")
    ax1.plot(params, [r["source_mib"] / 1024 for r in rows], "s--", label="fp16 model")
    ax1.set_xlabel("parameters (M)")
    ax1.set_ylabel("GiB")
    ax1.legend(fontsize=8)
    ax2.plot(params, [r["wall_s"] / 60 for r in rows], "o-", color="tab:green")
    ax2.set_xlabel("parameters (M)")
    ax2.set_ylabel("quantize wall time (min)")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--work", default="runs/scale", help="where the random models and checkpoints are written")
    p.add_argument("--out", default="benchmarks/results/scale")
    p.add_argument("--target-bits", type=float, default=2.5)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(names) - set(SHAPES))
    if unknown:
        p.error(f"unknown model shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    meta = {
        "target_bits": args.target_bits,
        "calib_samples": args.calib_samples,
        "threads": args.threads,
        "command": command_line(),
    }
    rows = load_rows(out / "results.json")
    for name in names:
        if name in rows:
            print(f"{name}: done already (results.json)", file=sys.stderr)
            continue
        model_dir = work / f"random-{name}"
        sizes_file = work / f"random-{name}.json"
        if not model_dir.is_dir():
            print(f"{name}: writing the random model ...", file=sys.stderr)
            sizes_file.write_text(json.dumps(write_model(name, model_dir)))
        print(f"{name}: quantizing ...", file=sys.stderr)
        ckpt = work / f"q-{name}"
        row = {"key": name, **json.loads(sizes_file.read_text()), "source_mib": folder_mib(model_dir)}
        row |= quantize(model_dir, ckpt, args)
        row["checkpoint_mib"] = folder_mib(ckpt)
        rows[name] = row
        save_rows(out / "results.json", rows, meta)
    ordered = [rows[n] for n in SHAPES if n in rows]
    write_outputs(out, meta, ordered)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
