"""Decode speed, memory and perplexity: the unquantized reference against windquant checkpoints
through the runtime (issue 31).

Every row runs in its own process (RSS is per process): imports, load, then for each batch size
``--repeats`` rounds of one greedy ``generate()`` of ``--new-tokens`` (forced with
``min_new_tokens``): time to first token = until the first logits reach the logits processors
(the prompt's prefill); decode tokens/s = batch × (new tokens − 1) / (the rest of the call),
median over the rounds. Prompts are
``--prompt-tokens``-token slices of the WikiText-2 training text (one per sequence of the batch).
Model RSS = RSS after load and every generate() minus RSS after the imports; every row runs with
glibc's mmap threshold fixed at 256 KiB (``runinfo.return_large_frees_to_os``, which the runtime's
loader sets), so freed KV caches and activations leave RSS in every row alike. Perplexity:
WikiText-2 test, ``--ctx`` windows, the first ``--windows`` of them, through that row's path;
runtime rows of the ``--dequantized-ppl`` checkpoints also score it dequantized (what ``windquant
eval`` runs) in the same process, after the RSS is taken.

Rows: the reference as transformers runs it by default in fp32 and bf16 (the GGUF dequantized),
a checkpoint's dense cache (its QuantLinears, each dequantized once), and the runtime at each
checkpoint given. ``--speedups`` adds a row of the reference with the speed-ups the runtime
uses; none is enabled today (see NOTES.md: torch.compile and the static cache were measured and
did not pay on this CPU), so there is no such row unless asked for.

    python benchmarks/decode_speed.py --checkpoints 2.5=/work/ckpt/r25,3.0=/work/ckpt/r30,4.0=/work/ckpt/r40 \\
        --data-dir /work/shared/data --out benchmarks/results/decode_speed
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchlib import command_line, pyplot, rss_mib, write_markdown

REFERENCE = "smollm2-135m"


def prompts(tokenizer, args, batch: int):
    """``batch`` distinct prompts of exactly ``--prompt-tokens`` tokens from WikiText-2 train (only
    its first characters are tokenized: the whole text's token list would inflate the RSS)."""
    import torch

    from windquant.calib.corpus import corpus_text

    text, _split = corpus_text("wikitext2", "calib", args.data_dir)
    ids = torch.tensor(tokenizer(text[: 16 * batch * args.prompt_tokens])["input_ids"])
    n = args.prompt_tokens
    rows = torch.stack([ids[i * n : (i + 1) * n] for i in range(batch)])
    return {"input_ids": rows, "attention_mask": torch.ones_like(rows)}


def load_row(mode: str, args):
    import torch

    from windquant.runtime.loading import load_model

    if mode.startswith("reference"):
        return load_model(args.reference, dtype=torch.bfloat16 if mode == "reference-bf16" else torch.float32)
    kind, bits = mode.rsplit("@", 1)
    path = dict(c.split("=") for c in args.checkpoints.split(","))[bits]
    if kind == "dense-cache":
        return load_model(path, dense_cache=True, runtime=False)
    return load_model(path)


def timed_generate(model, inputs, new_tokens: int, pad_id: int) -> tuple[float, float]:
    """(time to the first logits = the prefill, time of the whole call) of one greedy generate()."""
    import torch

    first: list[float] = []

    def clock(_ids, scores):  # a logits processor: first called right after the prefill forward
        if not first:
            first.append(time.perf_counter())
        return scores

    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            logits_processor=[clock],
        )
    end = time.perf_counter()
    assert out.shape[1] == inputs["input_ids"].shape[1] + new_tokens
    return first[0] - start, end - start


def row_perplexity(model, tokenizer, args) -> float:
    from windquant.calib.corpus import corpus_tokens
    from windquant.eval.perplexity import perplexity

    tokens = corpus_tokens(tokenizer, "wikitext2", "eval", args.data_dir)
    return perplexity(model, tokens, ctx=args.ctx, max_windows=args.windows, progress=False).ppl


