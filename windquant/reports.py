"""Reports on a Plan / checkpoint: accounting, action distribution (paper Fig. 2), bit map (``windquant inspect``)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from torch import nn

from windquant.actions import bits_name
from windquant.errors import WindquantError
from windquant.eval.zeroshot import paired_difference
from windquant.model.units import decoder_blocks
from windquant.plan import Plan
from windquant.quant.accounting import unit_true_bits


def untouched_bytes(model: nn.Module) -> int:
    """fp16 bytes of every parameter outside the block linears (tied tensors once)."""
    _, blocks = decoder_blocks(model)
    quantized = {id(m.weight) for m in blocks.modules() if isinstance(m, nn.Linear)}
    return sum(2 * p.numel() for p in model.parameters() if id(p) not in quantized)


def embedding_report(model: nn.Module) -> dict:
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    return {
        "embedding_bytes_fp16": 2 * emb.weight.numel(),
        "lm_head_bytes_fp16": 0 if tied or head is None else 2 * head.weight.numel(),
        "lm_head_tied": tied,
    }


def embedding_name(bits: int | str) -> str:
    """'8 bit', or 'mixed 8/4 bit' (the format names of ``windquant.quant.row_formats``)."""
    return "mixed 8/4 bit" if bits == "mixed" else f"{bits} bit"


def file_line(acc: dict) -> str:
    """The whole file's bits per parameter beside the block linears' (folders before format 4: unknown)."""
    if "file_bits_per_param" not in acc:
        return "whole file: not recorded (checkpoint written before format 4)"
    return (
        f"whole file: {acc['file_bits_per_param']:.3f} bits per parameter ({acc['parameters']:,} parameters, "
        f"{acc['tensor_bytes'] / 2**20:.1f} MiB of tensors; embedding {embedding_name(acc['embedding_bits'])}: "
        f"{acc['embedding_bytes'] / 2**20:.1f} MiB)"
    )


CHAT_PROMPT = "What is the capital of France?"  # the demo's question (Makefile PROMPT)


def mib(n_bytes: float) -> str:
    m = n_bytes / 2**20
    return f"{m:,.1f} MiB" if m >= 1 or m == 0 else f"{m:.3f} MiB"


def quantize_summary(out: Path, plan: Plan, report: dict, model: str, data_dir: str | None = None) -> str:
    """What ``windquant quantize`` prints at the end, one labelled line per question: what was
    written, how big (MiB; whole-file and block-linear bits), which actions the weights got,
    where the time went, and the commands to run next."""
    import os
    import shlex

    acc, t = report["accounting"], report["timings"]
    target = "no target" if plan.target_bits is None else f"target {plan.target_bits:g} {bits_name(plan.accounting)} bits"
    fp16 = 2 * acc["n_weights"]
    rows = [("wrote", f"{out} (plan digest {report['plan_digest']}, allocator {plan.allocator})")]
    if "file_bits_per_param" in acc:
        rows.append(
            (
                "whole file",
                f"{mib(acc['tensor_bytes'])} of tensors = {acc['file_bits_per_param']:.3f} bits per parameter "
                f"({acc['parameters']:,} parameters; embedding {embedding_name(acc['embedding_bits'])}: {mib(acc['embedding_bytes'])})",
            )
        )
    rows.append(
        (
            "block linears",
            f"{mib(acc['quantized_bytes'])} = {acc['true_bits']:.3f} true bits per weight ({target}; paper bits "
            f"{acc['paper_bits']:.3f}); fp16: {mib(fp16)}, {fp16 / max(acc['quantized_bytes'], 1):.1f}x smaller",
        )
    )
    shares = "  ".join(f"{k} bit {v:.1%}" for k, v in plan.action_distribution().items())
    rows.append(("actions", f"share of block-linear weights at each precision: {shares}"))
    if "scores" in plan.info:  # --scores auto: which table this budget used, and why
        check = plan.info["scores"]
        tried = ", ".join(f"{k} {v:.2f}" for k, v in check["heldout_ppl"].items())
        rows.append(
            (
                "scores",
                f"{check['chosen']} (held-out perplexity of each table's plan: {tried}; reference {check['reference_ppl']:.2f})",
            )
        )
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in t["seconds"].items())
    rows.append(("time", f"{t['total_seconds']:.1f} s ({stages}); peak RSS {t['peak_rss_mib']:,.0f} MiB"))
    folder, spec = shlex.quote(str(out)), shlex.quote(model)
    if data_dir:
        corpus = f"--corpus wikitext2 --data-dir {shlex.quote(data_dir)}"
    elif os.environ.get("WINDQUANT_DATA"):
        corpus = "--corpus wikitext2"  # found under $WINDQUANT_DATA
    else:
        corpus = "--corpus wikitext2 --data-dir FOLDER   (FOLDER holding wikitext-2-raw/; or --corpus mix)"
    rows.append(("next", f"windquant eval {folder} --reference {spec} {corpus}"))
    rows.append(("", f"windquant generate {folder} --chat --prompt {shlex.quote(CHAT_PROMPT)}"))
    rows.append(("", f"windquant inspect {folder}   (per-layer bit map)"))
    width = max(len(label) for label, _ in rows) + 1
    return "\n".join(f"{(label + ':') if label else '':<{width}} {text}" for label, text in rows)


def layer_bit_map(plan: Plan) -> tuple[list[int], list[str], list[list[float]]]:
    """Average true bits per weight for each (layer, projection)."""
    bits: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for u, a, r in zip(plan.units, plan.applied, plan.rotate_flags()):
        acc = bits[(u.layer, u.proj)]
        acc[0] += unit_true_bits(a, *u.shape, plan.salient_rate, r)
        acc[1] += u.n_weights
    layers = sorted({k[0] for k in bits})
    projs = list(dict.fromkeys(u.proj for u in plan.units))
    grid = [
        [bits[(layer, p)][0] / bits[(layer, p)][1] if (layer, p) in bits else float("nan") for p in projs] for layer in layers
    ]
    return layers, projs, grid


def plan_report(plan: Plan, model: nn.Module | None = None) -> dict:
    acc = plan.summary().as_dict() | plan.info.get("file", {})
    if model is not None:
        acc |= {"untouched_bytes": untouched_bytes(model), **embedding_report(model)}
    layers, projs, grid = layer_bit_map(plan)
    return {
        "allocator": plan.allocator,
        "accounting_mode": plan.accounting,
        "target_bits": plan.target_bits,
        "plan_digest": plan.digest(),
        "accounting": acc,
        "action_distribution": plan.action_distribution(),
        "fallbacks": sum(r != a for r, a in zip(plan.requested, plan.applied)),
        "layer_bits": {"layers": layers, "projections": projs, "true_bits": grid},
    }


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported only when a figure is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_bit_map(plan: Plan, path: Path) -> None:
    plt = pyplot()

    layers, projs, grid = layer_bit_map(plan)
    dist = plan.action_distribution()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, max(4, 0.22 * len(layers) + 1.5)), gridspec_kw={"width_ratios": [1, 1.4]})
    ax1.bar(list(dist), [100 * v for v in dist.values()], color="tab:blue")
    ax1.set_xlabel("applied action (bits)")
    ax1.set_ylabel("% of quantized weights")
    ax1.set_title("Action distribution")
    im = ax2.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax2.set_xticks(range(len(projs)), [p.split(".")[-1] for p in projs], rotation=45, ha="right")
    ax2.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
    ax2.set_ylabel("decoder layer")
    ax2.set_title("True bits per weight")
    fig.colorbar(im, ax=ax2)
    fig.suptitle(f"{plan.allocator}: {plan.true_bits:.3f} true bits, {plan.paper_bits:.3f} paper bits")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def inspect_checkpoint(path: Path, png: str | None = None) -> str:
    if not (path / "plan.json").is_file():
        raise WindquantError(f"{path} is not a windquant checkpoint (no plan.json); give a folder written by quantize")
    plan = Plan.load(path / "plan.json")
    report = plan_report(plan)
    acc = report["accounting"]
    lines = [
        f"checkpoint: {path}",
        f"allocator: {plan.allocator}  target: {plan.target_bits} {bits_name(plan.accounting)} bits per weight (--accounting {plan.accounting})",
        f"true bits: {acc['true_bits']:.4f}   paper bits: {acc['paper_bits']:.4f}   "
        f"quantized weights: {acc['n_weights']:,}   packed bytes: {acc['quantized_bytes']:,}",
        file_line(acc),
        f"units: {len(plan.units)}   operator fallbacks: {report['fallbacks']}",
        "action distribution (share of weights):",
    ]
    for action, share in report["action_distribution"].items():
        lines.append(f"  {action:>5} bit  {share:7.2%}  {'#' * round(share * 50)}")
    run_report = path / "run_report.json"
    if run_report.is_file():
        t = json.loads(run_report.read_text()).get("timings", {})
        lines.append(f"run: {t.get('total_seconds')} s, peak RSS {t.get('peak_rss_mib')} MiB")
    info = plan.info.get(plan.allocator) or {}
    if "summary" in info:
        lines.append(f"{plan.allocator}: {info['summary']}")
    attached = [path / name for name in info.get("attached", []) if (path / name).is_file()]
    if attached:
        lines.append(f"{plan.allocator} files: " + "   ".join(map(str, attached)))
    png_path = Path(png) if png else path / "bitmap.png"
    save_bit_map(plan, png_path)
    lines.append(f"bit map: {png_path}")
    return "\n".join(lines)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def side_by_side(reference: dict, quantized: dict) -> str:
    """Reference vs quantized (``windquant eval --reference`` payloads): bits, size, quality, cost."""
    folder = Path(quantized["model"])
    plan, run = _read_json(folder / "plan.json"), _read_json(folder / "run_report.json")
    rows = [("", "reference", "quantized"), ("model", reference["model"], quantized["model"])]
    if plan:
        fp16_bytes = 2 * plan["n_weights"]
        rows += [
            ("true bits per block-linear weight", "16 (fp16)", f"{plan['true_bits']:.3f}"),
            ("paper bits (Eq. 6)", "16", f"{plan['paper_bits']:.3f}"),
            (
                "whole file bits per parameter",
                "-",
                f"{plan['info']['file']['file_bits_per_param']:.3f}" if "file" in plan.get("info", {}) else "not recorded",
            ),
            (
                "block linears (MiB)",
                f"{fp16_bytes / 2**20:.1f}",
                f"{plan['quantized_bytes'] / 2**20:.1f} ({fp16_bytes / plan['quantized_bytes']:.1f}x smaller)",
            ),
        ]
    if "ppl" in reference and "ppl" in quantized:
        q = quantized
        span = f"{q['corpus']}, {q['windows']} windows x {q['ctx']} = {q['tokens']:,} tokens"
        rows.append((f"perplexity ({span})", f"{reference['ppl']:.2f}", f"{q['ppl']:.2f} (x{q['ppl'] / reference['ppl']:.2f})"))
    if "zeroshot_avg_acc" in reference and "zeroshot_avg_acc" in quantized:
        tasks = ",".join(quantized["zeroshot"])
        rows.append(
            (f"zero-shot avg acc ({tasks})", f"{reference['zeroshot_avg_acc']:.4f}", f"{quantized['zeroshot_avg_acc']:.4f}")
        )
        paired = paired_difference(reference["zeroshot"], quantized["zeroshot"])
        if paired is not None:
            n = sum(r["n"] for r in quantized["zeroshot"].values())
            diff = f"{100 * paired[0]:+.1f} ± {100 * paired[1]:.1f} points (paired, the same {n:,} documents)"
            rows.append(("zero-shot avg acc, quantized - reference", "", diff))
    t = run.get("timings")
    if t:
        rows.append(("quantize: wall time / peak RSS", "-", f"{t['total_seconds']:.0f} s / {t['peak_rss_mib']:.0f} MiB"))
    rows.append(("eval wall time (load + score)", f"{reference['eval_seconds']:.0f} s", f"{quantized['eval_seconds']:.0f} s"))
    if "peak_rss_mib" in quantized:
        rows.append(("eval process peak RSS", "", f"{quantized['peak_rss_mib']:.0f} MiB (both models, one after the other)"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(3)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
