"""Reports on a Plan / checkpoint: accounting, action distribution (paper Fig. 2), bit map."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from torch import nn

from windquant.alloc.plan import Plan
from windquant.errors import WindquantError
from windquant.model.units import decoder_blocks
from windquant.quant.accounting import true_bits


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


def layer_bit_map(plan: Plan) -> tuple[list[int], list[str], list[list[float]]]:
    """Average true bits per weight for each (layer, projection)."""
    bits: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for u, a in zip(plan.units, plan.applied):
        acc = bits[(u.layer, u.proj)]
        acc[0] += true_bits(a, *u.shape, plan.salient_rate)
        acc[1] += u.n_weights
    layers = sorted({k[0] for k in bits})
    projs = list(dict.fromkeys(u.proj for u in plan.units))
    grid = [
        [bits[(layer, p)][0] / bits[(layer, p)][1] if (layer, p) in bits else float("nan") for p in projs] for layer in layers
    ]
    return layers, projs, grid


def plan_report(plan: Plan, model: nn.Module | None = None) -> dict:
    acc = plan.summary().as_dict()
    if model is not None:
        acc |= {"untouched_bytes": untouched_bytes(model), **embedding_report(model)}
    layers, projs, grid = layer_bit_map(plan)
    return {
        "allocator": plan.allocator,
        "accounting_mode": plan.accounting,
        "target_bits": plan.target_bits,
        "accounting": acc,
        "action_distribution": plan.action_distribution(),
        "fallbacks": sum(r != a for r, a in zip(plan.requested, plan.applied)),
        "layer_bits": {"layers": layers, "projections": projs, "true_bits": grid},
    }


def save_bit_map(plan: Plan, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        f"allocator: {plan.allocator}  target: {plan.target_bits} ({plan.accounting} bits)",
        f"true bits: {acc['true_bits']:.4f}   paper bits: {acc['paper_bits']:.4f}   "
        f"quantized weights: {acc['n_weights']:,}   packed bytes: {acc['quantized_bytes']:,}",
        f"units: {len(plan.units)}   operator fallbacks: {report['fallbacks']}",
        "action distribution (share of weights):",
    ]
    for action, share in report["action_distribution"].items():
        lines.append(f"  {action:>5} bit  {share:7.2%}  {'#' * round(share * 50)}")
    run_report = path / "run_report.json"
    if run_report.is_file():
        t = json.loads(run_report.read_text()).get("timings", {})
        lines.append(f"run: {t.get('total_seconds')} s, peak RSS {t.get('peak_rss_mib')} MiB")
    ppo = plan.info.get("ppo")
    if ppo:
        best, greedy = ppo["best_sampled"], ppo["greedy"]
        lines.append(
            f"ppo: {ppo['episodes']} episodes (seed {ppo['seed']}), returned the {ppo['chosen']} plan; proxy PPL: "
            f"reference {ppo['ppl_ref']:.2f}, best sampled {best['proxy_ppl']:.2f} (episode {best['episode']}), "
            f"greedy {greedy['proxy_ppl']:.2f}"
        )
        if (path / "training_curve.png").is_file():
            lines.append(f"training curve: {path / 'training_curve.png'}   episode log: {path / 'episodes.jsonl'}")
    png_path = Path(png) if png else path / "bitmap.png"
    save_bit_map(plan, png_path)
    lines.append(f"bit map: {png_path}")
    return "\n".join(lines)