def worker(args: argparse.Namespace) -> dict:
    from windquant.runinfo import return_large_frees_to_os, set_threads

    set_threads(args.threads)
    # The runtime's loader sets this; every row gets it, so RSS compares models, not allocators.
    return_large_frees_to_os()
    # Import what loading and generate() pull in, so 'after imports' is the process without a model.
    import transformers.generation  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    from windquant.runtime.loading import load_model  # noqa: F401

    after_imports = rss_mib()
    start = time.perf_counter()
    model, tokenizer = load_row(args.worker, args)
    row = {"mode": args.worker, "load_s": round(time.perf_counter() - start, 1), "batches": {}}
    pad = tokenizer.eos_token_id
    for batch in map(int, args.batches.split(",")):
        inputs = prompts(tokenizer, args, batch)
        timed_generate(model, inputs, 2, pad)  # warm-up
        firsts, decodes = [], []
        for _ in range(args.repeats):
            first, total = timed_generate(model, inputs, args.new_tokens, pad)
            firsts.append(first)
            decodes.append(batch * (args.new_tokens - 1) / (total - first))
        row["batches"][str(batch)] = {
            "tokens_per_s": statistics.median(decodes),
            "ttft_s": statistics.median(firsts),
            "tokens_per_s_all": decodes,
            "ttft_s_all": firsts,
        }
    row["rss_after_imports_mib"] = after_imports
    row["rss_after_generate_mib"] = rss_mib()
    row["model_rss_mib"] = round(row["rss_after_generate_mib"] - after_imports, 1)
    if args.windows:
        row["ppl"] = row_perplexity(model, tokenizer, args)
        if args.worker.startswith("runtime") and args.worker.rsplit("@", 1)[1] in args.dequantized_ppl.split(","):
            del model
            dequantized, _ = load_model(load_row_path(args), dense_cache=True, runtime=False)
            row["ppl_dequantized"] = row_perplexity(dequantized, tokenizer, args)
    return row


def load_row_path(args) -> str:
    return dict(c.split("=") for c in args.checkpoints.split(","))[args.worker.rsplit("@", 1)[1]]


def checkpoint_sizes(args) -> dict:
    """Per checkpoint: its whole file's accounting (quant_config.json) and file size on disk."""
    sizes = {}
    for item in args.checkpoints.split(","):
        bits, path = item.split("=")
        qconf = json.loads((Path(path) / "quant_config.json").read_text())
        plan = json.loads((Path(path) / "plan.json").read_text())
        sizes[bits] = {
            "path": path,
            "true_bits": plan["true_bits"],
            "file_mib": (Path(path) / "model.safetensors").stat().st_size / 2**20,
            **qconf.get("sizes", {}),
        }
    return sizes


def write_outputs(out: Path, result: dict) -> None:
    from windquant.files import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", result)
    rows, batches = result["rows"], result["batches"]
    ref = {b: next(r for r in rows if r["mode"] == "reference-fp32")["batches"][b]["tokens_per_s"] for b in batches}
    ref_rss = next(r for r in rows if r["mode"] == "reference-fp32")["model_rss_mib"]
    head = " | ".join(f"batch {b}: tok/s (× fp32) | TTFT s" for b in batches)
    lines = [
        "# Decode speed (issue 31)",
        "",
        f"Greedy `generate()`, prompt {result['prompt_tokens']} tokens, {result['new_tokens']} new tokens, "
        f"{result['threads']} threads, median of {result['repeats']} rounds after a warm-up. Decode tok/s excludes "
        "the prefill (TTFT). Model RSS: after load + every generate() − after imports (MiB). "
        f"Perplexity: WikiText-2 test, first {result['windows']} windows of {result['ctx']} tokens through the row's path "
        "(runtime rows: the dequantized checkpoint in brackets).",
        "",
        f"| row | {head} | model RSS (× fp32) | ppl |",
        "|---|" + "---|---|" * len(batches) + "---|---|",
    ]
    for r in rows:
        cells = []
        for b in batches:
            x = r["batches"][b]
            cells.append(f"{x['tokens_per_s']:.1f} ({x['tokens_per_s'] / ref[b]:.2f}×) | {x['ttft_s']:.3f}")
        ppl = f"{r['ppl']:.3f}" if "ppl" in r else "–"
        if "ppl_dequantized" in r:
            ppl += f" ({r['ppl_dequantized']:.3f}, {100 * (r['ppl'] / r['ppl_dequantized'] - 1):+.2f}%)"
        lines.append(
            f"| {r['mode']} | {' | '.join(cells)} | {r['model_rss_mib']:.0f} ({r['model_rss_mib'] / ref_rss:.2f}×) | {ppl} |"
        )
    lines += [
        "",
        "| checkpoint | true bits (block linears) | whole file bits/param | model.safetensors MiB | embedding bits |",
        "|---|---|---|---|---|",
    ]
    for bits, s in result["checkpoints"].items():
        lines.append(
            f"| {bits} | {s['true_bits']:.3f} | {s.get('file_bits_per_param', float('nan')):.3f} | {s['file_mib']:.1f} | {s.get('embedding_bits', 16)} |"
        )
    lines += ["", result["llamacpp"]]
    write_markdown(out, lines, result["command"])

    plt = pyplot()
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(4.5 * (len(batches) + 1), 4))
    names = [r["mode"] for r in rows]
    for ax, b in zip(axes, batches):
        ax.barh(names, [r["batches"][b]["tokens_per_s"] for r in rows], color="tab:green")
        ax.set_xlabel(f"decode tokens/s, batch {b}")
    axes[-1].barh(names, [r["model_rss_mib"] for r in rows], color="tab:blue")
    axes[-1].set_xlabel("model RSS after load + generate (MiB)")
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(out / "decode_speed.png", dpi=120)


