"""Memory and speed of a windquant checkpoint at inference: packed (default) vs dense cache.

Each mode runs in its own process (RSS is per process): imports, load, one greedy ``generate()``
as warm-up, then ``--repeats`` timed ``generate()`` calls. Reported per mode: RSS after the
imports, after loading, after the first ``generate()`` (current and peak), and tokens/s (median
over the repeats). The unquantized reference model runs the same way, and the fp16 size of its
block linears plus embeddings is the yardstick issue 12 names.

    python benchmarks/packed_inference.py --checkpoint runs/q25 --out benchmarks/results/packed_inference
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchlib import command_line, pyplot, rss_mib, run_mode_workers, write_markdown

MODES = ("reference", "packed", "dense-cache")


def worker(args: argparse.Namespace) -> dict:
    """One mode, measured in this process."""
    import torch

    from windquant.model.loading import load_tokenizer
    from windquant.runinfo import set_threads
    from windquant.runtime.loading import load, load_model

    set_threads(args.threads)
    # Import what loading and generate() pull in, so 'after imports' is the process without a model.
    import transformers.generation  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from accelerate import init_empty_weights  # noqa: F401

    after_imports = rss_mib()
    tokenizer = load_tokenizer(args.checkpoint)  # the reference's tokenizer too
    after_tokenizer = rss_mib()
    if args.worker == "reference":
        model, _ = load_model(args.reference)  # a GGUF builds its own tokenizer as well
    else:
        model = load(args.checkpoint, dense_cache=args.worker == "dense-cache", runtime=False)
    after_load = rss_mib()
    ids = tokenizer(args.prompt, return_tensors="pt")

    def generate() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        assert out.shape[1] == ids["input_ids"].shape[1] + args.tokens
        return args.tokens / (time.perf_counter() - start)

    generate()
    after_generate, peak = rss_mib(), rss_mib("VmHWM")
    speeds = [generate() for _ in range(args.repeats)]
    row = {
        "mode": args.worker,
        "rss_after_imports_mib": after_imports,
        "rss_after_tokenizer_mib": after_tokenizer,
        "rss_after_load_mib": after_load,
        "rss_after_generate_mib": after_generate,
        "peak_rss_mib": peak,
        "tokens_per_s": statistics.median(speeds),
        "tokens_per_s_all": speeds,
    }
    if args.worker == "reference":
        from windquant.model.units import block_linears

        linears = sum(mod.weight.numel() for _l, _n, _p, mod in block_linears(model))
        row["fp16_block_linears_and_embeddings_mib"] = round(
            2 * (linears + model.get_input_embeddings().weight.numel()) / 2**20, 1
        )
    return row


def model_mib(row: dict) -> float:
    """RSS the model adds: after its first generate() minus after imports and tokenizer."""
    return row["rss_after_generate_mib"] - row["rss_after_tokenizer_mib"]


def write_outputs(out: Path, result: dict) -> None:
    from windquant.files import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", result)
    rows = result["rows"]
    yard = result["fp16_block_linears_and_embeddings_mib"]
    lines = [
        f"# Inference memory and speed ({result['checkpoint']})",
        "",
        f"Greedy `generate()` of {result['tokens']} new tokens, {result['threads']} threads, median tokens/s over "
        f"{result['repeats']} repeats after one warm-up call. RSS in MiB; 'model' = RSS after the first "
        "`generate()` minus RSS after the imports and the tokenizer (the reference, read from a GGUF, "
        "also builds a second tokenizer inside its 'model'). Yardstick (issue 12): fp16 size of the reference's block "
        f"linears + embeddings = **{yard:.1f} MiB**.",
        "",
        "| mode | RSS after imports | + tokenizer | + model | after generate | model (after generate − tokenizer) | peak | tokens/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['rss_after_imports_mib']:.0f} | {r['rss_after_tokenizer_mib']:.0f} | {r['rss_after_load_mib']:.0f} | "
            f"{r['rss_after_generate_mib']:.0f} | **{model_mib(r):.0f}** | {r['peak_rss_mib']:.0f} | {r['tokens_per_s']:.2f} |"
        )
    write_markdown(out, lines, result["command"])

    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [r["mode"] for r in rows]
    ax1.bar(names, [model_mib(r) for r in rows], color="tab:blue")
    ax1.axhline(yard, color="tab:red", linestyle="--", label="fp16 linears + embeddings")
    ax1.set_ylabel("model RSS after generate (MiB)")
    ax1.legend(fontsize=8)
    ax2.bar(names, [r["tokens_per_s"] for r in rows], color="tab:green")
    ax2.set_ylabel("tokens/s (greedy generate)")
    fig.tight_layout()
    fig.savefig(out / "inference.png", dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a windquant checkpoint folder")
    p.add_argument("--reference", default="smollm2-135m", help="the unquantized model spec (default smollm2-135m)")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per generate() call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", default="The history of the city begins")
    p.add_argument("--out", default="benchmarks/results/packed_inference")
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if not (Path(args.checkpoint) / "quant_config.json").is_file():
        p.error(
            f"{args.checkpoint} is not a windquant checkpoint folder (no quant_config.json); give one written by windquant quantize"
        )
    flags = {"checkpoint": args.checkpoint, "reference": args.reference, "tokens": args.tokens, "repeats": args.repeats}
    rows = run_mode_workers(__file__, list(MODES), flags | {"threads": args.threads, "prompt": args.prompt})
    result = {
        "checkpoint": args.checkpoint,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "threads": args.threads,
        "fp16_block_linears_and_embeddings_mib": rows[0]["fp16_block_linears_and_embeddings_mib"],
        "rows": rows,
        "command": command_line(),
    }
    write_outputs(Path(args.out), result)
    print((Path(args.out) / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
