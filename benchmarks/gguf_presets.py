"""(Named gguf_presets.py: a benchmarks/gguf.py would shadow the gguf package.)
windquant gguf against llama.cpp's own presets, everything scored inside llama.cpp (issue 16).

For one model: the F16 reference GGUF, each llama.cpp preset (quantized with the same importance
matrix windquant writes from its calibration statistics) and `windquant gguf` at each preset's
block-linear bits per weight, with the preset's embedding and output types, so the two files differ
only in how the block linears' bits are spread. All are scored by `llama-perplexity` (ctx 512, the
first --chunks chunks of wiki.test.raw, second half of each chunk). Optionally windquant-format
checkpoints (ilp at --checkpoint-bits true bits) are scored by `windquant eval --protocol llamacpp`'s
function on the same text, against their own reference under that protocol. Every PPL is also given
as a ratio to its own reference. Needs `make llamacpp`.

    python benchmarks/gguf_presets.py --data-dir ../shared/data --out benchmarks/results/gguf
    python benchmarks/gguf_presets.py --model tiny256 --checkpoint-bits "" --out benchmarks/results/gguf-tiny
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchlib import load_rows, pyplot, save_rows

from windquant.config import FitConfig
from windquant.gguf import llamacpp
from windquant.gguf.build import GGUFConfig, build_gguf, file_bpw
from windquant.gguf.files import GGUF_LINEAR, open_gguf, write_random_llama
from windquant.gguf.types import parse_type
from windquant.runinfo import set_threads

PRESETS = "Q8_0,Q4_K_M,IQ4_XS,Q4_0,IQ4_NL,Q2_K,IQ2_M"
LINEAR_SUFFIXES = tuple(f".{g}.weight" for g in GGUF_LINEAR.values())


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="smollm2-135m", help="a model spec with a GGUF, or tiny256 (a random LLaMA with 256-wide rows)"
    )
    p.add_argument("--data-dir", default="../shared/data", help="folder holding wikitext-2-raw/wiki.test.raw")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=100)
    p.add_argument("--presets", default=PRESETS)
    p.add_argument("--checkpoint-bits", default="2.5,3.0,4.0", help="ilp checkpoints' true bits ('' for none)")
    p.add_argument("--calib", default="builtin", help="calibration corpus of the imatrix and the costs")
    p.add_argument("--work-dir", default=None, help="windquant gguf's work folder (default: OUT/work)")
    p.add_argument("--out", default="benchmarks/results/gguf")
    p.add_argument(
        "--kld",
        action="store_true",
        help="also score every GGUF by KL divergence to the F16 reference's logits (the verdict then uses KLD; "
        "meant for the random model, whose PPL is noise; the saved logits take tokens × vocab × 2 bytes)",
    )
    return p.parse_args()


def block_linear_tensors(path: Path) -> list:
    """A GGUF's block-linear tensors (gguf-py's ReaderTensor)."""
    return [t for t in open_gguf(path).tensors if t.name.startswith("blk.") and t.name.endswith(LINEAR_SUFFIXES)]


def gguf_stats(path: Path) -> dict:
    """Block-linear bpw, whole-file bpw, and the embedding's and output's types of a GGUF."""
    tensors = {t.name: t for t in open_gguf(path).tensors}
    linear = block_linear_tensors(path)
    emb = tensors["token_embd.weight"].tensor_type.name
    return {
        "linear_bpw": 8 * sum(t.n_bytes for t in linear) / sum(t.n_elements for t in linear),
        "file_bpw": file_bpw(path),
        "embedding_type": emb,
        "output_type": tensors["output.weight"].tensor_type.name if "output.weight" in tensors else emb,
    }


def source_types(path: Path, source: Path) -> dict:
    """How many of a GGUF's block linears are stored in the type the source GGUF stores them in.
    Re-quantizing a dequantized GGUF into its own type re-finds its grid at about no cost, so such
    tensors say nothing about a method (Gemma-3's Q4_K_M re-quantized to Q4_K_M scores the
    reference's perplexity)."""
    src = {t.name: t.tensor_type.name for t in open_gguf(source).tensors}
    linear = block_linear_tensors(path)
    return {"same": sum(src.get(t.name) == t.tensor_type.name for t in linear), "of": len(linear)}


def score(path: Path, args, text: Path, base: Path | None) -> dict:
    start = time.perf_counter()
    ppl, err = llamacpp.perplexity(path, text, args.ctx, args.chunks)
    row = {"ppl": ppl, "ppl_err": err, "score_seconds": round(time.perf_counter() - start, 1)}
    if base is not None:
        row["kld"], row["kld_err"] = llamacpp.kl_divergence(path, base, args.ctx)
    return row


def checkpoint_row(spec: str, bits: float | None, args, folder: Path) -> dict:
    """PPL of the reference (``bits`` None) or of an ilp checkpoint, by ``windquant eval
    --protocol llamacpp`` on the same text and span as the GGUFs."""
    from windquant.cli import main as windquant

    target = spec
    if bits is not None:
        target = str(folder / f"ilp-{bits:g}")
        if not Path(target).is_dir():
            cmd = ["quantize", "--model", spec, "--allocator", "ilp", "--target-bits", f"{bits:g}", "--out", target, "--quiet"]
            if windquant(cmd) != 0:
                sys.exit(f"windquant quantize failed for {bits} bits")
    report = folder / "eval.json"
    cmd = ["eval", target, "--protocol", "llamacpp", "--ctx", str(args.ctx), "--max-windows", str(args.chunks)]
    if windquant([*cmd, "--data-dir", args.data_dir, "--json", str(report), "--quiet"]) != 0:
        sys.exit(f"windquant eval failed for {target}")
    result = json.loads(report.read_text())
    return {"ppl": result["ppl"], "chunks": result["windows"]}


def main() -> None:
    args = parse()
    set_threads()
    if llamacpp.find_tool("llama-quantize") is None or llamacpp.find_tool("llama-perplexity") is None:
        sys.exit(f"benchmarks/gguf_presets.py needs llama.cpp's tools; {llamacpp.BUILD_HINT}")
    out = Path(args.out)
    files = out / "files"
    files.mkdir(parents=True, exist_ok=True)
    text = Path(args.data_dir) / "wikitext-2-raw" / "wiki.test.raw"
    spec = args.model
    if spec == "tiny256":
        spec = str(write_random_llama(out / "tiny256.gguf", hidden=256, intermediate=512, layers=4, context=args.ctx))
    fit = FitConfig(calib=args.calib, data_dir=args.data_dir)
    work = Path(args.work_dir) if args.work_dir else out / "work"
    path = out / "results.json"
    rows = load_rows(path)
    meta = {"settings": vars(args)}

    def keep(key: str, row: dict) -> None:
        rows[key] = {"key": key, **row}
        save_rows(path, rows, meta)
        print(f"{key}: " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    base = build_gguf(spec, None, GGUFConfig(target_bpw=16.0), fit, work)  # reference, imatrix, every type's costs
    reference, imatrix = Path(base["reference"]), Path(base["work_dir"]) / "imatrix.dat"
    base = None
    if args.kld:
        base = out / "reference-logits.kld"
        if not base.is_file():
            llamacpp.kl_divergence_base(reference, text, base, args.ctx, args.chunks)
    if "reference" not in rows:
        keep("reference", {"kind": "reference", **gguf_stats(reference), **score(reference, args, text, None)})
    ref_ppl = rows["reference"]["ppl"]
    for preset in args.presets.split(","):
        if f"preset {preset}" not in rows:
            f = files / f"{preset}.gguf"
            llamacpp.quantize(reference, f, preset, imatrix=imatrix)
            keep(f"preset {preset}", {"kind": "preset", "preset": preset, **gguf_stats(f), **score(f, args, text, base)})
            f.unlink()
        p = rows[f"preset {preset}"]
        if f"windquant@{preset}" not in rows:
            f = files / f"windquant-{preset}.gguf"
            cfg = GGUFConfig(
                target_bpw=p["linear_bpw"],
                embedding_type=parse_type(p["embedding_type"]),
                output_type=parse_type(p["output_type"]),
            )
            report = build_gguf(spec, f, cfg, fit, work)
            keep(
                f"windquant@{preset}",
                {
                    "kind": "windquant gguf",
                    "preset": preset,
                    **gguf_stats(f),
                    **score(f, args, text, base),
                    "types": report["type_counts"],
                },
            )
            f.unlink()
    bits = [float(b) for b in args.checkpoint_bits.split(",") if b.strip()]
    if bits and "checkpoint reference" not in rows:
        keep("checkpoint reference", {"kind": "checkpoint reference", **checkpoint_row(spec, None, args, files)})
    for b in bits:
        if f"ilp checkpoint {b:g}" not in rows:
            keep(
                f"ilp checkpoint {b:g}", {"kind": "windquant checkpoint", "true_bits": b, **checkpoint_row(spec, b, args, files)}
            )
    for r in rows.values():
        own = rows["checkpoint reference"]["ppl"] if r["kind"] in ("windquant checkpoint", "checkpoint reference") else ref_ppl
        r["ratio"] = r["ppl"] / own
    save_rows(path, rows, meta)
    write_markdown(rows, args, out / "results.md")
    plot(rows, args, out / "gguf.png")
    print((out / "results.md").read_text())


def verdict(rows: dict, metric: str) -> tuple[bool, int]:
    """(windquant gguf at least as good as every preset at equal or lower bpw by ``metric``, lower
    is better; how many strictly better)."""
    ok, better = True, 0
    for r in rows.values():
        if r["kind"] != "windquant gguf":
            continue
        p = rows[f"preset {r['preset']}"]
        ok &= r["linear_bpw"] <= p["linear_bpw"] + 1e-9 and r[metric] <= p[metric]
        better += r[metric] < p[metric]
    return ok, better


def write_markdown(rows: dict, args, md: Path) -> None:
    ref = rows["reference"]
    lines = [
        f"# windquant gguf vs llama.cpp presets on {args.model} (issue 16)",
        "",
        f"`llama-perplexity`, ctx {args.ctx}, first {args.chunks} chunks of wiki.test.raw; F16 reference PPL "
        f"{ref['ppl']:.4f}. Presets and windquant gguf share our importance matrix (calibration: {args.calib}); "
        "windquant gguf runs at each preset's block-linear bpw with the preset's embedding and output types.",
        "",
        "| preset | linear bpw | file bpw | preset PPL (× ref) | windquant gguf PPL (× ref) | windquant types |"
        + (" preset KLD | windquant KLD |" if args.kld else ""),
        "|---|---|---|---|---|---|" + ("---|---|" if args.kld else ""),
    ]
    for p in rows.values():
        if p["kind"] != "preset":
            continue
        w = rows.get(f"windquant@{p['preset']}")
        ours = f"{w['ppl']:.4f} ({w['ratio']:.4f})" if w else "–"
        mark = "**" if w and w["ppl"] < p["ppl"] else ""
        types = " ".join(f"{k}:{v}" for k, v in w["types"].items()) if w else ""
        kld = ""
        if args.kld and w:
            kmark = "**" if w["kld"] < p["kld"] else ""
            kld = f" {p['kld']:.6f} | {kmark}{w['kld']:.6f}{kmark} |"
        lines.append(
            f"| {p['preset']} | {p['linear_bpw']:.4f} | {p['file_bpw']:.4f} | {p['ppl']:.4f} ({p['ratio']:.4f}) | {mark}{ours}{mark} | {types} |{kld}"
        )
    for metric in ("ppl", "kld") if args.kld else ("ppl",):
        ok, better = verdict(rows, metric)
        lines += [
            "",
            f"Must by {metric.upper()} (at least as good as every preset at equal or lower bpw, strictly better at >= 2 sizes): "
            f"{'met' if ok and better >= 2 else 'NOT met'} (never worse: {ok}; strictly better at {better}).",
        ]
    ck = [r for r in rows.values() if r["kind"] == "windquant checkpoint"]
    if ck:
        cref = rows["checkpoint reference"]
        lines += [
            "",
            f"windquant-format checkpoints, `windquant eval --protocol llamacpp` (own reference PPL {cref['ppl']:.4f}):",
            "",
            "| checkpoint | true bits | PPL (× ref) |",
            "|---|---|---|",
        ]
        lines += [f"| ilp | {r['true_bits']:g} | {r['ppl']:.4f} ({r['ratio']:.4f}) |" for r in ck]
    md.write_text("\n".join(lines) + "\n")


def plot(rows: dict, args, png: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, style in (("preset", "o"), ("windquant gguf", "s")):
        rs = sorted((r for r in rows.values() if r["kind"] == kind), key=lambda r: r["linear_bpw"])
        ax.plot([r["linear_bpw"] for r in rs], [r["ratio"] for r in rs], style + "-", label=kind)
        if kind == "preset":
            for r in rs:
                ax.annotate(r["preset"], (r["linear_bpw"], r["ratio"]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ck = [r for r in rows.values() if r["kind"] == "windquant checkpoint"]
    if ck:
        ax.plot([r["true_bits"] for r in ck], [r["ratio"] for r in ck], "^", label="ilp checkpoint (true bits)")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight of the block linears")
    ax.set_ylabel("PPL / own reference PPL")
    ax.set_title(f"{args.model}: llama-perplexity ctx {args.ctx}, {args.chunks} chunks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