def llama_bench_rows(args) -> str:
    """The anchor of what this CPU can do: ``llama-bench`` (prompt --prompt-tokens, --new-tokens
    generated, batch 1, --threads, mean of --repeats) on the reference's shipped GGUF and on a
    Q4_0 of it, as markdown lines; or why there are none."""
    from windquant.gguf import llamacpp
    from windquant.gguf.build import source_gguf
    from windquant.gguf.files import open_gguf, write_reference

    if llamacpp.find_tool("llama-bench") is None or llamacpp.find_tool("llama-quantize") is None:
        return "llama-bench: no llama.cpp binaries (`make llamacpp`) on this machine, so no GGUF anchor row"
    work = Path("runs") / "decode_speed-gguf"  # scratch, git-ignored: the Q4_0 file
    work.mkdir(parents=True, exist_ok=True)
    shipped, f16, q4_0 = source_gguf(args.reference), work / "reference-f16.gguf", work / "q4_0.gguf"
    if not q4_0.is_file():
        write_reference(open_gguf(shipped), f16, progress=False)
        llamacpp.quantize(f16, q4_0, "Q4_0")
        f16.unlink()
    lines = [
        "llama-bench (batch 1, the same prompt and new tokens, the same threads):",
        "",
        "| GGUF | prompt tok/s | decode tok/s |",
        "|---|---|---|",
    ]
    for name, path in ((f"shipped {shipped.name}", shipped), ("Q4_0 of it", q4_0)):
        flags = [
            "-m",
            path,
            "-p",
            args.prompt_tokens,
            "-n",
            args.new_tokens,
            "-t",
            args.threads,
            "-r",
            args.repeats,
            "-o",
            "json",
        ]
        out = llamacpp.run_tool("llama-bench", flags)
        runs = json.loads(out[out.index("[") : out.rindex("]") + 1])  # its log lines share the streams
        speed = {("prompt" if r["n_prompt"] else "decode"): r["avg_ts"] for r in runs}
        lines.append(f"| {name} | {speed.get('prompt', float('nan')):.1f} | {speed.get('decode', float('nan')):.1f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", required=True, help="BITS=FOLDER,... (the dense-cache row uses the first)")
    p.add_argument("--reference", default=REFERENCE, help="the unquantized model spec (default %(default)s)")
    p.add_argument("--data-dir", required=True, help="folder holding wikitext-2-raw/")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--windows", type=int, default=16, help="perplexity windows per row (0: none)")
    p.add_argument("--dequantized-ppl", default="2.5,4.0", help="checkpoints whose runtime row also scores the dequantized model")
    p.add_argument("--rows", default=None, help="only these rows, comma-separated (default: all)")
    p.add_argument("--out", default="benchmarks/results/decode_speed")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    import subprocess

    bits = [c.split("=")[0] for c in args.checkpoints.split(",")]
    modes = ["reference-fp32", "reference-bf16", f"dense-cache@{bits[0]}"] + [f"runtime@{b}" for b in bits]
    if args.rows:
        modes = [m for m in modes if m in args.rows.split(",")]
    rows = []
    for mode in modes:
        print(f"{mode} ...", file=sys.stderr)
        cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", mode]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    result = {
        "command": command_line(),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "batches": args.batches.split(","),
        "repeats": args.repeats,
        "threads": args.threads,
        "ctx": args.ctx,
        "windows": args.windows,
        "rows": rows,
        "checkpoints": checkpoint_sizes(args),
        "llamacpp": llama_bench_rows(args),
    }
    write_outputs(Path(args.out), result)
    print((Path(args.out) / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
